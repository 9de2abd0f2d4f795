"""The closest peer for `peer_bench.py`: KServe's Python model server (FastAPI and uvicorn, as ours) with a
model that does the per-image work a KServe user writes for an image classifier (Pillow decode, resize
to 224, normalise), then answers a constant top-5, as our benchmark's engine does.

    <kserve venv>/bin/python bench/kserve_peer.py --http_port 8080

Run with KServe's own interpreter (pip install kserve pillow in a venv of its own); it is not part of
monaserve and needs nothing from it. `predict` is synchronous, as in KServe's image examples: KServe
runs it on its event loop.
"""

from __future__ import annotations

import argparse
import base64
import io

import kserve
import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.utils.utils import generate_uuid
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
LABELS = 1000


class ImageClassifier(Model):
    """Classify base64 images sent as v2 BYTES (or v1 `{"instances": [{"b64": ...}]}`) with a constant model."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        probabilities = np.full(LABELS, 1.0 / LABELS, dtype=np.float32)
        self.top = np.argsort(-probabilities, kind="stable")[:5]
        self.scores = probabilities[self.top]
        self.ready = True

    def predict(self, payload: InferRequest | dict, headers: dict | None = None) -> InferResponse | dict:
        if isinstance(payload, InferRequest):
            images = [image_tensor(base64.b64decode(item)) for item in payload.inputs[0].data]
        else:
            images = [image_tensor(base64.b64decode(item["b64"])) for item in payload["instances"]]
        batch = np.stack(images)  # what a real model would take; the answer below is the constant one
        top = np.tile(self.top, (len(batch), 1))
        scores = np.tile(self.scores, (len(batch), 1))
        if isinstance(payload, dict):
            return {"predictions": [{"indices": t.tolist(), "scores": s.tolist()} for t, s in zip(top, scores)]}
        outputs = [
            InferOutput("indices", list(top.shape), "INT64", top.flatten().tolist()),
            InferOutput("scores", list(scores.shape), "FP32", scores.flatten().tolist()),
        ]
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id or generate_uuid())


def image_tensor(data: bytes) -> np.ndarray:
    """Decode, resize to 224x224 and normalise, as float32 `(3, 224, 224)`."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    return ((np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    args, _ = parser.parse_known_args()
    ModelServer(http_port=args.http_port, enable_grpc=False, workers=1).start([ImageClassifier("frontend")])

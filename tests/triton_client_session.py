"""What a Triton user does with Triton's own Python clients (HTTP and gRPC), against a running server;
prints what it saw as JSON. Run as a process of its own: tritonclient's gRPC messages and the server's
are both `inference.*`, and one process holds only one of them.

    python tests/triton_client_session.py HTTP_URL GRPC_TARGET ADMIN_TOKEN IMAGE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def session(module, address: str, admin: dict[str, str], image: bytes) -> dict:
    client = module.InferenceServerClient(address)
    as_json = {"as_json": True} if module is grpcclient else {}
    seen = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "extensions": sorted(client.get_server_metadata(**as_json)["extensions"]),
        "model_ready": client.is_model_ready("pets"),
        "inputs": [i["name"] for i in client.get_model_metadata("pets", **as_json)["inputs"]],
        "max_batch_size": client.get_model_config("pets", **as_json).get("config", {}).get("max_batch_size", 0)
        if module is grpcclient
        else client.get_model_config("pets")["max_batch_size"],
    }
    images = module.InferInput("image", [2], "BYTES")
    images.set_data_from_numpy(np.array([image, image], dtype=np.object_))
    plain = client.infer("pets", [images], parameters={"top_k": 3})
    seen["labels"] = plain.as_numpy("labels").astype(str).tolist()
    seen["scores"] = plain.as_numpy("scores").tolist()
    classified = client.infer("pets", [images], outputs=[module.InferRequestedOutput("scores", class_count=2)])
    seen["classes"] = classified.as_numpy("scores").astype(str).tolist()
    stats = client.get_inference_statistics("pets", **as_json)["model_stats"]
    seen["successes"] = sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats)
    index = client.get_model_repository_index(headers=admin, **as_json)
    seen["index"] = sorted((m["name"], m["version"], m.get("state", "")) for m in (index["models"] if module is grpcclient else index))
    client.unload_model("pets", headers=admin)
    seen["ready_after_unload"] = client.is_model_ready("pets")
    client.load_model("pets", headers=admin)
    seen["ready_after_load"] = client.is_model_ready("pets")
    client.close()
    return seen


def main() -> int:
    url, target, token, image = sys.argv[1:5]
    admin = {"authorization": f"Bearer {token}"}
    data = Path(image).read_bytes()
    report = {"http": session(httpclient, url, admin, data), "grpc": session(grpcclient, target, admin, data)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the Open Inference Protocol says of the server and its models: server metadata, model metadata,
the model configuration extension, and the repository index, as the REST routes answer them (JSON).
gRPC parses the same dicts into its messages, so the two protocols cannot disagree.

A model is a task; a model version an adapter version. Every stored version of a loaded task serves
(pinned), so each is READY; an unloaded task has no READY version. The batch dimension is not part of
a model's shape (`max_batch_size` 0): a request holds any number of images up to
`--max-images-per-request`, and the server batches them with other requests' itself.
"""

from __future__ import annotations

from .catalog import TaskEntry, TaskVersion
from .config import ServeConfig

SERVER = {"name": "monaserve", "version": "0.1.0"}
PLATFORM = "monaserve"
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "parameters",
    "statistics",
]
INPUTS = [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
"""The input a model declares. `pixels` (UINT8 `[N, H, W, 3]` or `[H, W, 3]`) is accepted in its place
but not declared: tools fill every declared input, and a request holds exactly one."""
ALTERNATIVE_INPUT = "pixels: UINT8 [-1, -1, -1, 3] or [-1, -1, 3], in place of image"


def server_metadata() -> dict:
    return {**SERVER, "extensions": EXTENSIONS}


def model_metadata(target: TaskVersion) -> dict:
    """The protocol's model metadata (REST adds `parameters`, which gRPC's message has no field for)."""
    return {
        "name": target.entry.name,
        "versions": [str(v) for v in sorted(target.entry.versions)],
        "platform": PLATFORM,
        "inputs": INPUTS,
        "outputs": [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape)} for o in target.kind.outputs],
        "parameters": {"kind": target.kind.name, "labels": len(target.manifest.labels), "alternative_input": ALTERNATIVE_INPUT},
    }


def repository_index(entries: list[TaskEntry], only_ready: bool) -> list[dict]:
    """Every stored version of every task, READY while its task is loaded."""
    return [
        {"name": entry.name, "version": str(version), "state": "READY" if entry.enabled else "UNAVAILABLE", "reason": reason}
        for entry in entries
        if entry.enabled or not only_ready
        for reason in ["" if entry.enabled else "unloaded"]
        for version in sorted(entry.versions)
    ]


DATA_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP32": "TYPE_FP32",
    "BYTES": "TYPE_STRING",
}
"""The protocol's datatypes as `ModelConfig` names them (those a model here declares)."""


def model_config(target: TaskVersion, config: ServeConfig, on_gpu: bool) -> dict:
    """`target`'s configuration in the terms of Triton's `ModelConfig` (only the fields that describe it)."""
    manifest = target.manifest
    return {
        "name": target.entry.name,
        "platform": PLATFORM,
        "backend": PLATFORM,
        "version_policy": {"all": {}},  # every stored version of a loaded task serves (pinned)
        "max_batch_size": 0,
        "input": [{"name": i["name"], "data_type": DATA_TYPES[i["datatype"]], "dims": i["shape"]} for i in INPUTS],
        "output": [{"name": o.name, "data_type": DATA_TYPES[o.datatype], "dims": list(o.shape)} for o in target.kind.outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": round(config.max_delay_ms * 1000)},
        "instance_group": [{"name": target.entry.name, "kind": "KIND_GPU" if on_gpu else "KIND_CPU", "count": 1}],
        "parameters": {
            "kind": {"string_value": manifest.kind},
            "version": {"string_value": str(target.version)},
            "labels": {"string_value": str(len(manifest.labels))},
            "input_size": {"string_value": "x".join(map(str, manifest.input.size))},
            "max_images_per_request": {"string_value": str(config.max_images_per_request)},
        },
    }

"""The Open Inference Protocol over gRPC against a real server, with a client built from our `.proto`:
every RPC, inference equal to `/v1` and to `/v2` REST for each kind, the same errors, limits, tokens,
metrics and statistics; and the `.proto` checked field by field against Triton's own client."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from monaserve.adapters.synthetic import random_package
from monaserve.server.oip_proto import grpc_service_pb2 as pb
from monaserve.server.oip_proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub

from app_harness import InProcessServer
from server_harness import TOKEN, free_port, image_bytes, store_of

ADMIN = (("authorization", f"Bearer {TOKEN}"),)
PROTO = Path(__file__).parents[1] / "server" / "oip_proto"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, shared_backbone):
    tasks = [("pets", "classify", 1), ("pets", "classify", 2), ("boxes", "detect", 1), ("masks", "segment", 1)]
    packages = [random_package(shared_backbone, name, seed=len(name), kind=kind, num_labels=4, version=v) for name, kind, v in tasks]
    store = store_of(tmp_path_factory, packages)
    with InProcessServer(
        tiny_weights, store, serve_grpc=True, admin_token=TOKEN, grpc_port=free_port(), max_images_per_request=8
    ) as server:
        yield server


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.config.grpc_port}") as channel:
        yield GRPCInferenceServiceStub(channel)


@pytest.fixture
def http(server):
    return server.client(token=None)


def as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, use_integers_for_enums=False)


def fails(call, request, code: grpc.StatusCode, complaint: str, **kwargs) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, **kwargs)
    assert caught.value.code() == code and complaint in caught.value.details(), caught.value


def raw_bytes(*values: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def image_request(name: str, *images: bytes, raw: bool = True, **fields) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[len(images)])
    if not raw:
        tensor.contents.bytes_contents.extend(images)
    request = pb.ModelInferRequest(model_name=name, inputs=[tensor], **fields)
    if raw:
        request.raw_input_contents.append(raw_bytes(*images))
    return request


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Each output as an array, read from `raw_output_contents` as Triton's clients read them."""
    dtypes = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4", "UINT8": "u1"}
    arrays = {}
    for output, data in zip(response.outputs, response.raw_output_contents, strict=True):
        if output.datatype == "BYTES":
            values, position = [], 0
            while position < len(data):
                (length,) = struct.unpack_from("<I", data, position)
                values.append(data[position + 4 : position + 4 + length].decode())
                position += 4 + length
            arrays[output.name] = np.array(values, dtype=object).reshape(list(output.shape))
        else:
            arrays[output.name] = np.frombuffer(data, dtype=dtypes[output.datatype]).reshape(list(output.shape))
    return arrays


def rest_outputs(http, name: str, *images: bytes, **body) -> dict[str, np.ndarray]:
    data = [base64.b64encode(i).decode() for i in images]
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": data}], **body}
    response = http.post(f"/v2/models/{name}/infer", json=request)
    assert response.status_code == 200, response.text
    return {
        o["name"]: np.array(o["data"], dtype=object if o["datatype"] == "BYTES" else None).reshape(o["shape"])
        for o in response.json()["outputs"]
    }


# ---- health, metadata, configuration -----------------------------------------------------------


def test_health_and_server_metadata_answer_as_rest_does(stub, http):
    assert stub.ServerLive(pb.ServerLiveRequest()).live is True
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is True
    assert as_dict(stub.ServerMetadata(pb.ServerMetadataRequest())) == http.get("/v2").json()
    assert stub.ModelReady(pb.ModelReadyRequest(name="pets")).ready is True
    assert stub.ModelReady(pb.ModelReadyRequest(name="pets", version="1")).ready is True
    fails(stub.ModelReady, pb.ModelReadyRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "unknown_task: unknown task 'nope'")
    fails(stub.ModelReady, pb.ModelReadyRequest(name="pets", version="9"), grpc.StatusCode.NOT_FOUND, "unknown_version")
    fails(stub.ModelReady, pb.ModelReadyRequest(name="pets", version="x"), grpc.StatusCode.INVALID_ARGUMENT, "positive integers")


def as_message(rest: dict | list, message: type, field: str | None = None):
    """A REST answer read into the gRPC message that carries the same fields."""
    return json_format.ParseDict(rest if field is None else {field: rest}, message(), ignore_unknown_fields=True)


@pytest.mark.parametrize("name", ["pets", "boxes", "masks"])
def test_model_metadata_and_configuration_equal_rest(stub, http, name):
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
    assert metadata == as_message(http.get(f"/v2/models/{name}").json(), pb.ModelMetadataResponse)
    assert [(i.name, i.datatype, list(i.shape)) for i in metadata.inputs] == [("image", "BYTES", [-1])]
    config = stub.ModelConfig(pb.ModelConfigRequest(name=name, version="1"))
    assert config == as_message(http.get(f"/v2/models/{name}/versions/1/config").json(), pb.ModelConfigResponse, "config")
    assert config.config.max_batch_size == 0 and config.config.input[0].data_type == pb.TYPE_STRING
    fails(stub.ModelMetadata, pb.ModelMetadataRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "unknown task")


# ---- inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_classify_equals_v1_and_rest(stub, http, raw):
    images = [image_bytes(1), image_bytes(2), image_bytes(3)]
    top_k = pb.InferParameter(int64_param=3)
    response = stub.ModelInfer(image_request("pets", *images, raw=raw, id="r-7", parameters={"top_k": top_k}))
    assert (response.model_name, response.model_version, response.id) == ("pets", "2", "r-7")
    outputs = outputs_of(response)
    rest = rest_outputs(http, "pets", *images, parameters={"top_k": 3})
    assert outputs.keys() == rest.keys() == {"scores", "labels", "indices"}
    for name in outputs:
        assert (outputs[name] == rest[name]).all(), name
    for i, image in enumerate(images):
        v1 = http.post("/v1/tasks/pets/classify?top_k=3", content=image, headers={"content-type": "image/jpeg"}).json()
        assert [t["label"] for t in v1["results"][0]["top"]] == list(outputs["labels"][i])
        assert np.allclose([t["score"] for t in v1["results"][0]["top"]], outputs["scores"][i])


def test_detect_equals_v1_and_rest_with_requested_outputs(stub, http):
    images = [image_bytes(4), image_bytes(5)]
    request = image_request(
        "boxes", *images, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in ("num_detections", "boxes")]
    )
    outputs = outputs_of(stub.ModelInfer(request))
    assert list(outputs) == ["num_detections", "boxes"]
    rest = rest_outputs(http, "boxes", *images, outputs=[{"name": "num_detections"}, {"name": "boxes"}])
    assert (outputs["boxes"] == rest["boxes"]).all() and (outputs["num_detections"] == rest["num_detections"]).all()
    for i, image in enumerate(images):
        v1 = http.post("/v1/tasks/boxes/detect", content=image, headers={"content-type": "image/jpeg"}).json()["results"][0]
        count = int(outputs["num_detections"][i])
        assert count == len(v1["detections"])
        assert np.allclose([d["box"] for d in v1["detections"]] or np.zeros((0, 4)), outputs["boxes"][i][:count], atol=1e-3)


def test_segment_equals_the_v1_png_from_pixels_raw_and_typed(stub, http):
    image = image_bytes(8, size=(80, 50))
    v1 = http.post("/v1/tasks/masks/segment", content=image, headers={"content-type": "image/jpeg"}).json()
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(v1["results"][0]["mask_png"]))))
    (mask,) = outputs_of(stub.ModelInfer(image_request("masks", image))).values()
    assert mask.shape == (1, 50, 80) and (mask[0] == png).all()
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    raw = pb.ModelInferRequest(model_name="masks", inputs=[tensor], raw_input_contents=[pixels.tobytes()])
    typed = pb.ModelInferRequest(model_name="masks", inputs=[tensor])
    typed.inputs[0].contents.uint_contents.extend(pixels.reshape(-1).tolist())
    rest = http.post(
        "/v2/models/masks/infer",
        json={"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.reshape(-1).tolist()}]},
    )
    expected = np.array(rest.json()["outputs"][0]["data"], dtype=np.uint8).reshape(rest.json()["outputs"][0]["shape"])
    for request in (raw, typed):
        (from_pixels,) = outputs_of(stub.ModelInfer(request)).values()
        assert (from_pixels == expected).all()


def test_the_classification_extension_and_parameters(stub):
    output = pb.ModelInferRequest.InferRequestedOutputTensor(name="scores", parameters={"classification": pb.InferParameter(int64_param=2)})
    (classes,) = outputs_of(stub.ModelInfer(image_request("pets", image_bytes(1), outputs=[output]))).values()
    assert classes.shape == (1, 2) and all(len(c.split(":")) == 3 for c in classes[0])
    priority = {"priority": pb.InferParameter(uint64_param=3)}
    fails(stub.ModelInfer, image_request("pets", image_bytes(1), parameters=priority), grpc.StatusCode.INVALID_ARGUMENT, "same priority")
    timeout = {"timeout": pb.InferParameter(int64_param=1)}
    fails(stub.ModelInfer, image_request("pets", image_bytes(1), parameters=timeout), grpc.StatusCode.DEADLINE_EXCEEDED, "within 1e-06 s")


def test_errors_are_rest_errors_as_grpc_statuses(stub):
    status = grpc.StatusCode
    fails(stub.ModelInfer, image_request("nope", image_bytes(0)), status.NOT_FOUND, "unknown_task")
    fails(stub.ModelInfer, image_request("pets", b"not an image"), status.INVALID_ARGUMENT, "not a JPEG")
    fails(
        stub.ModelInfer, image_request("pets", *[image_bytes(0)] * 9), status.RESOURCE_EXHAUSTED, "9 images in one request; the limit is 8"
    )
    half = image_request("pets", image_bytes(0))
    half.raw_input_contents[0] = half.raw_input_contents[0][:-10]
    fails(stub.ModelInfer, half, status.INVALID_ARGUMENT, "runs past its binary data")
    both = image_request("pets", image_bytes(0))
    both.inputs[0].contents.bytes_contents.append(b"x")
    fails(stub.ModelInfer, both, status.INVALID_ARGUMENT, "both contents and raw_input_contents")
    fp16 = pb.ModelInferRequest(
        model_name="pets", inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP16", shape=[1])]
    )
    fails(stub.ModelInfer, fp16, status.INVALID_ARGUMENT, "send it in raw_input_contents")
    wide = pb.ModelInferRequest(
        model_name="pets", inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 1, 3])]
    )
    wide.inputs[0].contents.uint_contents.extend([1, 2, 300])
    fails(stub.ModelInfer, wide, status.INVALID_ARGUMENT, "do not fit UINT8")
    fails(
        stub.ModelInfer, image_request("pets", b"x" * (65 * 2**20)), status.RESOURCE_EXHAUSTED, ""
    )  # over --max-request-mb: gRPC's own limit
    fails(stub.ModelInfer, image_request("pets", image_bytes(0)), status.DEADLINE_EXCEEDED, "", timeout=0.001)
    assert stub.ServerLive(pb.ServerLiveRequest()).live, "the channel still serves"


def test_grpc_requests_are_counted_with_the_same_metrics_and_statistics(stub, http):
    def count(status: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        return sum(
            sample.value
            for family in text_string_to_metric_families(http.get("/metrics").text)
            for sample in family.samples
            if sample.name == "monaserve_requests_total"
            and sample.labels == {"task": "masks", "kind": "segment", "protocol": "grpc", "status": status}
        )

    def successes() -> int:
        (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="masks", version="1")).model_stats
        return stats.inference_stats.success.count

    before = count("200"), count("415"), successes()
    stub.ModelInfer(image_request("masks", image_bytes(0)))
    fails(stub.ModelInfer, image_request("masks", b"junk"), grpc.StatusCode.INVALID_ARGUMENT, "")
    assert (count("200"), count("415"), successes()) == (before[0] + 1, before[1] + 1, before[2] + 1)  # 415: not an image
    everything = stub.ModelStatistics(pb.ModelStatisticsRequest())
    assert [(m.name, m.version) for m in everything.model_stats] == [
        (m["name"], m["version"]) for m in http.get("/v2/models/stats").json()["model_stats"]
    ]


# ---- the repository extension ------------------------------------------------------------------


def test_repository_calls_need_the_admin_token_and_agree_with_rest(stub, http):
    index = pb.RepositoryIndexRequest()
    fails(stub.RepositoryIndex, index, grpc.StatusCode.UNAUTHENTICATED, "need 'Authorization: Bearer <token>'")
    fails(stub.RepositoryIndex, index, grpc.StatusCode.PERMISSION_DENIED, "invalid token", metadata=(("authorization", "Bearer nope"),))
    listed = stub.RepositoryIndex(index, metadata=ADMIN)
    assert listed == as_message(
        http.post("/v2/repository/index", headers={"Authorization": f"Bearer {TOKEN}"}).json(), pb.RepositoryIndexResponse, "models"
    )
    unload = pb.RepositoryModelUnloadRequest(
        model_name="boxes", parameters={"unload_dependents": pb.ModelRepositoryParameter(bool_param=True)}
    )
    stub.RepositoryModelUnload(unload, metadata=ADMIN)
    try:
        assert stub.ModelReady(pb.ModelReadyRequest(name="boxes")).ready is False
        fails(stub.ModelInfer, image_request("boxes", image_bytes(0)), grpc.StatusCode.NOT_FOUND, "unloaded")
        assert [m.state for m in stub.RepositoryIndex(index, metadata=ADMIN).models if m.name == "boxes"] == ["UNAVAILABLE"]
    finally:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="boxes"), metadata=ADMIN)
    assert stub.ModelReady(pb.ModelReadyRequest(name="boxes")).ready is True
    config = pb.RepositoryModelLoadRequest(model_name="boxes", parameters={"config": pb.ModelRepositoryParameter(string_param="{}")})
    fails(
        stub.RepositoryModelLoad, config, grpc.StatusCode.INVALID_ARGUMENT, "configuration comes from its adapter package", metadata=ADMIN
    )
    fails(
        stub.RepositoryModelLoad,
        pb.RepositoryModelLoadRequest(model_name="nope"),
        grpc.StatusCode.NOT_FOUND,
        "unknown task",
        metadata=ADMIN,
    )


def test_rpcs_left_out_are_unimplemented(server):
    """Streaming, shared memory, trace and log settings are not offered: gRPC says so."""
    with grpc.insecure_channel(f"127.0.0.1:{server.config.grpc_port}") as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/SystemSharedMemoryStatus", request_serializer=bytes, response_deserializer=bytes
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- the .proto --------------------------------------------------------------------------------

DESCRIBE = """
import json, sys
from tritonclient.grpc import service_pb2, model_config_pb2
messages = {}
def walk(descriptor):
    messages[descriptor.full_name] = {f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None]
                                      for f in descriptor.fields}
    for nested in descriptor.nested_types:
        walk(nested)
for module in (service_pb2, model_config_pb2):
    for descriptor in module.DESCRIPTOR.message_types_by_name.values():
        walk(descriptor)
service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
methods = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods}
print(json.dumps({"messages": messages, "methods": methods, "service": service.full_name}))
"""


def test_the_proto_matches_tritons_own_client_field_by_field():
    """Every message, field (name, number, type) and RPC of our `.proto` is Triton's (read from the
    tritonclient package, in a process of its own: both register `inference.*` messages)."""
    try:
        done = subprocess.run([sys.executable, "-c", DESCRIBE], capture_output=True, text=True, timeout=120, check=True)
    except subprocess.CalledProcessError as exc:
        if "No module named 'tritonclient'" in exc.stderr and os.environ.get("CI") != "true":
            pytest.skip("needs tritonclient (the dev extra)")
        raise
    triton = json.loads(done.stdout)
    ours = {}

    def walk(descriptor):
        ours[descriptor.full_name] = {
            f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None] for f in descriptor.fields
        }
        for nested in descriptor.nested_types:
            walk(nested)

    for descriptor in pb.DESCRIPTOR.message_types_by_name.values():
        walk(descriptor)
    for name, fields in ours.items():
        assert name in triton["messages"], name
        for field, spec in fields.items():
            assert triton["messages"][name].get(field) == spec, f"{name}.{field}"
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == triton["service"]
    for method in service.methods:
        assert triton["methods"][method.name] == [method.input_type.full_name, method.output_type.full_name], method.name
    assert len(ours) > 40 and len(list(service.methods)) == 11


def test_the_generated_modules_are_fresh(tmp_path):
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("needs grpcio-tools (the dev extra)")
    from monaserve.server.oip_proto.generate import generate

    generate(tmp_path)
    for module in ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py"):
        assert (tmp_path / module).read_text() == (PROTO / module).read_text(), (
            f"{module} is stale: python -m monaserve.server.oip_proto.generate"
        )


def test_compressed_messages_are_read_and_bounded_by_their_inflated_size(stub):
    """gRPC's own message compression: a gzip request answers as a plain one; one that inflates past
    --max-request-mb is refused by gRPC's limit, which applies to the inflated message."""
    plain = stub.ModelInfer(image_request("pets", image_bytes(6)))
    assert stub.ModelInfer(image_request("pets", image_bytes(6)), compression=grpc.Compression.Gzip) == plain
    bomb = image_request("pets", b"\0" * (70 * 2**20))
    fails(stub.ModelInfer, bomb, grpc.StatusCode.RESOURCE_EXHAUSTED, "", compression=grpc.Compression.Gzip)
    assert stub.ServerLive(pb.ServerLiveRequest()).live


DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "NOPE", ""]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    inputs=st.lists(
        st.tuples(
            st.sampled_from(["image", "pixels", "other", ""]),
            st.sampled_from(DATATYPES),
            st.lists(st.integers(-3, 2**40), max_size=9),
            st.one_of(st.none(), st.binary(max_size=64)),
            st.lists(st.integers(0, 2**32 - 1), max_size=12),
            st.lists(st.binary(max_size=8), max_size=4),
        ),
        max_size=3,
    ),
    parameters=st.dictionaries(
        st.sampled_from(["top_k", "timeout", "priority", "x"]),
        st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=4), st.floats(allow_nan=True)),
        max_size=3,
    ),
)
def test_any_message_is_read_or_refused_with_a_bad_request(inputs, parameters):
    """Whatever a ModelInferRequest holds, reading it (and what it asks, once the kind is known) gives
    images and options or a BadRequest, never another error."""
    from monaserve.adapters.kinds import get_kind
    from monaserve.server.errors import BadRequest
    from monaserve.server.oip_answer import OipAnswer
    from monaserve.server.oip_grpc import read_request

    request = pb.ModelInferRequest(model_name="pets")
    raws = []
    for name, datatype, shape, raw, uints, blobs in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        tensor.contents.uint_contents.extend(uints)
        tensor.contents.bytes_contents.extend(blobs)
        raws.append(raw)
    if inputs and all(raw is not None for raw in raws):
        request.raw_input_contents.extend(raws)
    for key, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}[type(value)]
        setattr(request.parameters[key], field, value)
    try:
        header, images = read_request(request)
        asked = OipAnswer("pets", header, raw=True).read(get_kind("classify"))
    except BadRequest:
        return
    assert images and asked.options.top_k >= 1


@pytest.mark.parametrize("datatype", ["UINT8", "BYTES"])
def test_an_empty_tensor_with_huge_dimensions_is_a_bad_request(datatype):
    """Found by the test above: zero elements passed the element limit, then numpy could not shape them."""
    from monaserve.server.errors import BadRequest
    from monaserve.server.oip_grpc import read_request

    request = pb.ModelInferRequest(model_name="pets")
    request.inputs.add(name="image", datatype=datatype, shape=[0, 2821, 67139, 83249])
    with pytest.raises(BadRequest, match="elements"):
        read_request(request)

"""Access control, in process: inference behind --api-token, admin tokens, CORS, nothing secret
logged, and nothing fetched from or read at a location a request names."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time

import pytest

from app_harness import InProcessServer
from helpers import random_package
from server_harness import TOKEN, free_port, image_bytes, store_of

API_TOKEN = "inference-token-1234"
ORIGIN = "https://app.example.com"
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, shared_backbone):
    store = store_of(tmp_path_factory, [random_package(shared_backbone, "pets", seed=1)])
    options = {"admin_token": TOKEN, "api_token": API_TOKEN, "cors_origins": ORIGIN, "grpc_port": free_port()}
    with InProcessServer(tiny_weights, store, serve_grpc=True, **options) as server:
        yield server


@pytest.fixture
def http(server):
    """Calls without a token of their own (each test adds the one it means)."""
    return server.client(token=None)


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/tasks/pets/classify", image_bytes(0)),
        ("GET", "/v1/tasks", None),
        ("GET", "/v1/tasks/pets", None),
        ("GET", "/v2/models/pets", None),
        ("GET", "/v2/models/pets/ready", None),
        ("POST", "/v2/models/pets/infer", b'{"inputs": []}'),
    ],
)
def test_inference_needs_the_api_token(server, http, method, path, body):
    def call(token):
        return http.request(method, path, content=body, headers={**JPEG, **bearer(token)}, timeout=60)

    missing, wrong = call(None), call("not-the-token")
    assert missing.status_code == 401 and wrong.status_code == 403
    assert call(API_TOKEN).status_code in (200, 400)  # 400: the deliberately empty OIP request, past the token check
    assert call(TOKEN).status_code in (200, 400)  # the admin token opens inference too


def test_health_metrics_and_the_page_stay_public(server, http):
    for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/metrics", "/", "/favicon.ico"):
        assert http.get(path).status_code == 200, path


def test_grpc_needs_the_same_tokens(server):
    """Health and server metadata are public over gRPC as over REST; models and inference need the API
    token (or the admin token); the repository only the admin token."""
    import grpc

    from monaserve.server.oip_proto import grpc_service_pb2 as pb
    from monaserve.server.oip_proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub

    def status(call, request, token: str | None) -> grpc.StatusCode:
        try:
            call(request, metadata=(("authorization", f"Bearer {token}"),) if token else ())
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    with grpc.insecure_channel(f"127.0.0.1:{server.config.grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        for call, request in ((stub.ServerLive, pb.ServerLiveRequest()), (stub.ServerMetadata, pb.ServerMetadataRequest())):
            assert status(call, request, None) == grpc.StatusCode.OK
        model = (stub.ModelMetadata, pb.ModelMetadataRequest(name="pets"))
        assert [status(*model, token) for token in (None, "wrong", API_TOKEN, TOKEN)] == [
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.OK,
            grpc.StatusCode.OK,
        ]
        index = (stub.RepositoryIndex, pb.RepositoryIndexRequest())
        assert [status(*index, token) for token in (API_TOKEN, TOKEN)] == [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK]


def test_the_api_token_opens_no_admin_route(server, http):
    assert http.get("/v1/adapters", headers=bearer(API_TOKEN)).status_code == 403
    assert http.post("/v2/repository/index", headers=bearer(API_TOKEN)).status_code == 403
    assert http.get("/v1/adapters", headers=bearer(TOKEN)).status_code == 200


def test_cors_only_for_the_configured_origin(server, http, tmp_path, tiny_weights):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = http.options("/v1/tasks/pets/classify", headers=preflight)
    assert allowed.headers.get("access-control-allow-origin") == ORIGIN
    other = http.options("/v1/tasks/pets/classify", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    with InProcessServer(tiny_weights, tmp_path / "store") as default:  # CORS off by default
        answer = default.client(token=None).get("/v1/tasks", headers={"Origin": ORIGIN})
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_tokens_never_reach_the_log(server, http):
    for token in (TOKEN, API_TOKEN, "a-wrong-token-5678"):
        http.get("/v1/adapters", headers=bearer(token))
        http.post("/v1/tasks/pets/classify", content=image_bytes(0), headers={**JPEG, **bearer(token)})
    log = server.log()
    assert "/v1/adapters" in log or "pets" in log  # the log is being written
    for token in (TOKEN, API_TOKEN, "a-wrong-token-5678"):
        assert token not in log


class Listener:
    """A port on 127.0.0.1 that counts connections: a URL the server must never fetch."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/image.jpg"
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                self.socket.accept()[0].close()
                self.connections += 1
            except TimeoutError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.socket.close()


def body_fields(node, schema: dict, seen: frozenset = frozenset()) -> list[tuple[str, dict]]:
    """Every (name, spec) of an object property anywhere under `node`, following `$ref`s into `schema`."""
    if isinstance(node, list):
        return [f for item in node for f in body_fields(item, schema, seen)]
    if not isinstance(node, dict):
        return []
    found = []
    ref = node.get("$ref", "")
    if ref.startswith("#/components/schemas/") and ref not in seen:
        found += body_fields(schema["components"]["schemas"][ref.rsplit("/", 1)[1]], schema, seen | {ref})
    found += [(name, spec) for name, spec in node.get("properties", {}).items()]
    return found + [f for key, value in node.items() if key != "$ref" for f in body_fields(value, schema, seen)]


LOCATION = re.compile(r"url|uri|path|file|location|href|source|src", re.I)


def test_no_route_takes_a_location_and_none_is_fetched(server, http):
    schema = http.get("/openapi.json").json()
    named, fields = [], []
    for route, operations in schema["paths"].items():
        for method, operation in operations.items():
            named += [f"{method} {route}: {p['name']}" for p in operation.get("parameters", []) if LOCATION.search(p["name"])]
            fields += body_fields(operation.get("requestBody", {}), schema)
    named += [name for name, spec in fields if LOCATION.search(name) or spec.get("format") == "uri"]
    assert "images" in dict(fields) and named == []  # no parameter or request body field names a URL or a path

    listener = Listener()
    auth = bearer(TOKEN)
    try:
        url = listener.url.encode()
        answers = [
            http.post("/v1/tasks/pets/classify", json={"images": [listener.url]}, headers=auth),
            http.post("/v1/tasks/pets/classify", content=url, headers={**auth, "content-type": "text/uri-list"}),
            http.post("/v1/tasks/pets/classify", files={"image": ("/etc/passwd", url)}, headers=auth),
            http.post(
                "/v2/models/pets/infer",
                content=json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [listener.url]}]}),
                headers=auth,
            ),
            http.put("/v1/adapters/pets", content=url, headers=auth),
            http.put("/v1/adapters/pets", content=base64.b64encode(url), headers=auth),
        ]
        ignored = http.post("/v1/adapters/pets/load", json={"url": listener.url, "path": "/etc/passwd"}, headers=auth, timeout=60)
        time.sleep(0.5)
    finally:
        listener.close()
    assert [a.status_code for a in answers] == [400, 415, 415, 400, 422, 422], [a.text for a in answers]
    assert ignored.status_code == 200 and ignored.json()["name"] == "pets"  # unknown fields change nothing
    assert listener.connections == 0
    assert all("root:" not in a.text for a in [*answers, ignored])

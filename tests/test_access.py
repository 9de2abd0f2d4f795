"""Access control against a real server: inference behind --api-token, admin tokens, CORS, nothing secret logged."""

from __future__ import annotations

import httpx
import pytest

from helpers import random_package
from server_harness import TOKEN, ServerProcess, image_bytes

API_TOKEN = "inference-token-1234"
ORIGIN = "https://app.example.com"
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, shared_backbone):
    store = tmp_path_factory.mktemp("store")
    random_package(shared_backbone, "pets", seed=1).save(store / "pets" / "1.safetensors")
    log = tmp_path_factory.mktemp("log") / "log"
    env = {"MONASERVE_ADMIN_TOKEN": TOKEN, "MONASERVE_API_TOKEN": API_TOKEN}
    with ServerProcess(tiny_weights, store, "--cors-origins", ORIGIN, env=env, log=log) as server:
        yield server


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
def test_inference_needs_the_api_token(server, method, path, body):
    def call(token):
        return httpx.request(method, server.url + path, content=body, headers={**JPEG, **bearer(token)}, timeout=60)

    missing, wrong = call(None), call("not-the-token")
    assert missing.status_code == 401 and wrong.status_code == 403
    assert call(API_TOKEN).status_code in (200, 400)  # 400: the deliberately empty OIP request, past the token check
    assert call(TOKEN).status_code in (200, 400)  # the admin token opens inference too


def test_health_metrics_and_the_page_stay_public(server):
    for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/metrics", "/"):
        assert httpx.get(server.url + path).status_code == 200, path


def test_the_api_token_opens_no_admin_route(server):
    assert httpx.get(server.url + "/v1/adapters", headers=bearer(API_TOKEN)).status_code == 403
    assert httpx.post(server.url + "/v2/repository/index", headers=bearer(API_TOKEN)).status_code == 403
    assert httpx.get(server.url + "/v1/adapters", headers=bearer(TOKEN)).status_code == 200


def test_cors_only_for_the_configured_origin(server, tmp_path, tiny_weights):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(server.url + "/v1/tasks/pets/classify", headers=preflight)
    assert allowed.headers.get("access-control-allow-origin") == ORIGIN
    other = httpx.options(server.url + "/v1/tasks/pets/classify", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    with ServerProcess(tiny_weights, tmp_path / "store", log=tmp_path / "log") as default:  # CORS off by default
        answer = httpx.get(default.url + "/v1/tasks", headers={"Origin": ORIGIN})
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_tokens_never_reach_the_log(server):
    for token in (TOKEN, API_TOKEN, "a-wrong-token-5678"):
        httpx.get(server.url + "/v1/adapters", headers=bearer(token))
        httpx.post(server.url + "/v1/tasks/pets/classify", content=image_bytes(0), headers={**JPEG, **bearer(token)})
    log = server.log()
    assert "/v1/adapters" in log or "pets" in log  # the log is being written
    for token in (TOKEN, API_TOKEN, "a-wrong-token-5678"):
        assert token not in log

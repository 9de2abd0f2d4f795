"""A hostile client against a real server: every failure is a well-formed answer on a connection that
stays usable, work per request is bounded, and slow or half-open clients time out (docs/reliability.md)."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from monaserve.adapters import InputSpec
from monaserve.testing import FAULTS

from deploy_harness import require_tool
from helpers import random_package
from server_harness import MONASERVE, TOKEN, ServerProcess, free_port, image_bytes, serve_tasks

pytestmark = pytest.mark.process

FAULT_LAUNCHER = FAULTS
TASKS = {"cls": "classify", "seg": "segment"}
STRICT = (
    "--header-timeout-s",
    "1.5",
    "--body-timeout-s",
    "1.5",
    "--body-min-rate",
    "200",
    "--max-request-pixels",
    "2000000",
    "--max-response-mb",
    "1",
    "--max-body-buffer-mb",
    "1",
    "--max-connections",
    "30",
    "--keep-alive-s",
    "3",
    "--max-delay-ms",
    "1",
)


def empty_iccp_png() -> bytes:
    """A valid PNG with an empty iCCP chunk after IDAT: Pillow raises IndexError while loading it."""
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (200, 30, 30)).save(buffer, "PNG")
    png = buffer.getvalue()
    end = png.rindex(b"IEND") - 4
    return png[:end] + struct.pack(">I", 0) + b"iCCP" + struct.pack(">I", zlib.crc32(b"iCCP")) + png[end:]


@pytest.fixture(scope="module")
def server(front_ends, tmp_path_factory, tiny_weights, shared_backbone):
    """A server whose segment post-processing raises on /v1 and /v2 and whose engine holds its batches while
    `server.engine_gate` exists (both patched in its process by the tests' launcher), with tight limits and
    timeouts so each guard can be reached quickly."""
    gate = tmp_path_factory.mktemp("gate") / "engine"
    faults = [
        "monaserve.adapters.kinds.segment:Segment.to_json",
        "monaserve.adapters.transforms:Prepared.class_map_to_original",
        f"monaserve.server.scheduler:Scheduler._forward@{gate}",
    ]
    launcher = [*FAULT_LAUNCHER, ",".join(faults)]
    with serve_tasks(tmp_path_factory, tiny_weights, shared_backbone, TASKS, *STRICT, input_size=64, launcher=launcher) as server:
        server.engine_gate = gate
        yield server


@pytest.fixture(scope="module", params=["httptools", "h11"])
def guarded(request, tmp_path_factory, tiny_weights, shared_backbone):
    """A single-process server with the connection guards of STRICT, once per HTTP parser. (Connections
    are counted and timed per process: under --workers each front end applies the same rules to its own.)"""
    with serve_tasks(
        tmp_path_factory, tiny_weights, shared_backbone, TASKS, *STRICT, "--http", request.param, "--workers", "1", input_size=64
    ) as guarded_server:
        yield guarded_server


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def raw_request(method: str, path: str, body: bytes = b"", content_type: str = "image/jpeg") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response; got {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, headers, body


def closes_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sends before it closes `sock`, if it closes within `seconds` (else None)."""
    sock.settimeout(seconds)
    received = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        return received
    return None


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(http.get("/metrics").text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    """Poll `condition` until it holds; fail naming `what` was awaited if it does not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---- every failure is a well-formed answer on a connection that stays usable -------------------------


def test_an_internal_error_answers_500_json_and_the_connection_serves_the_next_request(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(raw_request("POST", "/v1/tasks/seg/segment", image_bytes(0)))
        status, headers, body = read_response(sock)
        assert status == 500 and json.loads(body) == {"error": "internal", "message": "internal error: RuntimeError"}
        assert headers.get("connection") != "close" and headers["x-monaserve-replica"]
        sock.sendall(raw_request("POST", "/v1/tasks/cls/classify", image_bytes(1)))
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["task"] == "cls"
        sock.sendall(
            raw_request(
                "POST",
                "/v2/models/seg/infer",
                json.dumps(
                    {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image_bytes(2)).decode()]}]}
                ).encode(),
                content_type="application/json",
            )
        )
        status, _, body = read_response(sock)
        assert status == 500 and json.loads(body) == {"error": "internal: internal error: RuntimeError"}
        sock.sendall(raw_request("GET", "/health/live"))
        assert read_response(sock)[0] == 200
    assert "injected fault" in server.log()  # logged, with its traceback, once per request


@pytest.mark.parametrize("route", ["multipart", "raw", "json", "oip-json", "oip-binary"])
def test_a_png_that_crashes_the_decoder_is_a_400_naming_the_image(http, route):
    data = empty_iccp_png()
    if route == "multipart":
        response = http.post("/v1/tasks/cls/classify", files={"image": ("x.png", data)})
    elif route == "raw":
        response = http.post("/v1/tasks/cls/classify", content=data, headers={"content-type": "image/png"})
    elif route == "json":
        response = http.post("/v1/tasks/cls/classify", json={"images": [base64.b64encode(data).decode()]})
    elif route == "oip-json":
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}]}
        response = http.post("/v2/models/cls/infer", json=body)
    else:
        header = json.dumps(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(data) + 4}}]}
        ).encode()
        response = http.post(
            "/v2/models/cls/infer",
            content=header + struct.pack("<I", len(data)) + data,
            headers={"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"},
        )
    assert response.status_code == 400, response.text
    message = response.json().get("message") or response.json()["error"]
    assert "image 0" in message and "IndexError" in message


OIP_IMAGE = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image_bytes(3)).decode()]}
HOSTILE_OIP = {
    "parameters is a list": {"inputs": [OIP_IMAGE], "parameters": ["top_k"]},
    "parameters is a string": {"inputs": [OIP_IMAGE], "parameters": "top_k=1"},
    "input parameters is a list": {"inputs": [{**OIP_IMAGE, "parameters": [1]}]},
    "input parameters is a string": {"inputs": [{**OIP_IMAGE, "parameters": "binary"}]},
    "datatype is a list": {"inputs": [{**OIP_IMAGE, "datatype": ["BYTES"]}]},
    "datatype is an object": {"inputs": [{**OIP_IMAGE, "datatype": {"t": "BYTES"}}]},
    "top_k has 400 digits": {"inputs": [OIP_IMAGE], "parameters": {"top_k": int("9" * 400)}},
    "min_score has 400 digits": {"inputs": [OIP_IMAGE], "parameters": {"min_score": int("9" * 400)}},
    "top_k is true": {"inputs": [OIP_IMAGE], "parameters": {"top_k": True}},
    "binary_data_output is a string": {"inputs": [OIP_IMAGE], "parameters": {"binary_data_output": "yes"}},
    "an output listed twice": {"inputs": [OIP_IMAGE], "outputs": [{"name": "scores"}, {"name": "scores"}]},
    "an output name is a list": {"inputs": [OIP_IMAGE], "outputs": [{"name": ["scores"]}]},
    "output parameters is a list": {"inputs": [OIP_IMAGE], "outputs": [{"name": "scores", "parameters": [True]}]},
    "shape holds true": {"inputs": [{**OIP_IMAGE, "shape": [True]}]},
    "binary_data_size is a string": {"inputs": [{**OIP_IMAGE, "parameters": {"binary_data_size": "9"}}]},
    "id is an object": {"inputs": [OIP_IMAGE], "id": {"a": 1}},
    "shape has a million dimensions": {"inputs": [{**OIP_IMAGE, "shape": [2] * 1_000_000}]},
    "shape has a 300-digit dimension": {"inputs": [{**OIP_IMAGE, "shape": [10**300]}]},
    "an empty shape with huge dimensions": {"inputs": [{**OIP_IMAGE, "shape": [0, 2821, 67139, 83249], "data": []}]},
    "binary and empty with huge dimensions": {
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [0, 90000, 90000, 3], "data": []}],
    },
}


@pytest.mark.parametrize("case", sorted(HOSTILE_OIP))
def test_malformed_oip_requests_are_400s(http, case):
    response = http.post("/v2/models/cls/infer", content=json.dumps(HOSTILE_OIP[case]), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert list(response.json()) == ["error"] and len(response.json()["error"]) < 300


def test_a_client_that_leaves_mid_body_is_a_499_in_one_log_line(server, http):
    before = metric(http, "monaserve_requests_total", task="cls", status="499")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(raw_request("POST", "/v1/tasks/cls/classify", b"x" * 1000)[:-600])
    deadline = time.monotonic() + 10
    while metric(http, "monaserve_requests_total", task="cls", status="499") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(http, "monaserve_requests_total", task="cls", status="499") == before + 1
    lines = [line for line in server.log().splitlines() if "the client left after sending" in line]
    assert len(lines) == 1 and "Traceback" not in server.log().split(lines[0])[1][:200]


def test_work_for_a_client_that_left_never_reaches_the_engine(server, http):
    """A request queued behind a batch the engine holds, whose client leaves: its image is dropped, counted,
    and the request is a 499; the held batch is served once the engine goes on."""
    dropped = metric(http, "monaserve_dropped_images_total")
    gate, held = server.engine_gate, server.engine_gate.with_name(server.engine_gate.name + ".held")
    gate.touch()
    answers = []
    try:
        busy = [("image", (f"{i}.jpg", image_bytes(10 + i))) for i in range(4)]
        blocker = threading.Thread(target=lambda: answers.append(httpx.post(f"{server.url}/v1/tasks/cls/classify", files=busy, timeout=60)))
        blocker.start()
        wait_until(held.exists, "the engine to hold the first batch")
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(raw_request("POST", "/v1/tasks/cls/classify", image_bytes(30)))
            wait_until(lambda: metric(http, "monaserve_queue_depth") == 1, "the second request to queue behind it")
        wait_until(lambda: "the client left before its answer" in server.log(), "the server to see the client leave")
    finally:
        gate.unlink()
    blocker.join()
    assert answers[0].status_code == 200
    wait_until(lambda: metric(http, "monaserve_dropped_images_total") == dropped + 1, "the queued image to be dropped")
    assert metric(http, "monaserve_queue_depth") == 0


# ---- work per request is bounded ----------------------------------------------------------------------


def test_duplicate_outputs_and_oversized_answers_are_refused(http):
    flat = Image.fromarray(np.repeat(np.linspace(0, 255, 1200, dtype=np.uint8)[None, :, None], 900, 0).repeat(3, 2))
    buffer = io.BytesIO()
    flat.save(buffer, "JPEG")
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(buffer.getvalue()).decode()]}
    twice = http.post("/v2/models/seg/infer", json={"inputs": [image], "outputs": [{"name": "mask"}] * 50})
    assert twice.status_code == 400 and "requested twice" in twice.json()["error"]
    # one 1200x900 mask in binary is 1.08 MB: over this server's --max-response-mb 1, refused before it is built
    big = http.post("/v2/models/seg/infer", json={"inputs": [image], "outputs": [{"name": "mask", "parameters": {"binary_data": True}}]})
    assert big.status_code == 400 and "--max-response-mb" in big.json()["error"], big.text


def test_a_request_over_its_pixel_budget_is_refused_before_decoding(http):
    files = [("image", (f"{i}.png", image_bytes(i, size=(1200, 1000), fmt="PNG"))) for i in range(2)]  # 2.4 MP > 2 MP
    response = http.post("/v1/tasks/cls/classify", files=files)
    assert response.status_code == 413 and "--max-request-pixels" in response.json()["message"]
    assert http.post("/v1/tasks/cls/classify", files=files[:1]).status_code == 200


def test_bodies_held_at_once_are_bounded(server, http, shared_backbone):
    """A body that would take the bytes held past --max-body-buffer-mb (1 MiB) waits for nothing: 503
    with Retry-After, before its body is sent; once the first body is done, the same request is served."""
    with socket.create_connection(("127.0.0.1", server.port)) as holder:
        holder.sendall(raw_request("POST", "/v1/tasks/cls/classify", b"\xff" * 800_000)[:-100_000])  # 700 KB held
        time.sleep(0.3)
        second = http.post("/v1/tasks/cls/classify", content=b"\xff" * 500_000, headers={"content-type": "image/jpeg"})
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert second.json()["error"] == "overloaded" and "--max-body-buffer-mb" in second.json()["message"]
        package = random_package(shared_backbone, "uploaded", seed=5, input=InputSpec(size=(64, 64))).to_bytes()
        upload = http.put("/v1/adapters/uploaded", content=package, headers={"Authorization": f"Bearer {TOKEN}"})
        assert upload.status_code == 201, upload.text  # a package upload has a budget of its own
    time.sleep(0.3)
    again = http.post("/v1/tasks/cls/classify", content=b"\xff" * 500_000, headers={"content-type": "image/jpeg"})
    assert again.status_code == 415  # the budget is free again: the bytes are read, and are not an image


def test_a_slow_body_holds_only_what_it_has_sent(server, http):
    """A body that declares 900 KB but has sent 100 KB holds 100 KB of the budget, not 900: another
    500 KB body fits."""
    with socket.create_connection(("127.0.0.1", server.port)) as holder:
        holder.sendall(raw_request("POST", "/v1/tasks/cls/classify", b"\xff" * 900_000)[:-800_000])
        time.sleep(0.3)
        other = http.post("/v1/tasks/cls/classify", content=b"\xff" * 500_000, headers={"content-type": "image/jpeg"})
        assert other.status_code == 415, other.text


def test_a_body_that_slows_to_a_trickle_after_a_fast_start_gets_a_408(server):
    """600 KB at once, then a byte every 0.4 s: the first window is paid, the next is not (the rate is
    measured per --body-timeout-s window, so a fast start buys no time)."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        request = raw_request("POST", "/v1/tasks/cls/classify", b"x" * 700_000)
        sock.sendall(request[:-100_000])
        answer, started = b"", time.monotonic()
        sock.settimeout(0.4)
        while time.monotonic() - started < 10 and not answer:
            try:
                sock.sendall(b"x")
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer[:200]


# ---- slow and half-open clients time out --------------------------------------------------------------


def test_headers_that_never_finish_are_cut_off(guarded):
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n")
        answer = closes_within(sock, 10)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408") and b"header_timeout" in answer
    with socket.create_connection(("127.0.0.1", guarded.port)) as idle:  # nothing sent at all: closed too
        assert closes_within(idle, 10) == b""


def test_headers_sent_a_byte_at_a_time_are_cut_off(guarded):
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        started = time.monotonic()
        try:
            for byte in b"GET /health/live HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.25)
                if time.monotonic() - started > 10:
                    break
        except OSError:
            pass  # closed under us: what we want
        assert closes_within(sock, 10) is not None


def test_a_body_sent_a_byte_at_a_time_gets_a_408_and_the_connection_closes(server, http):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(raw_request("POST", "/v1/tasks/cls/classify", b"x" * 500)[:-500])
        answer, started = b"", time.monotonic()
        sock.settimeout(0.25)
        while time.monotonic() - started < 10:
            try:
                sock.sendall(b"x")
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            except TimeoutError:
                continue
            except OSError:
                break
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"body_timeout" in answer and b"connection: close" in answer.lower()
    assert metric(http, "monaserve_requests_total", task="cls", status="408") >= 1


def test_an_answered_body_that_never_ends_is_cut_off(guarded):
    """An upload without a token is answered 401 before its body is read; the rest must then arrive
    within --body-timeout-s, or the connection closes."""
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"PUT /v1/adapters/cls HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 100)
        status, _, _ = read_response(sock)
        assert status == 401
        assert closes_within(sock, 10) == b""


def test_an_admin_call_is_judged_before_its_body_by_whichever_process_takes_it(server, http):
    """Under --workers a front end passes admin calls to the engine process, but checks the token first:
    an upload without one is a 401 while most of its body is unsent; with one, the engine answers."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"PUT /v1/adapters/cls HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 100)
        status, _, body = read_response(sock)
    assert status == 401 and json.loads(body)["error"] == "unauthorized"
    listing = http.get("/v1/adapters", headers={"Authorization": f"Bearer {TOKEN}"})
    assert listing.status_code == 200 and listing.json()["device"]["slots"] > 0


def test_an_answered_body_then_an_idle_connection_closes_after_the_keep_alive(guarded):
    """A body answered early (405) and then sent in full leaves a kept-alive connection with nothing on
    it: it closes after --keep-alive-s (3 s here) like any other."""
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"POST /health/live HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\n")
        assert read_response(sock)[0] == 405
        sock.sendall(b"0123456789")
        assert closes_within(sock, 10) == b""


def test_at_the_connection_cap_an_idle_connection_makes_room(guarded):
    """30 kept-alive connections with no request on them: a 31st connection's request is served, and
    the connection idle the longest is the one closed."""
    idle = []
    try:
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", guarded.port))
            sock.sendall(raw_request("GET", "/health/live"))
            assert read_response(sock)[0] == 200
            idle.append(sock)
        with socket.create_connection(("127.0.0.1", guarded.port)) as extra:
            extra.sendall(raw_request("GET", "/health/live"))
            assert read_response(extra)[0] == 200
        assert closes_within(idle[0], 5) == b""
    finally:
        for sock in idle:
            sock.close()


def test_past_the_connection_cap_requests_get_503_and_capacity_returns(guarded):
    """Refused requests, with a body or asking for an upgrade, get the 503 and leave nothing in the log."""
    logged = len(guarded.log())
    idle = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(30)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", guarded.port)) as extra:
            extra.sendall(raw_request("GET", "/health/live"))
            status, headers, body = read_response(extra)
        assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["error"] == "too_many_connections"
        upgrade = b"GET /health/live HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        for request in (raw_request("POST", "/v1/tasks/cls/classify", b"x" * 1000), upgrade):
            with socket.create_connection(("127.0.0.1", guarded.port)) as extra:
                extra.sendall(request)
                assert read_response(extra)[0] == 503
        time.sleep(0.2)
        assert guarded.log()[logged:].strip() == "", guarded.log()[logged:]
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(guarded.url + "/health/live").status_code == 200


# ---- small things ----------------------------------------------------------------------------------


def test_no_slash_redirects(http):
    for path in ["/v1/tasks/%2e%2e%2f", "/v1/tasks/", "/v1/adapters/", "/docs/"]:
        response = http.get(path, headers={"Host": "evil.example"})
        assert response.status_code == 404 and "location" not in response.headers
        assert "evil.example" not in response.text and response.json()["error"] == "http_404"


@pytest.mark.parametrize("variable", ["MONASERVE_ADMIN_TOKEN", "MONASERVE_API_TOKEN"])
def test_an_empty_token_refuses_to_start(tmp_path, variable):
    done = subprocess.run(
        [MONASERVE, "serve", "--random-init", "--store", str(tmp_path)],
        env={**os.environ, variable: " "},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "is set but empty" in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.process
def test_without_an_admin_token_one_warning_says_so_and_probes_stay_out_of_the_access_log(tmp_path, tiny_weights, shared_backbone):
    store = tmp_path / "store"
    random_package(shared_backbone, "pets", seed=1).save(store / "pets" / "1.safetensors")
    with ServerProcess(tiny_weights, store, log=tmp_path / "log") as server, server.client(token=None) as client:
        for _ in range(3):
            assert client.get("/health/live").status_code == client.get("/v2/health/ready").status_code == 200
        assert client.post("/v1/tasks/pets/classify", content=image_bytes(0), headers={"content-type": "image/jpeg"}).status_code == 200
        unknown = client.post("/v1/tasks/nope/classify", content=image_bytes(0), headers={"content-type": "image/jpeg"})
    log = server.log()
    assert log.count("the admin API is off") == 1 and "--admin-token" in log
    assert "POST /v1/tasks/pets/classify" in log and "/health/" not in log, log[-2000:]
    assert unknown.status_code == 404 and "the tasks are pets (GET /v1/tasks)" in unknown.json()["message"]


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_a_busy_port_refuses_to_start_at_once_in_one_line(tmp_path, flag):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        other = {"--port": "--grpc-port", "--grpc-port": "--port"}[flag]
        done = subprocess.run(
            [MONASERVE, "serve", "--random-init", "--store", str(tmp_path), flag, str(busy), other, str(free_port())],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2 and f"give another {flag}" in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.slow
def test_at_the_descriptor_limit_the_log_stays_small_and_the_server_recovers(tmp_path_factory, tiny_weights, shared_backbone):
    """With 300 descriptors and 400 connections held open, the server refuses what it cannot take, logs
    a bounded amount, and answers again once the connections close."""
    launcher = [require_tool("prlimit"), "--nofile=300:300"]
    with serve_tasks(
        tmp_path_factory, tiny_weights, shared_backbone, {"cls": "classify"}, "--header-timeout-s", "30", input_size=64, launcher=launcher
    ) as server:
        logged = server.log_path.stat().st_size
        held = []
        for _ in range(400):
            try:
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=2)
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n")
                held.append(sock)
            except OSError:
                break
        time.sleep(4)
        grown = server.log_path.stat().st_size - logged
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(server.url + "/health/live", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(server.url + "/health/live", timeout=5).status_code == 200
    assert grown < 64 * 1024, f"{grown} bytes of log in 4 s"

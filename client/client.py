"""`MonaClient` and `AsyncMonaClient`: monaserve's HTTP API as Python calls, with typed results and retries.

Both clients build the same requests and share the retry policy; only the sending differs. Every call is
retried on 503 (honouring Retry-After) and when no connection could be made; inference also when the
connection broke before an answer (a replica went away). A timeout is never retried: the request may
still be running, and sending it again would add load exactly when the server is slow.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .errors import MonaConnectionError, MonaServerError
from .images import ImageInput, encode_image
from .results import Result, parse_results

DEFAULT_URL = "http://127.0.0.1:8000"
METADATA_KEY = "monaserve.manifest"


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `attempts` tries; waits Retry-After when the server sends it, else exponential backoff with jitter."""

    attempts: int = 4
    backoff_s: float = 0.25
    max_backoff_s: float = 10.0

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None and math.isfinite(retry_after_s):
            return min(max(retry_after_s, 0.0), self.max_backoff_s)
        return min(self.backoff_s * 2**attempt, self.max_backoff_s) * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Call:
    """One HTTP request, described before it is sent (so both clients send it the same way)."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    content: bytes | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    json_body: Any = None
    idempotent: bool = True

    def kwargs(self) -> dict[str, Any]:
        params = {k: v for k, v in self.params.items() if v is not None}
        return {"params": params, "content": self.content, "files": self.files, "headers": self.headers, "json": self.json_body}

    def retry_after_error(self, error: httpx.TransportError) -> bool:
        """Send again after a failed connection; inference also after a connection that broke mid-way."""
        if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
            return True
        return self.idempotent and isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError))


def infer_call(task: str, kind: str, images: Sequence[ImageInput], **params: Any) -> Call:
    """One image as a raw body; several as multipart `image` fields."""
    encoded = [encode_image(image) for image in images]
    path = f"/v1/tasks/{task}/{kind}"
    if len(encoded) == 1:
        data, content_type = encoded[0]
        return Call("POST", path, params, content=data, headers={"content-type": content_type})
    files = [("image", (f"image-{i}", data, content_type)) for i, (data, content_type) in enumerate(encoded)]
    return Call("POST", path, params, files=files)


def upload_call(package: str | Path | bytes, task: str | None, version: int | None) -> Call:
    """An admin upload of a package file as `task` (default: its manifest's name) at `version` (default: the next)."""
    data = read_package(package)
    return _Calls._admin("PUT", f"/{task or package_task(data)}", params={"version": version}, content=data)


def package_task(data: bytes) -> str:
    """The task name in an adapter package's manifest, read from its safetensors header."""
    if len(data) < 8:
        raise ValueError("not an adapter package: shorter than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + length])
        return json.loads(header["__metadata__"][METADATA_KEY])["name"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("not an adapter package: no monaserve manifest in its header") from None


def checked(response: httpx.Response) -> Any:
    """The JSON body of a success, or `MonaServerError` with the server's code and message."""
    if response.is_success:
        return response.json() if response.content else None
    try:
        body = response.json()
        code, message = str(body.get("error", "")), str(body.get("message", body.get("error", "")))
    except ValueError:
        code, message = f"http_{response.status_code}", response.text[:500]
    raise MonaServerError(response.status_code, code or f"http_{response.status_code}", message, retry_after(response))


def retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def as_list(images: ImageInput | Sequence[ImageInput]) -> tuple[list[ImageInput], bool]:
    """The images as a list, and whether the caller passed a list (then it gets a list back)."""
    if isinstance(images, (list, tuple)):
        return list(images), True
    return [images], False


def read_package(package: str | Path | bytes) -> bytes:
    return bytes(package) if isinstance(package, (bytes, bytearray)) else Path(package).read_bytes()


class _Calls:
    """The API as `Call`s; each client turns a call into a response with `_send`."""

    def __init__(self, base_url: str, token: str | None, timeout: float, retry: RetryPolicy) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout, self.retry = timeout, retry

    def _next_delay(self, call: Call, attempt: int, outcome: httpx.Response | httpx.TransportError) -> float | None:
        """Seconds to wait before sending `call` again after `outcome`; None: this outcome is final."""
        if attempt >= self.retry.attempts - 1:
            return None
        if isinstance(outcome, httpx.TransportError):
            return self.retry.delay(attempt, None) if call.retry_after_error(outcome) else None
        return self.retry.delay(attempt, retry_after(outcome)) if outcome.status_code == 503 else None

    def _finish(self, call: Call, outcome: httpx.Response | httpx.TransportError) -> Any:
        if isinstance(outcome, httpx.TransportError):
            raise MonaConnectionError(f"{call.method} {self.base_url}{call.path}: {outcome!r}") from outcome
        return checked(outcome)

    @staticmethod
    def _results(body: dict, single: bool) -> Result | list[Result]:
        results = parse_results(body)
        return results if not single else results[0]

    @staticmethod
    def _admin(method: str, path: str, **kwargs: Any) -> Call:
        return Call(method, "/v1/adapters" + path, idempotent=False, **kwargs)


class MonaClient(_Calls):
    """A blocking client: `MonaClient("http://host:8000").classify("pets", "cat.jpg").best.label`."""

    def __init__(
        self, base_url: str = DEFAULT_URL, token: str | None = None, timeout: float = 60.0, retry: RetryPolicy = RetryPolicy()
    ) -> None:
        super().__init__(base_url, token, timeout, retry)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def _send(self, call: Call) -> Any:
        for attempt in itertools.count():
            try:
                outcome = self._http.request(call.method, call.path, **call.kwargs())
            except httpx.TransportError as exc:
                outcome = exc
            delay = self._next_delay(call, attempt, outcome)
            if delay is None:
                return self._finish(call, outcome)
            time.sleep(delay)

    def predict(self, task: str, images: ImageInput | Sequence[ImageInput], kind: str | None = None, **params: Any):
        """Run `images` through `task`; `kind` defaults to the task's own. One image in, one result out;
        a list in, a list out (all from one adapter version)."""
        images, many = as_list(images)
        return self._results(self.predict_json(task, images, kind, **params), not many)

    def predict_json(self, task: str, images: ImageInput | Sequence[ImageInput], kind: str | None = None, **params: Any) -> dict:
        """`predict`'s answer as the server sent it: task, kind, version, results and timings_ms."""
        images, _ = as_list(images)
        kind = kind or self.task(task)["kind"]
        return self._send(infer_call(task, kind, images, **params))

    def classify(self, task: str, images, top_k: int = 5, version: int | None = None):
        return self.predict(task, images, "classify", top_k=top_k, version=version)

    def detect(
        self,
        task: str,
        images,
        *,
        min_score: float | None = None,
        max_detections: int | None = None,
        class_agnostic: bool | None = None,
        version: int | None = None,
    ):
        """Boxes scoring `min_score` or more, at most `max_detections` per image, one per object with
        `class_agnostic` (None: the task's defaults)."""
        params = {"min_score": min_score, "max_detections": max_detections, "class_agnostic": class_agnostic}
        return self.predict(task, images, "detect", version=version, **params)

    def segment(self, task: str, images, version: int | None = None):
        return self.predict(task, images, "segment", version=version)

    def task(self, name: str) -> dict:
        """Public facts about a task: kind, labels, versions, input size."""
        return self._send(Call("GET", f"/v1/tasks/{name}"))

    def tasks(self) -> list[dict]:
        return self._send(Call("GET", "/v1/tasks"))

    def list(self) -> dict:
        """Admin: tasks, versions, where each is loaded, device slots and cache."""
        return self._send(self._admin("GET", ""))

    def upload(self, package: str | Path | bytes, task: str | None = None, version: int | None = None) -> dict:
        """Admin: upload a package (its task name comes from its manifest unless given) as `version`
        (default: the task's next); the answer's `version` says which it was stored as."""
        return self._send(upload_call(package, task, version))

    def load(self, task: str, version: int | None = None) -> dict:
        return self._send(self._admin("POST", f"/{task}/load", params={"version": version}))

    def unload(self, task: str, purge: bool = False) -> dict:
        return self._send(self._admin("DELETE", f"/{task}", params={"purge": str(purge).lower()}))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MonaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMonaClient(_Calls):
    """The asyncio twin of `MonaClient`: the same methods, awaited."""

    def __init__(
        self, base_url: str = DEFAULT_URL, token: str | None = None, timeout: float = 60.0, retry: RetryPolicy = RetryPolicy()
    ) -> None:
        super().__init__(base_url, token, timeout, retry)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout)

    async def _send(self, call: Call) -> Any:
        for attempt in itertools.count():
            try:
                outcome = await self._http.request(call.method, call.path, **call.kwargs())
            except httpx.TransportError as exc:
                outcome = exc
            delay = self._next_delay(call, attempt, outcome)
            if delay is None:
                return self._finish(call, outcome)
            await asyncio.sleep(delay)

    async def predict(self, task: str, images: ImageInput | Sequence[ImageInput], kind: str | None = None, **params: Any):
        images, many = as_list(images)
        return self._results(await self.predict_json(task, images, kind, **params), not many)

    async def predict_json(self, task: str, images: ImageInput | Sequence[ImageInput], kind: str | None = None, **params: Any) -> dict:
        images, _ = as_list(images)
        kind = kind or (await self.task(task))["kind"]
        return await self._send(infer_call(task, kind, images, **params))

    async def classify(self, task: str, images, top_k: int = 5, version: int | None = None):
        return await self.predict(task, images, "classify", top_k=top_k, version=version)

    async def detect(
        self,
        task: str,
        images,
        *,
        min_score: float | None = None,
        max_detections: int | None = None,
        class_agnostic: bool | None = None,
        version: int | None = None,
    ):
        """Boxes scoring `min_score` or more, at most `max_detections` per image, one per object with
        `class_agnostic` (None: the task's defaults)."""
        params = {"min_score": min_score, "max_detections": max_detections, "class_agnostic": class_agnostic}
        return await self.predict(task, images, "detect", version=version, **params)

    async def segment(self, task: str, images, version: int | None = None):
        return await self.predict(task, images, "segment", version=version)

    async def task(self, name: str) -> dict:
        return await self._send(Call("GET", f"/v1/tasks/{name}"))

    async def tasks(self) -> list[dict]:
        return await self._send(Call("GET", "/v1/tasks"))

    async def list(self) -> dict:
        return await self._send(self._admin("GET", ""))

    async def upload(self, package: str | Path | bytes, task: str | None = None, version: int | None = None) -> dict:
        return await self._send(upload_call(package, task, version))

    async def load(self, task: str, version: int | None = None) -> dict:
        return await self._send(self._admin("POST", f"/{task}/load", params={"version": version}))

    async def unload(self, task: str, purge: bool = False) -> dict:
        return await self._send(self._admin("DELETE", f"/{task}", params={"purge": str(purge).lower()}))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMonaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

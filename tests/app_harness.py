"""The real app in this process: `create_app` over a `Runtime`, driven through Starlette's TestClient
(httpx over ASGI, the app's lifespan included). For API logic: routes, validation, tokens, errors,
limits. What needs a process of its own (signals, raw sockets, nginx, a browser) uses
`server_harness.ServerProcess`; both offer `client(token)`, `log()` and `store`.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from monaserve.server.app import create_app
from monaserve.server.config import ServeConfig
from monaserve.server.runtime import Runtime

from server_harness import TOKEN, store_with_tasks


class TokenClient:
    """One caller's view of the shared TestClient: every request carries its bearer token (or none)."""

    def __init__(self, client: TestClient, token: str | None) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def request(self, method: str, url: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        kwargs.pop("timeout", None)  # the app runs in this process: the request timeout is the server's
        return self._client.request(method, url, headers={**self._headers, **(headers or {})}, **kwargs)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)

    def options(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("OPTIONS", url, **kwargs)

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class InProcessServer:
    """`monaserve serve` with `options` (ServeConfig fields) as an app in this process; enter it to start.
    With `serve_grpc`, its gRPC server listens on `options["grpc_port"]` too."""

    def __init__(self, weights: Path, store: Path, serve_grpc: bool = False, **options: Any) -> None:
        self.store = store
        self.serve_grpc = serve_grpc
        self.config = ServeConfig(weights=str(weights), store=str(store), **options)
        self.config.check()
        self.runtime = Runtime(self.config)
        self._log = io.StringIO()
        self._handler = logging.StreamHandler(self._log)
        self._handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def __enter__(self) -> InProcessServer:
        logger = logging.getLogger("monaserve")
        logger.addHandler(self._handler)
        logger.setLevel(logging.INFO)
        self._client = TestClient(create_app(self.runtime, serve_grpc=self.serve_grpc), raise_server_exceptions=False)
        self._client.__enter__()  # the lifespan: start-up runs in the background, as under uvicorn
        deadline = time.monotonic() + 120
        while self._client.get("/health/ready").status_code != 200:
            if self.runtime.state == "failed" or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the app did not start ({self.runtime.state}: {self.runtime.error}):\n{self.log()}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.__exit__(None, None, None)
        logging.getLogger("monaserve").removeHandler(self._handler)

    def client(self, token: str | None = TOKEN, timeout: float = 60.0) -> TokenClient:
        return TokenClient(self._client, token)

    def log(self) -> str:
        return self._log.getvalue()

    def rss_bytes(self) -> int:
        """This process's resident memory now (the app's and the tests')."""
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/self/status")


def app_with_tasks(
    tmp_path_factory, weights: Path, backbone, tasks: dict[str, str], input_size: int | None = None, **options: Any
) -> InProcessServer:
    """An in-process server (enter it to start) with the admin token, over `store_with_tasks`."""
    store = store_with_tasks(tmp_path_factory, backbone, tasks, input_size)
    return InProcessServer(weights, store, **{"admin_token": TOKEN, **options})

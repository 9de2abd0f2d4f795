"""The model repository extension's three calls (index, load, unload), for REST and gRPC alike: here in
the process that holds the registry (`LocalRepository`), or from a front end under `--workers`, asked of
the engine process over its private socket (`EngineRepository`), as REST admin calls are forwarded."""

from __future__ import annotations

from typing import Any, Protocol

import httpx

from .dataplane import DataPlane
from .errors import BadRequest, ServeError
from .oip_codec import short_repr
from .oip_models import repository_index
from .remote_engine import engine_gone

REFUSED_PARAMETERS: dict[str, str] = {
    "config": "a model's configuration comes from its adapter package: upload a new version (PUT /v1/adapters/{name}/versions/N)",
    "file:": "adapter files are uploaded as packages (PUT /v1/adapters/{name}/versions/N), never with a load",
}
"""Triton's load parameters, refused with the reason; `unload_dependents` is accepted (a task has no dependents)."""


def check_parameters(name: str, parameters: dict[str, Any], action: str) -> None:
    """A load's or unload's parameters: `unload_dependents` (a flag) on unloads, nothing else; 400 naming why."""
    for key, value in parameters.items():
        refused = REFUSED_PARAMETERS.get(key.split(":", 1)[0] + ":" if ":" in key else key)  # file:<path> is one family
        if refused is not None:
            raise BadRequest(f"{action} parameter {short_repr(key)} is not supported: {refused.format(name=name)}")
        if action == "unload" and key == "unload_dependents":
            if not isinstance(value, bool):
                raise BadRequest(f"parameter 'unload_dependents' must be true or false; got {short_repr(value)}")
            continue
        raise BadRequest(f"unknown {action} parameter {short_repr(key)}")


class Repository(Protocol):
    async def index(self, only_ready: bool) -> list[dict]:
        """Every stored version of every task, and its state (only READY ones if `only_ready`)."""
        ...

    async def load(self, name: str, parameters: dict[str, Any]) -> None:
        """Serve `name` again, at its newest version."""
        ...

    async def unload(self, name: str, parameters: dict[str, Any]) -> None:
        """Stop serving `name` (every replica, across restarts) until it is loaded again."""
        ...


class LocalRepository:
    """The calls on this process's registry."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def index(self, only_ready: bool) -> list[dict]:
        await self.plane.registry.refresh()
        return repository_index(self.plane.tasks(), only_ready)

    async def load(self, name: str, parameters: dict[str, Any]) -> None:
        check_parameters(name, parameters, "load")
        await self.plane.registry.load(name)

    async def unload(self, name: str, parameters: dict[str, Any]) -> None:
        check_parameters(name, parameters, "unload")
        await self.plane.registry.unload(name)


class EngineRepository:
    """The calls asked of the engine process's `/v2/repository` routes with the caller's `authorization`,
    which the engine process checks again; its errors are raised here with its status."""

    def __init__(self, client: httpx.AsyncClient, authorization: str | None) -> None:
        self.client = client
        self.headers = {"authorization": authorization} if authorization else {}

    async def index(self, only_ready: bool) -> list[dict]:
        return (await self._call("/v2/repository/index", {"ready": only_ready})).json()

    async def load(self, name: str, parameters: dict[str, Any]) -> None:
        check_parameters(name, parameters, "load")  # here: a bytes value has no JSON form to send
        await self._call(f"/v2/repository/models/{name}/load", {})

    async def unload(self, name: str, parameters: dict[str, Any]) -> None:
        check_parameters(name, parameters, "unload")
        await self._call(f"/v2/repository/models/{name}/unload", {"parameters": parameters})

    async def _call(self, path: str, body: dict) -> httpx.Response:
        try:
            response = await self.client.post(path, json=body, headers=self.headers)
        except httpx.HTTPError as exc:
            raise engine_gone(type(exc).__name__) from None
        if response.status_code >= 400:
            code, _, message = response.json().get("error", "").partition(": ")
            raise ServeError.answered(response.status_code, code, message)
        return response

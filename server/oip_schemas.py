"""Bodies of the Open Inference Protocol's REST routes, as the protocol's text defines them (for OpenAPI
and typed clients; the routes build the same JSON)."""

from __future__ import annotations

from pydantic import BaseModel


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool

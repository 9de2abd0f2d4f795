"""The base of every model a package declares: frozen, and refusing fields it does not know."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A frozen pydantic model that rejects unknown fields (a typo in a package is an error, not a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

"""The adapter manifest: what a task package declares about itself, validated by pydantic."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Union

from pydantic import AwareDatetime, Field, StringConstraints, field_validator, model_validator

from .kinds import KINDS
from .mona import INNER_DIM
from .strict import Strict
from .transforms import InputSpec

FORMAT = "monaserve.adapter/1"
TASK_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"

TaskName = Annotated[str, StringConstraints(pattern=TASK_NAME_PATTERN)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def validate_task_name(name: str) -> str:
    """Return `name` if it is a valid task name, else raise ValueError saying what is allowed."""
    if not isinstance(name, str) or not re.fullmatch(TASK_NAME_PATTERN, name):
        raise ValueError(f"invalid task name {name!r}: use 1-64 characters from a-z, 0-9, '_' and '-', starting with a letter or digit")
    return name


class BackboneRef(Strict):
    """The exact backbone an adapter was trained on."""

    name: str = Field(min_length=1, max_length=128)
    fingerprint: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")


HeadConfig = Annotated[Union[tuple(kind.head_config for kind in KINDS.values())], Field(discriminator="type")]  # noqa: UP007 (from the registered kinds)
KindName = Literal[tuple(KINDS)]


class Manifest(Strict):
    """Header metadata of one adapter package (one task, one version)."""

    format: Literal["monaserve.adapter/1"] = FORMAT
    name: TaskName
    version: int = Field(ge=1, le=2**31 - 1)
    kind: KindName
    labels: list[Label] = Field(min_length=1, max_length=max(kind.max_labels for kind in KINDS.values()))
    backbone: BackboneRef
    mona_inner_dim: int = Field(default=INNER_DIM, ge=1, le=1024)
    input: InputSpec
    head: HeadConfig = Field(description="defaults to the kind's head")
    created_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    training: dict[str, Any] = Field(default_factory=dict, description="training summary and evaluation")

    @model_validator(mode="before")
    @classmethod
    def _default_head(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("head") is None and data.get("kind") in KINDS:
            data = {**data, "head": KINDS[data["kind"]].head_config().model_dump()}
        return data

    @model_validator(mode="after")
    def _head_fits_kind(self) -> Manifest:
        kind = KINDS[self.kind]
        if not isinstance(self.head, kind.head_config):
            raise ValueError(f"a {self.kind} task needs a {kind.head_config().type!r} head, not {self.head.type!r}")
        if len(self.labels) > kind.max_labels:
            raise ValueError(f"a {self.kind} task has at most {kind.max_labels} classes")
        return self

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        seen: set[str] = set()
        duplicates = sorted({label for label in labels if label in seen or seen.add(label)})
        if duplicates:
            raise ValueError(f"labels must be unique; repeated: {duplicates[:5]}")
        return labels

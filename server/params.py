"""A route's path and query parameters read as one pydantic model, in one validation pass.

FastAPI validates each declared parameter on its own; on the inference route that was a fifth of the
event loop's time per request (py-spy, `bench/frontend_bench.py`'s 32-px PNG run). Hot routes take
the `Request` and call `Params.read(request)` instead: the errors are FastAPI's own
(`RequestValidationError`, located in `path` or `query`), and `openapi_parameters` documents the same
parameters in the route's OpenAPI entry.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError


class RouteParams(BaseModel):
    """Path parameters (named in `path_fields`) and query parameters, validated together."""

    path_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def read(cls, request: Request) -> Self:
        """The parameters of `request` (a query parameter given twice counts once, its last value, as in FastAPI)."""
        try:
            return cls.model_validate({**request.query_params, **request.path_params})
        except ValidationError as exc:
            errors = [{**error, "loc": (cls._place(error["loc"][0]), *error["loc"])} for error in exc.errors(include_url=False)]
            raise RequestValidationError(errors) from None

    @classmethod
    def _place(cls, field: Any) -> str:
        return "path" if field in cls.path_fields else "query"

    @classmethod
    def openapi_parameters(cls) -> list[dict]:
        """The parameters as an OpenAPI operation lists them."""
        schema = cls.model_json_schema()
        if "$defs" in schema:  # a parameter's schema must stand alone in the operation
            raise TypeError(f"{cls.__name__}: route parameters must be plain types, not models or enums")
        required = set(schema.get("required", ()))
        return [
            {
                "name": name,
                "in": cls._place(name),
                "required": name in cls.path_fields or name in required,
                "schema": {k: v for k, v in field.items() if k != "description"},
                **({"description": field["description"]} if "description" in field else {}),
            }
            for name, field in schema["properties"].items()
        ]

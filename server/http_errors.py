"""Errors as HTTP answers: the JSON bodies of /v1 and of the Open Inference Protocol, and the app's handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from monaserve.adapters import AdapterError

from .errors import ServeError

log = logging.getLogger(__name__)


def is_oip(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"error": code, "message": text}`, or on `/v2` routes the Open Inference Protocol's `{"error": "<text>"}`."""
    body = {"error": f"{code}: {message}"} if is_oip(path) else {"error": code, "message": message}
    return JSONResponse(body, status_code=status, headers=headers)


def serve_error_response(method: str, path: str, exc: ServeError) -> JSONResponse:
    """The answer to a `ServeError`, wherever it was raised; a 499 (nobody will read it) is one log line."""
    if exc.status == 499:
        log.info("%s %s: %s", method, path, exc.message)
    return error_response(path, exc.status, exc.code, exc.message, exc.headers())


def install_error_handlers(app: FastAPI) -> None:
    """Every error a route raises on purpose becomes its JSON answer (unexpected ones: `middleware.ContainErrors`)."""

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return serve_error_response(request.method, request.url.path, exc)

    @app.exception_handler(AdapterError)
    async def adapter_error(request: Request, exc: AdapterError) -> JSONResponse:
        return error_response(request.url.path, 422, "invalid_adapter", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_response(request.url.path, 422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; the routes are listed at /docs"
        return error_response(request.url.path, exc.status_code, f"http_{exc.status_code}", message, exc.headers)

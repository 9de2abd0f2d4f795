"""Bearer tokens: the admin routes always need one; inference needs one only with --api-token."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .config import ServeConfig
from .errors import Forbidden, Unauthorized

Credentials = Annotated[
    HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`"))
]
"""The request's bearer token (None without one), with the scheme documented in OpenAPI; the checks below answer."""


def check_bearer(credentials: HTTPAuthorizationCredentials | None, tokens: list[str], what: str) -> None:
    """401 without a bearer token, 403 unless it equals one of `tokens` (constant-time comparisons)."""
    if credentials is None:
        raise Unauthorized(f"{what} need 'Authorization: Bearer <token>'")
    given = credentials.credentials.encode()
    if not any([hmac.compare_digest(given, token.encode()) for token in tokens]):  # a list: compare with every token
        raise Forbidden(f"invalid token for {what}")


def admin_guard(config: ServeConfig) -> Callable:
    """The dependency of admin routes: the admin token, or --insecure-admin; without either the admin API is off."""

    async def require_admin(credentials: Credentials) -> None:
        if config.admin_token is None:
            if config.insecure_admin:
                return
            raise Forbidden("the admin API is off: start the server with --admin-token (or MONASERVE_ADMIN_TOKEN)")
        check_bearer(credentials, [config.admin_token], "admin routes")

    return require_admin


def api_guard(config: ServeConfig) -> Callable:
    """The dependency of inference routes: with --api-token they need it (or the admin token); without, they are open."""

    async def require_api(credentials: Credentials) -> None:
        if config.api_token is not None:
            check_bearer(credentials, [t for t in (config.api_token, config.admin_token) if t], "inference routes")

    return require_api

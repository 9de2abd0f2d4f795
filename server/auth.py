"""Bearer tokens: the admin routes always need one; inference needs one only with --api-token."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from .config import ServeConfig
from .errors import Forbidden, Unauthorized

BEARER = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <token>`: the admin token on admin routes; on inference, with --api-token, the API or admin token",
)
"""The one security scheme in OpenAPI (`HTTPBearer`): `/docs`'s Authorize button takes either token."""
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
"""The request's bearer token (None without one), with the scheme documented in OpenAPI; the checks below answer."""


def check_bearer(credentials: HTTPAuthorizationCredentials | None, tokens: list[str], what: str) -> None:
    """401 without a bearer token, 403 unless it equals one of `tokens` (constant-time comparisons)."""
    if credentials is None:
        raise Unauthorized(f"{what} need 'Authorization: Bearer <token>'")
    given = credentials.credentials.encode()
    if not any([hmac.compare_digest(given, token.encode()) for token in tokens]):  # a list: compare with every token
        raise Forbidden(f"invalid token for {what}")


def check_admin(config: ServeConfig, credentials: HTTPAuthorizationCredentials | None) -> None:
    """The admin token, or --insecure-admin; without either the admin API is off."""
    if config.admin_token is None:
        if config.insecure_admin:
            return
        raise Forbidden("the admin API is off: start the server with --admin-token (or MONASERVE_ADMIN_TOKEN)")
    check_bearer(credentials, [config.admin_token], "admin routes")


def check_api(config: ServeConfig, credentials: HTTPAuthorizationCredentials | None) -> None:
    """With --api-token, inference needs it (or the admin token); without, it is open."""
    if config.api_token is not None:
        check_bearer(credentials, [t for t in (config.api_token, config.admin_token) if t], "inference routes")


def bearer_credentials(authorization: str | None) -> HTTPAuthorizationCredentials | None:
    """An `Authorization` header's bearer token, read as `HTTPBearer` reads it (for code outside the routes)."""
    scheme, token = get_authorization_scheme_param(authorization)
    if not (authorization and scheme.lower() == "bearer" and token):
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token)


def admin_guard(config: ServeConfig) -> Callable:
    """The dependency of admin routes (`check_admin`)."""

    async def require_admin(credentials: Credentials) -> None:
        check_admin(config, credentials)

    return require_admin


def api_guard(config: ServeConfig) -> Callable:
    """The dependency of inference routes (`check_api`)."""

    async def require_api(credentials: Credentials) -> None:
        check_api(config, credentials)

    return require_api

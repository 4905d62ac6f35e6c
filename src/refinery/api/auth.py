"""Admin API authentication: a bearer token, compared in constant time.

Every `/api/*` route depends on `require_admin`; the governance work replaces the single token
with users and roles, behind this same dependency.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from fastapi import Request

from refinery.errors import PermissionDenied, RefineryError
from refinery.settings import Settings


class Unauthenticated(RefineryError):
    http_status = 401
    code = "unauthorized"


def admin_token(settings: Settings) -> str:
    """The configured token, or the one kept in `<data_dir>/admin.token` (created 0600 on first use)."""
    if settings.admin_token:
        return settings.admin_token
    path: Path = settings.data_dir / "admin.token"
    if path.exists():
        return path.read_text("utf-8").strip()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    token = "rfa_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def check_bearer(header: str | None, expected: str, permission: str) -> None:
    if not header:
        raise Unauthenticated(
            "This endpoint needs an admin token.",
            fix="Send 'Authorization: Bearer <token>' (the token is in <data_dir>/admin.token).",
        )
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected.encode()):
        raise PermissionDenied(f"The token does not grant {permission!r}.", fix="Use the admin token from <data_dir>/admin.token.")


def require(permission: str) -> Callable[[Request], None]:
    """A FastAPI dependency checking that the caller holds `permission`."""

    def dependency(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), request.app.state.admin_token, permission)

    return dependency

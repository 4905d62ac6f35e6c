"""Errors of the governance stage; each names the bad value and the fix, and carries its HTTP status."""

from __future__ import annotations

from refinery.errors import ConfigurationError, PermissionDenied, RefineryError

__all__ = ["AuditError", "GovernanceError", "PermissionDenied", "TokenError", "Unauthenticated", "UnknownPermission"]


class GovernanceError(RefineryError):
    """Root of the governance stage's own errors."""


class Unauthenticated(GovernanceError):
    """No credential, or one that is unknown, expired or revoked (HTTP 401)."""

    http_status = 401
    code = "unauthorized"


class TokenError(ConfigurationError):
    """A token could not be created or revoked as asked (bad name, role, scope or expiry)."""

    code = "token_error"


class UnknownPermission(ConfigurationError):
    """Code or a role names a permission that is not in the catalogue (a typo would grant nothing)."""

    code = "unknown_permission"


class AuditError(GovernanceError):
    """The audit log could not be written or read."""

    code = "audit_error"

"""The exception tree: one root, one subclass per layer, each carrying what to do about it.

Every error says what was wrong, which value was at fault and how to fix it. Errors that can
reach HTTP carry their status; database errors carry the SQL that failed.
"""

from __future__ import annotations

from typing import Any


class RefineryError(Exception):
    """Root of every error Refinery raises on purpose."""

    http_status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, fix: str | None = None, field: str | None = None, **details: Any):
        self.message = message
        self.fix = fix
        self.field = field
        self.details = details
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        return text

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        if self.fix:
            body["fix"] = self.fix
        body.update({k: v for k, v in self.details.items() if v is not None})
        return body


class ConfigurationError(RefineryError):
    """A setting, mapping or plan file is wrong."""

    http_status = 400
    code = "configuration_error"


class NotFoundError(RefineryError):
    http_status = 404
    code = "not_found"


class ConflictError(RefineryError):
    http_status = 409
    code = "conflict"


class StorageError(RefineryError):
    """The database refused something; carries the SQL that failed."""

    code = "storage_error"

    def __init__(self, message: str, *, sql: str | None = None, fix: str | None = None):
        self.sql = sql
        super().__init__(message, fix=fix, sql=sql)

    def __str__(self) -> str:
        text = super().__str__()
        if self.sql:
            text += f"\nSQL: {self.sql}"
        return text


class MigrationError(StorageError):
    code = "migration_error"


class QueryError(RefineryError):
    """A user's read-only query was refused or failed."""

    http_status = 400
    code = "query_error"


class IngestError(RefineryError):
    """The collector refused a request; the message names the field and the fix."""

    http_status = 400
    code = "invalid_request"


class AuthError(IngestError):
    http_status = 401
    code = "unauthorized"


class PermissionDenied(RefineryError):
    http_status = 403
    code = "forbidden"


class PayloadTooLarge(IngestError):
    http_status = 413
    code = "payload_too_large"


class RateLimited(IngestError):
    http_status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, **kw: Any):
        super().__init__(message, retry_after=round(retry_after, 3), **kw)
        self.retry_after = retry_after


class ImportError_(RefineryError):
    """A batch import could not start (bad mapping, missing column, unreadable file)."""

    http_status = 400
    code = "import_error"


class ServerUnavailable(RefineryError):
    """A command needed a running server and could not reach it (transient)."""

    http_status = 503
    code = "unavailable"
    transient = True

"""Errors of probabilistic matching: each names the bad value and the fix."""

from __future__ import annotations

from refinery.errors import ConfigurationError, NotFoundError, RefineryError


class MatchingError(RefineryError):
    """Person records or device signals could not be matched."""

    http_status = 400
    code = "matching_error"


class MissingExtraError(ConfigurationError):
    """An optional dependency of matching is not installed."""

    code = "missing_extra"


class LinkNotFound(NotFoundError):
    code = "link_not_found"

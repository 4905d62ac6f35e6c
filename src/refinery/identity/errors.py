"""Errors of the identity stage; each names the bad value and the fix."""

from __future__ import annotations

from refinery.errors import ConfigurationError


class IdentityRulesError(ConfigurationError):
    """The identity rules file (or an identity setting) is wrong."""

    code = "identity_rules_error"


class OverrideError(ConfigurationError):
    """A removal or split cannot be made as asked (unknown identifier, no such edge, a split that
    separates nothing)."""

    code = "identity_override_error"

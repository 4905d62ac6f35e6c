"""Errors of the activation stage: definitions that cannot be saved, names that do not exist.

Delivery errors (transient or terminal) live with the destination interface
(`refinery.activation.destination`), since destinations raise them.
"""

from __future__ import annotations

from refinery.errors import ConflictError, NotFoundError, RefineryError


class ActivationError(RefineryError):
    """A destination or sync definition, run or replay that cannot be done as asked."""

    http_status = 400
    code = "invalid_activation"


class DestinationNotFound(NotFoundError):
    code = "destination_not_found"


class SyncNotFound(NotFoundError):
    code = "sync_not_found"


class DestinationExists(ConflictError):
    code = "destination_exists"


class SyncExists(ConflictError):
    code = "sync_exists"


class DestinationInUse(ConflictError):
    code = "destination_in_use"


class UnknownMappingSource(ActivationError):
    """A sync's mapping names a trait or computed trait the store does not have."""

    code = "unknown_mapping_source"

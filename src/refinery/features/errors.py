"""Errors of the feature store. Each names the bad value (and the field) and says how to fix it.

A feature expression that does not compile raises the segment language's own error
(`refinery.segments.errors.SegmentError`), with the line, column and caret of the fault.
"""

from __future__ import annotations

from refinery.errors import RefineryError


class FeatureError(RefineryError):
    """Root of the feature store's errors: a definition or a request that cannot be used as given."""

    http_status = 400
    code = "feature_error"


class FeatureNotFound(FeatureError):
    http_status = 404
    code = "feature_not_found"


class FeatureExists(FeatureError):
    http_status = 409
    code = "feature_exists"


class FeatureSQLError(FeatureError):
    """A SQL feature that is not one read-only SELECT of (profile_id, value) over the events."""

    code = "feature_sql_error"


class TrainingSetError(FeatureError):
    """A training-set request with rows that cannot be answered point-in-time correctly."""

    code = "training_set_error"

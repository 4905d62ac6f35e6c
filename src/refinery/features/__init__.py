"""The feature store: named, versioned feature definitions (the segment language's aggregates, or
checked SQL) and point-in-time correct training sets over the engine seam. See docs/features.md.

    registry.define(engine, actor, "orders_90d", "count of 'Order Completed'", window="90 days")
    training_set(engine, rows, ["orders_90d", "lifetime_value@2"]).table   # pyarrow, one row per request row
"""

from __future__ import annotations

from refinery.features.definition import Feature
from refinery.features.errors import FeatureError, FeatureNotFound, FeatureSQLError, TrainingSetError
from refinery.features.offline import FeatureRequest, TrainingSet, training_set

__all__ = ["Feature", "FeatureError", "FeatureNotFound", "FeatureRequest", "FeatureSQLError", "TrainingSet", "TrainingSetError",
           "training_set"]

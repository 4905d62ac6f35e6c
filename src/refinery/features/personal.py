"""What the feature store holds about a person, for subject requests (refinery.privacy.registry).

Feature definitions name nobody (declared in privacy/stores.py); feature **values** are kept per
profile in the online store (a SQLite file or Redis, outside the database). An export lists the
person's values (feature, version, value, when computed); an erasure removes them and remembers the
profile ids as erased, so a lookup answers 404 "erased" and a materialisation that read the
database before the erasure cannot write them back. The online store is outside the database: the
values are removed once the erasure's transaction has committed (never when it rolls back).
"""

from __future__ import annotations

import logging
from typing import Any

from refinery.features.online import store_of
from refinery.privacy.registry import Subject
from refinery.storage.engine import Engine

log = logging.getLogger(__name__)


class FeatureValuesStore:
    name = "features"
    tables: tuple[str, ...] = ()  # outside the database: the online store

    def export(self, engine: Engine, subject: Subject) -> Any:
        return {"online_values": store_of(engine).export(subject.profile_ids)}

    def erase(self, engine: Engine, subject: Subject) -> int:
        """Counts the values now; removes them once the erasure's transaction commits (never if it
        rolls back). A materialisation that read the database before the commit skips the profiles."""
        if not subject.profile_ids:
            return 0
        store = store_of(engine)
        ids = list(subject.profile_ids)
        held = len(store.export(ids))

        def forget() -> None:
            try:
                store.erase(ids)
            except Exception as e:  # the rows are erased; say so without personal data, a full run drops the values
                log.error("features: the online store could not erase %d profile(s) (%s); the next full materialisation drops them",
                          len(ids), type(e).__name__)

        engine.after_commit(forget)
        return held


def register() -> None:
    """Replace the placeholder section subject requests were given for features with this store."""
    from refinery.privacy.registry import REGISTRY

    if not isinstance(REGISTRY.stores.get("features"), FeatureValuesStore):
        REGISTRY.stores["features"] = FeatureValuesStore()  # same name, same place in the order

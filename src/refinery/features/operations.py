"""The feature operations the admin API and the local client share, each audited: definitions in
the writer transaction of the change, training sets (profile ids with derived values) before the
answer leaves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from refinery.features import registry
from refinery.features.errors import FeatureExists, TrainingSetError
from refinery.features.offline import FeatureRequest, training_set
from refinery.governance import audit
from refinery.governance.principal import Principal
from refinery.runtime import Runtime

#: Rows one training-set request may hold through the API (larger sets: the Python API).
MAX_ROWS = 100_000


def list_features(rt: Runtime) -> list[dict[str, Any]]:
    return [f.to_dict() for f in registry.list_features(rt.engine)]


def show(rt: Runtime, name: str) -> dict[str, Any]:
    feature = registry.get(rt.engine, name)
    return {**feature.to_dict(), "versions": [v.to_dict() for v in registry.versions(rt.engine, name)]}


def versions(rt: Runtime, name: str) -> list[dict[str, Any]]:
    return [v.to_dict() for v in registry.versions(rt.engine, name)]


def define(rt: Runtime, actor: Principal, name: str, definition: str, *, create: bool, kind: str = "expression",
           entity: str = "profile", window: str | None = None, ttl: str | int | None = None, owner: str | None = None,
           description: str | None = None) -> dict[str, Any]:
    """`create`: a new feature (refused when the name is taken); else a new version of `name`."""
    def write(engine: Any) -> dict[str, Any]:
        live = [f.name for f in registry.list_features(engine, cursor=engine.reader())]
        if create and name in live:
            raise FeatureExists(f"Feature {name!r} exists.", fix=f"Save a new version: refinery features update {name} ...", field="name")
        if not create:
            registry.get(engine, name)  # not found, with suggestions
        return registry.define(engine, actor, name, definition, kind=kind, entity=entity, window=window, ttl=ttl, owner=owner,
                               description=description)

    result: dict[str, Any] = rt.writer.call(write)
    return result


def delete(rt: Runtime, actor: Principal, name: str) -> dict[str, Any]:
    result: dict[str, Any] = rt.writer.call(lambda e: registry.delete(e, actor, name))
    return result


def build_training_set(rt: Runtime, actor: Principal, rows: Sequence[Mapping[str, Any]], features: Sequence[str | Mapping[str, Any]], *,
                       label: str | None = "label", mode: str = "training", unknown: str = "refuse") -> dict[str, Any]:
    """A training set as JSON (columns, rows, report), audited with its size and features."""
    if len(rows) > MAX_ROWS:
        raise TrainingSetError(f"The request has {len(rows):,} rows; one request holds at most {MAX_ROWS:,}.",
                               fix="Split the rows, or build large sets with refinery.features.training_set in Python.", field="rows")
    asked: list[str | FeatureRequest] = [f if isinstance(f, str) else FeatureRequest(
        str(f.get("name", "")), str(f.get("definition") or f.get("expression") or ""), str(f.get("kind", "expression")),
        f.get("window")) for f in features]
    result = training_set(rt.engine, rows, asked, label=label, mode=mode, unknown=unknown)
    names = [f if isinstance(f, str) else f.name for f in asked]
    audit.record_now(rt.writer, actor, "features.training_set", None,
                     {"rows": result.table.num_rows, "features": names, "mode": mode})
    return result.to_dict()


# --- the online store --------------------------------------------------------------------------
def online_store(rt: Runtime) -> Any:
    """This runtime's online store (opened once; the setting `features_online_store` picks it)."""
    from refinery.features.online import store_of

    return store_of(rt.engine, rt.settings)


def materialize(rt: Runtime, actor: Principal, names: Sequence[str] | None = None, *, full: bool = False) -> dict[str, Any]:
    """Fill the online store (incrementally when it can, unless `full`), audited with its counts."""
    from refinery.features.materialize import materialize as run

    result = run(rt.engine, online_store(rt), list(names) if names else None, incremental=not full)
    audit.record_now(rt.writer, actor, "features.materialize", None,
                     {"mode": result.mode, "features": sorted(result.features), "profiles": result.profiles, "values": result.values})
    return {**result.to_dict(), "store": online_store(rt).kind}


def profile_features(rt: Runtime, actor: Principal, profile_id: str) -> dict[str, Any]:
    """A profile's served features (following a merge to its survivor), audited as a profile read
    before the answer leaves. 404 for an erased profile or one the store does not hold."""
    lookup = online_store(rt).lookup(profile_id)
    audit.record_now(rt.writer, actor, "profiles.features", f"profile:{lookup.profile_id_now}",
                     {"requested_id": profile_id, "features": len(lookup.values)})
    return lookup.to_dict()


#: Who runs the scheduled materialisation inside `refinery serve` (the audit actor).
SYSTEM = Principal("system", "system:features", "admin")


async def scheduled(rt: Runtime) -> None:
    """Materialise every `features_materialize_interval_minutes` (0: never), the first time one
    interval after start; a failing run is logged (no personal data) and the next one tried."""
    import asyncio
    import logging

    interval = rt.settings.features_materialize_interval_minutes * 60
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(materialize, rt, SYSTEM)
        except Exception as e:  # never take the server down
            logging.getLogger(__name__).warning("features: scheduled materialisation failed: %s", type(e).__name__)

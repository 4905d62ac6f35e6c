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

"""The Feast export, proven by Feast itself: `feast apply` and `feast materialize` (the installed
Feast's CLI, in a subprocess, in the exported folder) accept it; Feast's point-in-time retrieval of
label rows gives our training set's values, and Feast's online values after materialising give our
online store's values for the same moment.

The events have planted arrival times (late uploads received days after they happened, a clock
running ahead), and the label rows sit on every moment a value changes and one microsecond either
side of it, so an export that is off by one row, one moment or one boundary fails."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.features import registry
from refinery.features.errors import FeatureError
from refinery.features.feast import MANIFEST, export_feast
from refinery.features.materialize import materialize
from refinery.features.offline import training_set
from refinery.features.online import SqliteStore, jsonable
from refinery.governance.principal import local_principal
from refinery.identity import IdentityRules
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from support import fresh_runtime, write_events

FEAST = Path(sys.executable).with_name("feast")
FEATURES = {
    # name: (definition, window, ttl)
    "orders_7d": ("count of 'Order Completed'", "7 days", None),
    "spend": ("sum(total) of 'Order Completed'", None, "2 days"),
    "last_order": ("last time of 'Order Completed'", None, None),
    "top_category": ("most frequent category of 'Product Viewed' in last 10 days", None, None),
    "hats_3d": ("count of 'Product Viewed' where category = 'hats' in last 3 days", None, "2 days"),
    "orders_mid": ("count of 'Order Completed' between 20 days ago and 5 days ago", None, None),
    "categories": ("count(distinct category) of 'Product Viewed'", None, None),
    "viewed_before": ("last time of 'Product Viewed' before 2 days ago", None, None),
}
#: (user, event, days before now it happened, days after that it was received, properties)
EVENTS = [
    ("u1", "Order Completed", 30.0, 0.001, {"total": 10}),
    ("u1", "Order Completed", 12.0, 0.0, {"total": 20}),
    ("u1", "Order Completed", 9.0, 4.0, {"total": 5.5}),      # a late upload: known 4 days after it happened
    ("u1", "Product Viewed", 6.0, 0.01, {"category": "hats"}),
    ("u1", "Product Viewed", 2.5, 0.0, {"category": "shoes"}),
    ("u1", "Order Completed", 1.0, 0.5, {"total": 7.25}),
    ("u2", "Product Viewed", 25.0, 0.0, {"category": "shoes"}),
    ("u2", "Product Viewed", 8.0, 0.0, {"category": "hats"}),
    ("u2", "Product Viewed", 7.5, 0.0, {"category": "hats"}),
    ("u2", "Product Viewed", 2.0, 1.5, {"category": "socks"}),
    ("u2", "Product Viewed", -0.2, -0.25, {"category": "hats"}),  # dated 5 hours ahead of now, received a day before that
    ("u3", "Order Completed", 35.0, 0.0, {"total": 99}),
    ("u4", "Login", 3.0, 0.0, {}),
]


def build(rt: Runtime) -> None:
    rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runtime, datetime]]:
    path = tmp_path_factory.mktemp("feast")
    with fresh_runtime(path) as rt:
        now = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
        planted = []
        for user, event, ago, late, props in EVENTS:
            mid = uuid.uuid4().hex
            at = now - timedelta(days=ago)
            planted.append((mid, at + timedelta(days=late)))
            write_events(rt, {"type": "track", "userId": user, "event": event, "properties": props, "messageId": mid,
                              "timestamp": at.isoformat()})

        def arrive(engine: Any) -> None:
            for mid, received in planted:
                engine.execute("UPDATE events SET received_at = ? WHERE message_id = ?", [received, mid])
        rt.writer.call(arrive)
        build(rt)
        actor = local_principal()
        for name, (definition, window, ttl) in FEATURES.items():
            rt.writer.call(lambda e, n=name, d=definition, w=window, t=ttl: registry.define(e, actor, n, d, window=w, ttl=t))
        yield rt, now


def profiles(rt: Runtime) -> dict[str, str]:
    rows = rt.engine.fetch_all("SELECT value, profile_id FROM identities WHERE identifier_type = 'user_id'", cursor=rt.engine.fresh_reader())
    return {str(u): str(p) for u, p in rows}


def label_rows(rt: Runtime, since: datetime, as_of: datetime) -> list[dict[str, Any]]:
    """Every profile at moments on and around every change (event known, window edges), and on a grid."""
    moments: set[datetime] = {since + (as_of - since) * k / 40 for k in range(41)}
    us = timedelta(microseconds=1)
    for ts, received in rt.engine.fetch_all("SELECT timestamp, received_at FROM events", cursor=rt.engine.fresh_reader()):
        for edge in (max(ts, received), ts + timedelta(days=7), ts + timedelta(days=3), ts + timedelta(days=10),
                     ts + timedelta(days=5), ts + timedelta(days=20), ts + timedelta(days=2), max(ts, received) + timedelta(days=2)):
            moments.update({edge - us, edge, edge + us})
    return [{"profile_id": pid, "timestamp": m} for pid in sorted(profiles(rt).values())
            for m in sorted(moments) if since <= m <= as_of]


def run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FEAST_USAGE": "False", "PYTHONWARNINGS": "ignore"}, check=False)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


FEAST_SCRIPT = """
import json, sys
import pandas as pd
import pyarrow.parquet as pq
from feast import FeatureStore

store = FeatureStore(repo_path=".")
refs = json.loads(sys.argv[1])
entity = pq.read_table(sys.argv[2]).to_pandas()
entity["event_timestamp"] = pd.to_datetime(entity["event_timestamp"], utc=True)
hist = store.get_historical_features(entity_df=entity, features=refs).to_df()
hist.to_parquet(sys.argv[3])
ids = sorted(set(entity["profile_id"]))
online = store.get_online_features(features=refs, entity_rows=[{"profile_id": p} for p in ids]).to_dict()
json.dump(online, open(sys.argv[4], "w"), default=str)
"""


def same(a: Any, b: Any) -> bool:
    a, b = normal(a), normal(b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


def normal(v: Any) -> Any:
    """Feast's pandas types beside ours: NaN/NaT are None, numbers float, times UTC datetimes."""
    if v is None or type(v).__name__ in ("NaTType", "NAType"):
        return None
    if hasattr(v, "to_pydatetime"):
        v = v.to_pydatetime()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, datetime):
        return v.astimezone(UTC)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if hasattr(v, "item"):  # numpy scalars
        return normal(v.item())
    return v


def test_feast_reads_the_export_and_agrees_with_our_training_set_and_online_store(world: tuple[Runtime, datetime],
                                                                                  tmp_path: Path) -> None:
    rt, now = world
    as_of = now
    folder = tmp_path / "repo"
    result = export_feast(rt.engine, folder, as_of=as_of)
    assert {v.name for v in result.views} == {"refinery_features", "refinery_features_ttl_172800s"}
    assert json.loads((folder / MANIFEST).read_text())["features"] == {n: 1 for n in FEATURES}
    since = datetime.fromisoformat(result.since)

    run([str(FEAST), "apply"], folder)
    start = (since - timedelta(seconds=1)).isoformat()
    run([str(FEAST), "materialize", start, as_of.isoformat()], folder)

    rows = label_rows(rt, since, as_of)
    ours = training_set(rt.engine, rows, list(FEATURES), label=None, mode="retrieval", now=as_of).table.to_pylist()
    entity = pa.table({"profile_id": [r["profile_id"] for r in rows],
                       "event_timestamp": pa.array([r["timestamp"] for r in rows], pa.timestamp("us", tz="UTC"))})
    pq.write_table(entity, tmp_path / "entity.parquet")
    view_of = {name: v.name for v in result.views for name in v.features}
    refs = [f"{view_of[n]}:{n}" for n in FEATURES]
    (tmp_path / "feast_run.py").write_text(FEAST_SCRIPT)
    run([sys.executable, str(tmp_path / "feast_run.py"), json.dumps(refs), str(tmp_path / "entity.parquet"),
         str(tmp_path / "hist.parquet"), str(tmp_path / "online.json")], folder)

    feast_rows = pq.read_table(tmp_path / "hist.parquet").to_pandas().to_dict("records")
    theirs = {(r["profile_id"], normal(r["event_timestamp"])): r for r in feast_rows}
    mismatches: list[Any] = []
    for row in ours:
        other = theirs.get((row["profile_id"], row["timestamp"].astimezone(UTC)))
        if other is None:  # Feast drops an entity row that no source row precedes
            mismatches.append((row["profile_id"], row["timestamp"].isoformat(), "(no row from Feast)"))
            continue
        for name in FEATURES:
            if not same(row[name], other[name]):
                mismatches.append((row["profile_id"], row["timestamp"].isoformat(), name, row[name], other[name]))
    assert not mismatches, f"{len(mismatches)} of {len(ours) * len(FEATURES)} values differ, e.g. {mismatches[:8]}"
    assert len(feast_rows) == len(ours) == len(rows) > 400
    # the data is not trivial: values really change over the label rows
    for name in FEATURES:
        assert len({json.dumps(jsonable(r[name])) for r in ours}) >= 2, name

    # online: Feast's materialised values equal our online store's for the same moment
    store = SqliteStore(tmp_path / "online.sqlite")
    try:
        materialize(rt.engine, store, now=as_of)
        online = json.loads((tmp_path / "online.json").read_text())
        for i, pid in enumerate(online["profile_id"]):
            served = {name: v.value for name, v in store.lookup(pid).values.items()}
            for name in FEATURES:
                theirs_value = online[name][i]
                if isinstance(served[name], str) and isinstance(theirs_value, str) and "T" in served[name]:
                    assert datetime.fromisoformat(served[name]) == datetime.fromisoformat(theirs_value), (pid, name)
                else:
                    assert same(served[name], theirs_value), (pid, name, served[name], theirs_value)
    finally:
        store.close()


def test_names_feast_cannot_hold_and_sql_features_are_refused_by_name(world: tuple[Runtime, datetime], tmp_path: Path) -> None:
    rt, _ = world
    actor = local_principal()
    rt.writer.call(lambda e: registry.define(
        e, actor, "days_sql", kind="sql",
        definition="SELECT ep.profile_id AS profile_id, count(*) AS value FROM events e JOIN event_profiles ep "
                   "ON ep.source = e.source AND ep.message_id = e.message_id WHERE e.timestamp > $as_of - INTERVAL 7 DAY "
                   "GROUP BY ep.profile_id"))
    rt.writer.call(lambda e: registry.define(e, actor, "event_timestamp", "count of 'Login'"))
    rt.writer.call(lambda e: registry.define(e, actor, "class", "count of 'Login'"))
    try:
        for name, says in (("days_sql", "SQL feature"), ("event_timestamp", "name of a column"), ("class", "not a Python identifier")):
            with pytest.raises(FeatureError) as e:
                export_feast(rt.engine, tmp_path / name, ["orders_7d", name])
            assert repr(name) in e.value.message and says in e.value.message and e.value.fix
            assert not (tmp_path / name).exists()  # refused before anything was written
        with pytest.raises(FeatureError) as e:
            export_feast(rt.engine, tmp_path / "p", ["orders_7d"], project="bad-name; import os")
        assert e.value.field == "project"
        # a folder with something else in it is not overwritten
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "notes.txt").write_text("mine")
        with pytest.raises(FeatureError, match="not empty"):
            export_feast(rt.engine, tmp_path / "busy", ["orders_7d"])
        assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
        export_feast(rt.engine, tmp_path / "again", ["orders_7d"])
        with pytest.raises(FeatureError, match="earlier export"):
            export_feast(rt.engine, tmp_path / "again", ["orders_7d"])
        assert export_feast(rt.engine, tmp_path / "again", ["spend"], replace=True).features == {"spend": 1}
        assert not list((tmp_path / "again" / "data").glob("refinery_features.parquet"))
    finally:
        for name in ("days_sql", "event_timestamp", "class"):
            rt.writer.call(lambda e, n=name: registry.delete(e, actor, n))


def test_generated_python_quotes_every_text_from_a_definition() -> None:
    import ast

    from refinery.features.definition import Feature
    from refinery.features.feast import FeastView, definitions

    text = "count of 'Order Completed' where category = 'a\"\"\"b\\'\\n); import os; (' in last 7 days"
    f = Feature("orders", 3, "profile", "expression", text, None, None, "number", "o'wner\n", None, "o", datetime.now(UTC))
    source = definitions("refinery", [FeastView("refinery_features", None, {"orders": "Int64"}, "data/x.parquet")], {"orders": f},
                         datetime.now(UTC))
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Field"]
    assert len(calls) == 1
    kw = {k.arg: k.value for k in calls[0].keywords}
    assert ast.literal_eval(kw["description"]) == text and ast.literal_eval(kw["name"]) == "orders"
    assert ast.literal_eval(kw["tags"]) == {"refinery_ref": "orders@3", "refinery_owner": "o'wner\n"}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import) and any(a.name == "os" for a in n.names)]

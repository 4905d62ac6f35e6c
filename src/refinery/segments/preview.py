"""Preview a rule before saving it: how many profiles it finds, a sample of them, and the SQL it compiles to.

Fast enough to run as a person types: the rule is compiled against the store's catalog and run
once on its own read cursor (never the writer), counting and sampling in the same query; a rule
still running after `timeout` seconds is stopped with an error that says so.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

from sqlglot import exp

from refinery.segments import store
from refinery.segments.members import register_persons
from refinery.segments.store import SegmentLifecycleError
from refinery.storage.engine import Engine

#: The largest sample a preview returns.
MAX_SAMPLE = 1_000


def preview(engine: Engine, rule: str, *, sample: int = 20, as_of: datetime | None = None, name: str | None = None,
            timeout: float = 30.0, rules: Any = None, trait_policy: Any = None) -> dict[str, Any]:
    """Compile `rule` (as the segment `name` would be, when given) and count and sample its members as of `as_of` (now;
    given `as_of` and the store's `trait_policy`, traits are those of that moment too)."""
    if not 0 <= sample <= MAX_SAMPLE:
        raise SegmentLifecycleError(f"A sample of {sample} profiles is outside 0..{MAX_SAMPLE}.",
                                    fix=f"Ask for at most {MAX_SAMPLE}.", field="sample")
    at = (as_of or datetime.now(UTC)).astimezone(UTC)
    started = time.perf_counter()
    compiled = store.compile_text(engine, rule, name=name, as_of=as_of,
                                  traits_as_of=trait_policy if as_of is not None else None)
    compiled_at = time.perf_counter()
    members = compiled.members(at).subquery("_members")
    query = (
        exp.select(exp.column("profile_id"), exp.alias_(exp.Window(this=exp.Count(this=exp.Star())), "_total"))
        .from_(members)
        .order_by(exp.column("profile_id"))
        .limit(max(sample, 1))
    )
    cursor = engine.fresh_reader()
    timer = threading.Timer(timeout, engine.interrupt, [cursor])
    try:
        register_persons(engine, compiled, cursor, rules)
        timer.start()
        rows = engine.fetch_all(query, cursor=cursor)
    except Exception as e:
        if timer.finished.is_set():
            raise SegmentLifecycleError(f"The preview ran longer than {timeout:g} s and was stopped.",
                                        fix="Narrow the rule (a shorter window, fewer conditions), or run it as a segment.") from e
        raise
    finally:
        timer.cancel()
        cursor.close()
    total = int(rows[0][1]) if rows else 0
    return {
        "count": total,
        "sample": [str(r[0]) for r in rows[:sample]],
        "sql": compiled.sql(at, engine.dialect),
        "as_of": at.isoformat(),
        "conditions": [_condition(c) for c in compiled.conditions],
        "segments_referenced": sorted(compiled.segments_referenced),
        "realtime": bool(compiled.realtime),
        "identity_policy": store.identity_policy(compiled),
        "timings_ms": {"compile": round((compiled_at - started) * 1000, 1), "run": round((time.perf_counter() - compiled_at) * 1000, 1)},
    }


def _condition(c: Any) -> dict[str, Any]:
    """A compiled condition as JSON: its id, kind, the rule text it came from, and the segment it was included from."""
    return {"id": c.id, "kind": c.kind, "text": c.text, "segment": c.segment}

"""The segment operations the admin API and the local client share, each audited as governance asks:
changes in the transaction that makes them, reads of members (profile ids) before the answer leaves.

The API routes and `LocalClient` are thin calls into these, with their own principal (a token's
holder, or the local user), so both edges behave alike by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any, TypeVar, cast

from refinery.governance import audit
from refinery.governance.principal import Principal
from refinery.privacy.pii import reveal_in
from refinery.segments import computed, explain, members, preview, store
from refinery.segments.catalog import cached_catalog
from refinery.segments.errors import UnknownNameError
from refinery.segments.store import SegmentLifecycleError
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer

T = TypeVar("T")


def parse_time(text: str | None, field: str = "as_of") -> datetime | None:
    """An ISO 8601 moment (`2026-01-31T12:00:00Z`) or a date (midnight UTC); naive times are UTC."""
    if text is None or text == "":
        return None
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00")) if "T" in text or " " in text else None
        if at is None:
            d = date.fromisoformat(text)
            at = datetime(d.year, d.month, d.day, tzinfo=UTC)
    except ValueError:
        raise SegmentLifecycleError(f"{field} {text!r} is not a date or time.",
                                    fix="Write it as 2026-01-31 or 2026-01-31T12:00:00Z.", field=field) from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _member_counts(engine: Engine, cursor: Any) -> dict[str, int]:
    rows = engine.fetch_all("SELECT segment, count(*) FROM segment_members WHERE exited_at IS NULL GROUP BY segment", cursor=cursor)
    return {str(s): int(n) for s, n in rows}


def list_segments(engine: Engine) -> list[dict[str, Any]]:
    cur = engine.reader()
    counts = _member_counts(engine, cur)
    return [{**s.to_dict(), "members": counts.get(s.name, 0)} for s in store.list_segments(engine, cursor=cur)]


def show(engine: Engine, name: str) -> dict[str, Any]:
    cur = engine.reader()
    seg = store.get(engine, name, cursor=cur)
    last = engine.fetch_dicts(
        "SELECT run_id, as_of, status, members, entered, exited, trigger FROM segment_runs WHERE segment = ? "
        "ORDER BY started_at DESC LIMIT 1", [name], cursor=cur,
    )
    for r in last:
        r["as_of"] = r["as_of"].astimezone(UTC).isoformat()
    return {**seg.to_dict(), "members": _member_counts(engine, cur).get(name, 0), "last_run": last[0] if last else None,
            "versions": [v.to_dict() for v in store.versions(engine, name, cursor=cur)]}


def _with_catalog(engine: Engine, fn: Callable[[Any], T]) -> T:
    """`fn(catalog)` with the cached catalog (built outside the writer: it scans the events), and once
    more with a fresh one if a name is unknown to the cached one (it may predate that name)."""
    try:
        return fn(cached_catalog(engine))
    except UnknownNameError:
        return fn(cached_catalog(engine, fresh=True))


def _lineage(settings: Any, spec: dict[str, Any], fn: Callable[[], T], record: Callable[[Any, T], None]) -> T:
    """Run a job that writes membership or trait values as one lineage run (given the settings:
    the API and the local client pass them; tests calling in process may not)."""
    if settings is None:
        return fn()
    from refinery.governance import lineage

    with lineage.run(settings, **spec) as lr:
        out = fn()
        record(lr, out)
    return out


def _run_segments(settings: Any, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    from refinery.governance.lineage import SEGMENTS_RUN

    return _lineage(settings, SEGMENTS_RUN, fn, lambda lr, report: lr.record_segment_runs(report))


def _trait_policy(settings: Any) -> Any:
    from refinery.profiles.policy import TraitPolicy

    return TraitPolicy.from_settings(settings) if settings is not None else None


def create(engine: Engine, writer: Writer, actor: Principal, name: str, rule: str, description: str | None = None, *,
           run: bool = True, trigger: str = "create", rules: Any = None, settings: Any = None) -> dict[str, Any]:
    seg = _with_catalog(engine, lambda catalog: writer.call(lambda e: store.create(e, actor, name, rule, description, catalog=catalog)))
    out: dict[str, Any] = seg.to_dict()
    if run:
        out["run"] = _run_segments(settings, lambda: members.run_segments(engine, writer, actor, [name], trigger=trigger, force=True,
                                                                          rules=rules).to_dict())
    return out


def update(engine: Engine, writer: Writer, actor: Principal, name: str, rule: str | None = None, description: str | None = None,
           *, run: bool = True, rules: Any = None, settings: Any = None) -> dict[str, Any]:
    seg = _with_catalog(engine, lambda catalog: writer.call(lambda e: store.update(e, actor, name, rule, description, catalog=catalog)))
    out: dict[str, Any] = seg.to_dict()
    if run:
        out["run"] = _run_segments(settings, lambda: members.run_segments(engine, writer, actor, [name], trigger="update",
                                                                          rules=rules).to_dict())
    return out


def delete(writer: Writer, actor: Principal, name: str, *, settings: Any = None) -> dict[str, Any]:
    from refinery.governance.lineage import SEGMENTS_RUN

    def record(lr: Any, result: dict[str, Any]) -> None:
        lr.note(segment=name, trigger="delete")
        lr.count("segment_events", result.get("exited"))

    return _lineage(settings, SEGMENTS_RUN, lambda: cast(dict[str, Any], _with_catalog(
        writer.engine, lambda catalog: writer.call(lambda e: store.delete(e, actor, name, catalog=catalog)))), record)


def run(engine: Engine, writer: Writer, actor: Principal, name: str | None = None, *, as_of: str | None = None,
        force: bool = False, trigger: str = "cli", rules: Any = None, settings: Any = None) -> dict[str, Any]:
    return _run_segments(settings, lambda: members.run_segments(engine, writer, actor, [name] if name else None, as_of=parse_time(as_of),
                                                                trigger=trigger, force=force, rules=rules).to_dict())


def run_preview(engine: Engine, writer: Writer, actor: Principal, rule: str, *, sample: int = 20, as_of: str | None = None,
                name: str | None = None, rules: Any = None, settings: Any = None) -> dict[str, Any]:
    result = preview.preview(engine, rule, sample=sample, as_of=parse_time(as_of), name=name, rules=rules,
                             trait_policy=_trait_policy(settings))
    audit.record_now(writer, actor, "segments.preview", f"segment:{name}" if name else None,
                     {"count": result["count"], "sample": len(result["sample"])})
    return result


def read_members(engine: Engine, writer: Writer, actor: Principal, name: str, *, as_of: str | None = None,
                 source: str = "history", limit: int | None = 1000, rules: Any = None, settings: Any = None) -> dict[str, Any]:
    """Members now (recorded), or at a past moment: `history` (rows open then: what the runs found)
    or `evaluated` (the rule then in force over the events received by then, and the traits the
    identify calls received by then gave, merged under the settings' trait policy). Audited."""
    at = parse_time(as_of)
    if source not in ("history", "evaluated"):
        raise SegmentLifecycleError(f"Unknown members source {source!r}.", fix="Use history or evaluated.", field="source")
    if source == "evaluated":
        body = members.members_evaluated(engine, name, at or datetime.now(UTC), limit=limit, rules=rules,
                                         trait_policy=_trait_policy(settings) if at is not None else None)
    else:
        rows = members.members_from_history(engine, name, at)
        body = {"segment": name, "as_of": at.isoformat() if at else None, "source": "history", "count": len(rows),
                "members": rows[:limit] if limit is not None else rows}
    audit.record_now(writer, actor, "segments.members", f"segment:{name}",
                     {"source": source, "as_of": body["as_of"], "count": body["count"], "returned": len(body["members"])})
    return body


def read_history(engine: Engine, name: str, limit: int = 50) -> dict[str, Any]:
    return members.history(engine, name, limit=limit)


def explain_profile(engine: Engine, writer: Writer, actor: Principal, name: str, profile: str, *, as_of: str | None = None,
                    rules: Any = None, settings: Any = None) -> dict[str, Any]:
    """Why `profile` is in `name` or not; values in clear only for `pii:read`. Audited like a profile read."""
    result = explain.explain(engine, name, profile, as_of=parse_time(as_of), rules=rules, trait_policy=_trait_policy(settings))
    pii = actor.can("pii:read")
    audit.record_now(writer, actor, "segments.explain", f"profile:{result['profile_id']}",
                     {"segment": name, "member": result["member"], "pii": pii})
    return reveal_in(engine, result) if pii else result


# --- computed traits ---------------------------------------------------------------------------------

def define_trait(writer: Writer, actor: Principal, name: str, expression: str, description: str | None = None) -> dict[str, Any]:
    return writer.call(lambda e: computed.define(e, actor, name, expression, description)).to_dict()


def compute_trait(engine: Engine, writer: Writer, actor: Principal, name: str, *, settings: Any = None) -> dict[str, Any]:
    from refinery.governance.lineage import COMPUTED_TRAITS

    return _lineage(settings, COMPUTED_TRAITS, lambda: computed.materialise(engine, writer, actor, name),
                    lambda lr, out: lr.record_computed_traits([name], out.get("profiles")))


def delete_trait(writer: Writer, actor: Principal, name: str) -> dict[str, Any]:
    result: dict[str, Any] = writer.call(lambda e: computed.delete(e, actor, name))
    return result


def list_traits(engine: Engine) -> list[dict[str, Any]]:
    return [t.to_dict() for t in computed.list_traits(engine)]

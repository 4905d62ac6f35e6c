"""Segment definitions and their versions: create, update, delete, read, and the rule in force at a moment.

A segment is a name and a rule (the segment language, compiled by `refinery.segments.compile`).
Every saved rule is kept in `segment_versions`, so the audience of any past moment can be
reproduced with the rule of that moment (`version_at`). A rule is compiled before it is saved:
a rule that does not compile (syntax, unknown event or property, type mismatch, a cycle through
`in segment`) is refused with the compiler's error and nothing is written. Changes run inside the
writer and are audited in their own transaction (`segments.create`, `segments.update`,
`segments.delete`). SQL is constant text with bound parameters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from refinery.errors import ConflictError, NotFoundError, RefineryError
from refinery.governance import audit
from refinery.governance.principal import Principal
from refinery.storage.engine import Engine

#: Segment names: lower-case letters, digits, `_` and `-`, starting with a letter or digit.
NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
#: The longest rule text accepted (the compiler has its own limits on a rule's size).
MAX_RULE_CHARS = 20_000
MAX_DESCRIPTION_CHARS = 2_000


class SegmentLifecycleError(RefineryError):
    """A segment definition, run or read that cannot be done as asked."""

    http_status = 400
    code = "invalid_segment"


class SegmentNotFound(NotFoundError):
    code = "segment_not_found"


class SegmentExists(ConflictError):
    code = "segment_exists"


class SegmentInUse(ConflictError):
    code = "segment_in_use"


@dataclass(frozen=True)
class Segment:
    name: str
    rule: str
    description: str | None
    identity_policy: dict[str, Any]
    version: int
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime
    deleted_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("created_at", "updated_at", "deleted_at"):
            d[k] = _iso(d[k])
        return d


@dataclass(frozen=True)
class Version:
    segment: str
    version: int
    rule: str
    description: str | None
    identity_policy: dict[str, Any]
    created_by: str
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = _iso(d["created_at"])
        return d


def _iso(at: datetime | None) -> str | None:
    return at.astimezone(UTC).isoformat() if at is not None else None


def _json(value: Any) -> dict[str, Any]:
    loaded = json.loads(value) if isinstance(value, str) else value
    return dict(loaded) if isinstance(loaded, dict) else {}


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise SegmentLifecycleError(
            f"Segment name {name!r} is not allowed.",
            fix="Use 1-64 lower-case letters, digits, '_' or '-', starting with a letter or digit, e.g. 'pricing_visitors'.",
            field="name",
        )
    return name


def _check_text(rule: str, description: str | None) -> None:
    if not isinstance(rule, str) or not rule.strip():
        raise SegmentLifecycleError("The rule is empty.", fix="Write a rule, e.g. performed 'Order Completed' at least 2 times.",
                                    field="rule")
    if len(rule) > MAX_RULE_CHARS:
        raise SegmentLifecycleError(f"The rule is {len(rule)} characters long; at most {MAX_RULE_CHARS} are accepted.",
                                    fix="Split it into segments and combine them with `in segment 'name'`.", field="rule")
    if description is not None and len(description) > MAX_DESCRIPTION_CHARS:
        raise SegmentLifecycleError(f"The description is {len(description)} characters long; at most {MAX_DESCRIPTION_CHARS}.",
                                    fix="Shorten it.", field="description")


# --- reads --------------------------------------------------------------------------------------

_COLUMNS = "name, rule, description, identity_policy, version, created_by, created_at, updated_by, updated_at, deleted_at"


def _segment(row: tuple[Any, ...]) -> Segment:
    name, rule, description, policy, version, cby, cat, uby, uat, dat = row
    return Segment(str(name), str(rule), description, _json(policy), int(version), str(cby), cat, str(uby), uat, dat)


def find(engine: Engine, name: str, *, include_deleted: bool = False, cursor: Any = None) -> Segment | None:
    rows = engine.fetch_all(f"SELECT {_COLUMNS} FROM segments WHERE name = ?", [name],  # noqa: S608 - constant text
                            cursor=cursor if cursor is not None else engine.reader())
    if not rows:
        return None
    seg = _segment(rows[0])
    return seg if include_deleted or seg.deleted_at is None else None


def get(engine: Engine, name: str, *, include_deleted: bool = False, cursor: Any = None) -> Segment:
    seg = find(engine, name, include_deleted=include_deleted, cursor=cursor)
    if seg is None:
        known = [s.name for s in list_segments(engine, cursor=cursor)]
        raise SegmentNotFound(
            f"No segment {name!r}.",
            fix=f"Use one of: {', '.join(known)}." if known else "Create one first: refinery segments create NAME RULE",
            field="name",
        )
    return seg


def list_segments(engine: Engine, *, include_deleted: bool = False, cursor: Any = None) -> list[Segment]:
    where = "" if include_deleted else " WHERE deleted_at IS NULL"
    rows = engine.fetch_all(f"SELECT {_COLUMNS} FROM segments{where} ORDER BY name",  # noqa: S608 - constant text
                            cursor=cursor if cursor is not None else engine.reader())
    return [_segment(r) for r in rows]


def versions(engine: Engine, name: str, *, cursor: Any = None) -> list[Version]:
    rows = engine.fetch_all(
        "SELECT segment, version, rule, description, identity_policy, created_by, created_at FROM segment_versions "
        "WHERE segment = ? ORDER BY version", [name], cursor=cursor if cursor is not None else engine.reader(),
    )
    return [Version(str(s), int(v), str(r), d, _json(p), str(b), a) for s, v, r, d, p, b, a in rows]


def version_at(engine: Engine, name: str, at: datetime, *, cursor: Any = None) -> Version:
    """The version of `name` in force at `at`: the newest saved at or before `at`, unless the
    segment was deleted by then."""
    seg = get(engine, name, include_deleted=True, cursor=cursor)
    if seg.deleted_at is not None and seg.deleted_at <= at:
        raise SegmentLifecycleError(
            f"Segment {name!r} was deleted at {_iso(seg.deleted_at)}, before {_iso(at)}.",
            fix="Ask for a moment before it was deleted, or read its history: refinery segments history " + name,
            field="as_of",
        )
    found = [v for v in versions(engine, name, cursor=cursor) if v.created_at <= at]
    if not found:
        first = versions(engine, name, cursor=cursor)
        raise SegmentLifecycleError(
            f"Segment {name!r} did not exist at {_iso(at)}: its first rule was saved at {_iso(first[0].created_at) if first else '?'}.",
            fix="Ask for a moment after it was created.", field="as_of",
        )
    return found[-1]


def live_rules(engine: Engine, *, as_of: datetime | None = None, cursor: Any = None) -> dict[str, str]:
    """Every live segment's rule (as of `as_of`: the rule then in force, for segments alive then)."""
    if as_of is None:
        return {s.name: s.rule for s in list_segments(engine, cursor=cursor)}
    rows = engine.fetch_all(
        "SELECT v.segment, arg_max(v.rule, v.version) FROM segment_versions v JOIN segments s ON s.name = v.segment "
        "WHERE v.created_at <= ? AND (s.deleted_at IS NULL OR s.deleted_at > ?) GROUP BY v.segment",
        [as_of, as_of], cursor=cursor if cursor is not None else engine.reader(),
    )
    return {str(n): str(r) for n, r in rows}


# --- compiling ------------------------------------------------------------------------------------

def context(engine: Engine, *, as_of: datetime | None = None, segments: Mapping[str, str] | None = None, catalog: Any = None,
            cursor: Any = None, traits_as_of: Any = None) -> Any:
    """The compiler's context over this store: the catalog (built unless given: a run of many
    segments builds it once), the other segments' rules (in force at `as_of` when given), the
    computed traits, and the tokeniser for literals compared with personal fields.
    `traits_as_of` (a TraitPolicy): trait conditions read traits as of the evaluated moment."""
    from refinery.privacy.pii import token_for
    from refinery.segments import computed
    from refinery.segments.catalog import cached_catalog
    from refinery.segments.compile import CompileContext

    rules = live_rules(engine, as_of=as_of, cursor=cursor) if segments is None else dict(segments)

    def tokenise(kind: str, normal: str) -> str:
        return token_for(engine, kind, normal) or normal

    return CompileContext(
        catalog=catalog if catalog is not None else cached_catalog(engine),
        segments=rules,
        computed_traits=computed.expressions(engine, cursor=cursor),
        engine_dialect=engine.dialect,
        tokenise=tokenise,
        traits_as_of=traits_as_of,
    )


def compile_text(engine: Engine, rule: str, *, name: str | None = None, as_of: datetime | None = None, catalog: Any = None,
                 cursor: Any = None, traits_as_of: Any = None) -> Any:
    """Compile `rule` against this store. With `name`, the rule stands in for that segment's own
    (so `in segment` cycles through it are found before it is saved). `traits_as_of`: see `context`."""
    from refinery.segments.catalog import cached_catalog
    from refinery.segments.compile import compile_rule
    from refinery.segments.errors import UnknownNameError

    rules = live_rules(engine, as_of=as_of, cursor=cursor)
    if name is not None:
        rules[name] = rule
    try:
        return compile_rule(rule, context(engine, as_of=as_of, segments=rules, catalog=catalog, cursor=cursor, traits_as_of=traits_as_of), name=name)
    except UnknownNameError:
        if catalog is not None:
            raise
        # The cached catalog may predate a name first seen in the last minute: ask once more, fresh.
        fresh = cached_catalog(engine, fresh=True)
        return compile_rule(rule, context(engine, as_of=as_of, segments=rules, catalog=fresh, cursor=cursor, traits_as_of=traits_as_of), name=name)


def identity_policy(compiled: Any) -> dict[str, Any]:
    """The identity policy the compiler parsed from the rule (`counted by ...`), as stored in
    `segments.identity_policy`: `profiles` (deterministic) unless the rule says `counted by persons above T`."""
    policy = compiled.rule.policy
    if policy is None or policy.mode == "profiles":
        return {"mode": "profiles"}
    return {"mode": str(policy.mode), "threshold": float(policy.threshold)}


# --- changes (inside the writer) -------------------------------------------------------------------

def _save_version(engine: Engine, name: str, version: int, rule: str, description: str | None, policy: dict[str, Any],
                  actor: Principal, at: datetime) -> None:
    engine.execute(
        "INSERT INTO segment_versions (segment, version, rule, description, identity_policy, created_by, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)", [name, version, rule, description, json.dumps(policy, sort_keys=True), actor.name, at],
    )


def create(engine: Engine, actor: Principal, name: str, rule: str, description: str | None = None, *, catalog: Any = None) -> Segment:
    """Save a new segment (its rule compiled first). A name of a deleted segment is taken again,
    continuing its versions (its history stays). Call inside the writer; pass the `catalog` built
    before it (building one scans the events, which must not hold the writer)."""
    check_name(name)
    _check_text(rule, description)
    existing = find(engine, name, include_deleted=True, cursor=engine.reader())
    if existing is not None and existing.deleted_at is None:
        raise SegmentExists(f"Segment {name!r} exists already (version {existing.version}).",
                            fix=f"Change it with: refinery segments update {name} RULE, or choose another name.", field="name")
    compiled = compile_text(engine, rule, name=name, catalog=catalog)
    policy = identity_policy(compiled)
    at = datetime.now(UTC)
    if existing is None:
        version = 1
        engine.execute(
            f"INSERT INTO segments ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",  # noqa: S608 - constant text
            [name, rule, description, json.dumps(policy, sort_keys=True), version, actor.name, at, actor.name, at],
        )
    else:
        version = existing.version + 1
        engine.execute(
            "UPDATE segments SET rule = ?, description = ?, identity_policy = ?, version = ?, created_by = ?, created_at = ?, "
            "updated_by = ?, updated_at = ?, deleted_at = NULL, deleted_by = NULL WHERE name = ?",
            [rule, description, json.dumps(policy, sort_keys=True), version, actor.name, at, actor.name, at, name],
        )
    _save_version(engine, name, version, rule, description, policy, actor, at)
    audit.record(engine, actor, "segments.create", f"segment:{name}",
                 {"version": version, "identity_policy": policy.get("mode"), "conditions": len(compiled.conditions)})
    return Segment(name, rule, description, policy, version, actor.name, at, actor.name, at)


def update(engine: Engine, actor: Principal, name: str, rule: str | None = None, description: str | None = None, *,
           catalog: Any = None) -> Segment:
    """Save a new version of `name` with a new rule and/or description. Call inside the writer (see `create` on `catalog`)."""
    seg = get(engine, name, cursor=engine.reader())
    if rule is None and description is None:
        raise SegmentLifecycleError("Nothing to change.", fix="Give a new rule, a new description, or both.")
    new_rule = seg.rule if rule is None else rule
    new_description = seg.description if description is None else description
    _check_text(new_rule, new_description)
    if new_rule == seg.rule and new_description == seg.description:
        return seg
    compiled = compile_text(engine, new_rule, name=name, catalog=catalog)
    policy = identity_policy(compiled)
    at = datetime.now(UTC)
    version = seg.version + 1
    engine.execute(
        "UPDATE segments SET rule = ?, description = ?, identity_policy = ?, version = ?, updated_by = ?, updated_at = ? WHERE name = ?",
        [new_rule, new_description, json.dumps(policy, sort_keys=True), version, actor.name, at, name],
    )
    _save_version(engine, name, version, new_rule, new_description, policy, actor, at)
    audit.record(engine, actor, "segments.update", f"segment:{name}",
                 {"version": version, "rule_changed": new_rule != seg.rule, "identity_policy": policy.get("mode")})
    return Segment(name, new_rule, new_description, policy, version, seg.created_by, seg.created_at, actor.name, at)


def referrers(engine: Engine, name: str, *, catalog: Any = None, cursor: Any = None) -> list[str]:
    """Live segments whose rules reach `name` through `in segment` (directly or through another)."""
    from refinery.segments.errors import SegmentError

    rules = live_rules(engine, cursor=cursor)
    out = []
    for other, text in rules.items():
        if other == name:
            continue
        try:
            compiled = compile_text(engine, text, name=other, catalog=catalog, cursor=cursor)
        except SegmentError:
            continue  # a rule that no longer compiles reaches nothing; its runs fail with the reason
        if name in compiled.segments_referenced:
            out.append(other)
    return sorted(out)


def delete(engine: Engine, actor: Principal, name: str, *, catalog: Any = None) -> dict[str, Any]:
    """Delete `name`: its open memberships close now (with segment_exited rows in the outbox) and
    its definition and history stay. Refused while another segment uses it. Call inside the writer."""
    from refinery.segments import members

    seg = get(engine, name, cursor=engine.reader())
    users = referrers(engine, name, catalog=catalog, cursor=engine.reader())
    if users:
        raise SegmentInUse(
            f"Segment {name!r} is used by {', '.join(repr(u) for u in users)} (`in segment '{name}'`).",
            fix="Change or delete those segments first.", field="name",
        )
    at = datetime.now(UTC)
    closed = members.close_all(engine, name, seg.version, at, actor)
    engine.execute("UPDATE segments SET deleted_at = ?, deleted_by = ? WHERE name = ?", [at, actor.name, name])
    audit.record(engine, actor, "segments.delete", f"segment:{name}", {"version": seg.version, "exited": closed})
    return {"name": name, "deleted_at": _iso(at), "version": seg.version, "exited": closed}

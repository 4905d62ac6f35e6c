"""Why a profile is (or is not) in a segment: each condition of the rule, whether it held, and the
value that decided it, from the compiler's explain query; with the membership the runs recorded.

The values are as the store holds them (tokens for personal fields); the API and the CLI reveal
them to readers with `pii:read`. Explaining is a read of a person's data and is audited by the caller.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlglot import exp

from refinery.errors import NotFoundError
from refinery.segments import members, store
from refinery.storage.engine import Engine


def resolve_profile(engine: Engine, profile: str, rules: Any = None) -> str:
    """A profile id (followed through merges) or an identifier (`type:value`) to the live profile id."""
    from refinery.profiles import read

    if profile.startswith("prof_") or rules is None:
        live = read.survivor(engine, profile)
        if live is None:
            raise NotFoundError(f"No profile {profile!r}.",
                                fix="Give a profile id (prof_...) or an identifier such as email:jane@example.com.", field="profile")
        return live
    return str(read.lookup(engine, profile, rules)["profile_id"])


def explain(engine: Engine, name: str, profile: str, *, as_of: datetime | None = None, rules: Any = None,
            trait_policy: Any = None) -> dict[str, Any]:
    """Each condition of `name`'s rule (the version in force at `as_of`, default now) for one profile.
    Given `as_of` and the store's `trait_policy`, traits are those of that moment too."""
    at = (as_of or datetime.now(UTC)).astimezone(UTC)
    profile_id = resolve_profile(engine, profile, rules)
    cur = engine.fresh_reader()
    try:
        version = store.version_at(engine, name, at, cursor=cur)
        compiled = store.compile_text(engine, version.rule, name=name, as_of=at, cursor=cur,
                                      traits_as_of=trait_policy if as_of is not None else None)
        members.register_persons(engine, compiled, cur, rules)
        rows = engine.fetch_all(compiled.explain(profile_id, at), cursor=cur)
        is_member = engine.fetch_all(
            exp.select(exp.Count(this=exp.Star())).from_(compiled.members(at).subquery("_m"))
            .where(exp.column("profile_id").eq(exp.Literal.string(profile_id))),
            cursor=cur,
        )[0][0]
        stays = members.profile_history(engine, name, profile_id, cursor=cur)
    finally:
        cur.close()
    found = {str(r[0]): (r[1], r[2]) for r in rows}
    conditions = []
    for c in compiled.conditions:
        held, value = found.get(str(c.id), (None, None))
        conditions.append({"id": c.id, "kind": c.kind, "text": c.text, "segment": c.segment, "held": held, "value": value})
    recorded = bool(stays and stays[-1]["exited_at"] is None)
    return {
        "segment": name,
        "version": version.version,
        "rule": version.rule,
        "profile_id": profile_id,
        "requested": profile if profile != profile_id else None,
        "as_of": at.isoformat(),
        "member": bool(is_member),
        "recorded_member": recorded,
        "conditions": conditions,
        "history": stays,
    }

"""LLM context: a compact, token-budgeted summary of one profile for prompt augmentation.

    [user_segment: high_value_customer]
    [trait: plan = pro]
    [activity: 42 events, 2025-01-03 to 2026-11-22]
    [recent: Order Completed x3, last 2026-11-20]

The core (`build`) is pure: it takes the facts `gather` read and returns the lines that fit the
budget, the message ids each line came from, and what it left out and why. Nothing personal goes
in: traits of personal kinds, tokens, values that look like an email, phone or IP address, objects
and long free text are left out (named, never shown), and identifiers never appear. A person whose
personalisation consent does not allow it gets nothing. Design: docs/decisions/0027-llm-context.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from refinery.errors import NotFoundError
from refinery.privacy.pii import redact_text
from refinery.privacy.tokens import DEFAULT_TRAIT_FIELDS, TOKEN_PATTERN, kind_of

if TYPE_CHECKING:
    from refinery.governance.principal import Principal
    from refinery.runtime import Runtime
    from refinery.settings import Settings
    from refinery.storage.engine import Engine

# The permission `context:read` and the `assistant` role are declared in governance/permissions.py (decision 0027).

#: The consent purpose the context serves.
PURPOSE = "personalisation"
#: Budget bounds for `max_tokens` and the default.
DEFAULT_MAX_TOKENS = 256
MIN_MAX_TOKENS = 16
MAX_MAX_TOKENS = 4096
#: How many of the newest events `gather` reads for "recent behaviour", and message ids cited per line.
RECENT_EVENTS = 200
CITES_PER_LINE = 3
#: A string trait longer than this is free text (which may hold anything) and is left out.
MAX_VALUE_CHARS = 48
#: Kinds that are personal whatever the settings say (identifiers and the vault's kinds).
ALWAYS_PERSONAL = frozenset({kind_of(f) for f in DEFAULT_TRAIT_FIELDS} | {
    "ip", "user_id", "anonymous_id", "device_id", "advertising_id", "username", "full_name", "mobile", "address_line",
    "zip", "ssn", "tax_id", "passport", "iban", "card", "credit_card", "dob", "date_of_birth",
})
ESTIMATOR = "words4"
_PIECE = re.compile(r"\w+|[^\w\s]")
_TOKEN_IN_TEXT = re.compile(TOKEN_PATTERN)


def estimate_tokens(text: str) -> int:
    """The `words4` estimate: each run of letters/digits costs one token per 4 characters (at least
    one), each other non-space character one. BPE tokenisers (GPT-4's cl100k, o200k, Llama's) split
    this kind of short, label-like text no finer on average, so the estimate errs high. Deterministic,
    no network; additive over lines (a newline costs nothing)."""
    return sum(math.ceil(len(p) / 4) if p[0].isalnum() or p[0] == "_" else 1 for p in _PIECE.findall(text))


# --- facts (what gather reads) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Cite:
    source: str
    message_id: str


@dataclass(frozen=True)
class EventFact:
    source: str
    message_id: str
    type: str
    name: str | None
    timestamp: datetime


@dataclass(frozen=True)
class Facts:
    """What `build` needs about one profile, read by `gather`."""

    profile_id: str
    requested_id: str
    consent: str                       # granted | denied | unknown (personalisation)
    allowed: bool                      # the server's consent policy allows the context
    traits: Mapping[str, Any] = field(default_factory=dict)
    trait_sources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    segments: Sequence[tuple[str, datetime]] = ()        # open memberships: (segment, entered_at)
    computed: Sequence[tuple[str, Any]] = ()             # computed traits: (name, value)
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    event_count: int = 0
    events: Sequence[EventFact] = ()                     # newest first
    personal_kinds: frozenset[str] = ALWAYS_PERSONAL


# --- the result -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    section: str        # segment | trait | computed | activity | recent
    key: str            # what the line is about (a segment, a trait's name, an event's name)
    text: str
    rank: int           # lower is dropped first
    cites: tuple[Cite, ...] = ()

    @property
    def tokens(self) -> int:
        return estimate_tokens(self.text)


@dataclass
class Context:
    profile_id: str
    requested_id: str
    consent: str
    max_tokens: int
    lines: list[Line] = field(default_factory=list)
    dropped: list[Line] = field(default_factory=list)
    withheld: list[dict[str, str]] = field(default_factory=list)
    reason: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)

    def to_dict(self) -> dict[str, Any]:
        cites: dict[tuple[str, str], list[str]] = {}
        for line in self.lines:
            for c in line.cites:
                cites.setdefault((c.source, c.message_id), []).append(f"{line.section}:{line.key}")
        out: dict[str, Any] = {
            "profile_id": self.profile_id,
            "consent": {"purpose": PURPOSE, "state": self.consent},
            "context": self.text,
            "lines": [{"section": x.section, "key": x.key, "text": x.text, "tokens": x.tokens,
                       "cites": [c.message_id for c in x.cites]} for x in self.lines],
            "citations": [{"source": s, "message_id": m, "supports": sorted(set(what))} for (s, m), what in cites.items()],
            "tokens": {"estimate": estimate_tokens(self.text), "max": self.max_tokens, "estimator": ESTIMATOR},
            "dropped": [{"section": x.section, "key": x.key, "tokens": x.tokens} for x in self.dropped],
            "withheld": self.withheld,
        }
        if self.requested_id != self.profile_id:
            out["requested_id"], out["merged_into"] = self.requested_id, self.profile_id
        if self.reason:
            out["reason"] = self.reason
        return out


# --- the core ---------------------------------------------------------------------------------------
def _safe_text(text: str) -> bool:
    """Short, token-free, and nothing in it looks like an email, phone or IP address."""
    return 0 < len(text) <= MAX_VALUE_CHARS and not _TOKEN_IN_TEXT.search(text) and redact_text(text) == text and "\n" not in text


def _why_not(key: str, value: Any, personal: frozenset[str]) -> str | None:
    """Why a trait (or computed value) stays out of the context, or None when it may go in."""
    if not _safe_text(key):
        return "name_unsafe"
    if kind_of(key) in personal:
        return "personal_kind"
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):  # a long number may be a phone number
        return None if redact_text(_show(value)) == _show(value) else "looks_personal"
    if isinstance(value, str):
        if _TOKEN_IN_TEXT.search(value):
            return "token"
        if redact_text(value) != value:
            return "looks_personal"
        if not _safe_text(value):
            return "free_text"
        return None
    return "structured"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _day(at: datetime | None) -> str:
    return at.date().isoformat() if at is not None else "?"


def _cite(src: Mapping[str, Any] | None) -> tuple[Cite, ...]:
    if src and src.get("message_id") and src.get("source"):
        return (Cite(str(src["source"]), str(src["message_id"])),)
    return ()


def _ts(at: datetime | None) -> float:
    return at.timestamp() if at is not None else 0.0


def candidate_lines(facts: Facts) -> tuple[list[Line], list[dict[str, str]]]:
    """Every line the context could hold, in reading order, each ranked (lower is dropped first), and
    what was withheld (by name and reason, never the value)."""
    withheld: list[dict[str, str]] = []
    lines: list[Line] = []
    # Ranks: segments > traits > computed traits > activity > recent behaviour; within a section the
    # newer entry outranks the older one (the offset keeps sections apart).
    newest = sorted(facts.segments, key=lambda s: (_ts(s[1]), s[0]))
    for i, (name, _entered) in enumerate(newest):
        lines.append(Line("segment", name, f"[user_segment: {name}]", 40_000 + i))
    lines.sort(key=lambda x: x.key)

    traits = []
    for key in sorted(facts.traits):
        why = _why_not(key, facts.traits[key], facts.personal_kinds)
        if why:
            withheld.append({"section": "trait", "key": key if why != "name_unsafe" else "(unsafe name)", "reason": why})
            continue
        src = facts.trait_sources.get(key) or {}
        traits.append((str(src.get("at") or ""), key))
    order = {key: i for i, (_, key) in enumerate(sorted(traits))}
    for _, key in traits:
        lines.append(Line("trait", key, f"[trait: {key} = {_show(facts.traits[key])}]", 30_000 + order[key],
                          _cite(facts.trait_sources.get(key))))

    for i, (name, value) in enumerate(sorted(facts.computed, key=lambda c: c[0])):
        why = _why_not(name, value, facts.personal_kinds)
        if why:
            withheld.append({"section": "computed", "key": name if why != "name_unsafe" else "(unsafe name)", "reason": why})
            continue
        lines.append(Line("computed", name, f"[computed_trait: {name} = {_show(value)}]", 20_000 - i))

    if facts.event_count:
        lines.append(Line("activity", "activity",
                          f"[activity: {facts.event_count} events, {_day(facts.first_seen)} to {_day(facts.last_seen)}]", 10_000))

    groups: dict[str, list[EventFact]] = {}
    unsafe = 0
    for ev in facts.events:  # newest first
        if ev.type == "identify" or ev.type == "alias" or ev.type == "group":
            continue
        label = ev.name or {"page": "Page Viewed", "screen": "Screen Viewed"}.get(ev.type, ev.type)
        if not _safe_text(label):
            unsafe += 1
            continue
        groups.setdefault(label, []).append(ev)
    if unsafe:
        withheld.append({"section": "recent", "key": f"{unsafe} events", "reason": "name_unsafe"})
    by_recency = sorted(groups.items(), key=lambda g: (_ts(g[1][0].timestamp), g[0]), reverse=True)
    for i, (label, evs) in enumerate(by_recency):
        count = f" x{len(evs)}" if len(evs) > 1 else ""
        cites = tuple(Cite(e.source, e.message_id) for e in evs[:CITES_PER_LINE])
        lines.append(Line("recent", label, f"[recent: {label}{count}, last {_day(evs[0].timestamp)}]", 5_000 - i, cites))
    return lines, withheld


def build(facts: Facts, max_tokens: int = DEFAULT_MAX_TOKENS) -> Context:
    """The context for `facts` within `max_tokens` (by `estimate_tokens`): lines are dropped lowest
    rank first until the rest fits; what was dropped is listed. Nothing when consent does not allow it."""
    ctx = Context(facts.profile_id, facts.requested_id, facts.consent, max_tokens)
    if not facts.allowed:
        ctx.reason = f"personalisation consent is {facts.consent}: no context is given for this person"
        return ctx
    lines, ctx.withheld = candidate_lines(facts)
    total = sum(x.tokens for x in lines)
    keep = set(range(len(lines)))
    for i in sorted(range(len(lines)), key=lambda i: lines[i].rank):
        if total <= max_tokens:
            break
        keep.discard(i)
        total -= lines[i].tokens
        ctx.dropped.append(lines[i])
    ctx.lines = [x for i, x in enumerate(lines) if i in keep]
    return ctx


# --- I/O: gather, and the operation the API and the CLI call -----------------------------------------
def personal_kinds(settings: Settings) -> frozenset[str]:
    return ALWAYS_PERSONAL | {kind_of(f) for f in settings.pii_trait_fields} | {kind_of(f) for f in settings.pii_property_fields}


def _json(value: Any) -> Any:
    import json

    return json.loads(value) if isinstance(value, str) else value


def gather(engine: Engine, settings: Settings, profile_id: str, *, recent: int = RECENT_EVENTS) -> Facts:
    """Read what `build` needs on a reader cursor: the live profile (a merged id follows to its
    survivor; unknown or erased: NotFoundError), its personalisation consent and, only when that
    allows it, traits, open segment memberships, computed traits and the newest `recent` events."""
    from refinery.governance.consent import ConsentService
    from refinery.governance.purposes import policy_from_settings
    from refinery.profiles.read import survivor

    live = survivor(engine, profile_id)
    if live is None:
        raise NotFoundError(f"No profile {profile_id!r}: unknown, or erased by a privacy request.",
                            fix="Look the profile up by an identifier (refinery profiles show TYPE:VALUE) and use its profile_id.",
                            field="profile_id")
    state = ConsentService(engine).state(live, PURPOSE).state
    allowed = policy_from_settings(settings).allows(PURPOSE, state)
    if not allowed:
        return Facts(live, profile_id, state, False)
    cur = engine.reader()
    rows = engine.fetch_dicts("SELECT traits, trait_sources, first_seen, last_seen, event_count FROM profiles WHERE profile_id = ?",
                              [live], cursor=cur)
    if not rows:  # erased between the two reads
        raise NotFoundError(f"No profile {profile_id!r}: erased by a privacy request.", fix="Use a live profile id.", field="profile_id")
    p = rows[0]
    segments = engine.fetch_all(
        "SELECT m.segment, max(m.entered_at) FROM segment_members m JOIN segments s ON s.name = m.segment "
        "WHERE m.profile_id = ? AND m.exited_at IS NULL AND s.deleted_at IS NULL GROUP BY m.segment ORDER BY m.segment",
        [live], cursor=cur)
    computed = engine.fetch_all(
        "SELECT v.name, v.value FROM computed_trait_values v JOIN computed_traits t ON t.name = v.name "
        "WHERE v.profile_id = ? AND t.deleted_at IS NULL ORDER BY v.name", [live], cursor=cur)
    events = engine.fetch_all(
        "SELECT e.source, e.message_id, e.type, coalesce(e.event, e.name), e.timestamp "
        "FROM event_profiles a JOIN events e ON e.source = a.source AND e.message_id = a.message_id "
        "WHERE a.profile_id = ? ORDER BY e.timestamp DESC, e.source, e.message_id LIMIT ?", [live, recent], cursor=cur)
    return Facts(
        live, profile_id, state, True, _json(p["traits"]) or {}, _json(p["trait_sources"]) or {},
        [(str(s), at) for s, at in segments], [(str(n), _json(v)) for n, v in computed],
        p["first_seen"], p["last_seen"], int(p["event_count"] or 0),
        [EventFact(str(s), str(m), str(t), n, ts) for s, m, t, n, ts in events], personal_kinds(settings),
    )


def check_budget(max_tokens: int) -> int:
    from refinery.errors import QueryError

    if not MIN_MAX_TOKENS <= max_tokens <= MAX_MAX_TOKENS:
        raise QueryError(f"max_tokens {max_tokens} is out of range.", fix=f"Give a budget from {MIN_MAX_TOKENS} to {MAX_MAX_TOKENS}.",
                         field="max_tokens")
    return max_tokens


def profile_context(rt: Runtime, actor: Principal, profile_id: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> dict[str, Any]:
    """Gather, build, and audit as a profile read (before the answer leaves)."""
    from refinery.governance import audit

    check_budget(max_tokens)
    ctx = build(gather(rt.engine, rt.settings, profile_id), max_tokens)
    out = ctx.to_dict()
    audit.record_now(rt.writer, actor, "profiles.context", f"profile:{ctx.profile_id}",
                     {"requested_id": profile_id, "consent": ctx.consent, "lines": len(ctx.lines), "dropped": len(ctx.dropped),
                      "tokens": out["tokens"]["estimate"], "pii": False})
    return out


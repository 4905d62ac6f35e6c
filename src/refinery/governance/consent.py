"""Consent: the receipts (`consent_log`), the rule that turns them into a state, and the one
service every later stage asks.

- **Receipts.** Every change of a choice is one append-only row of `consent_log`: the subject
  (an identifier, normalised as identity resolution stores it), the purpose, `granted`/`denied`,
  where it came from (`event` with the event's source and message id, `tcf`, or `api` with the
  request id and the token's name), when it was made, and the evidence (the `categoryPreferences`
  object or the TC string), nothing else. Rows are never updated or deleted.
- **The rule** (docs/decisions/0010-consent.md). Per identifier and purpose, the latest choice
  wins (a grant newer than a denial of the *same identifier* replaces it; on a tie, the denial).
  Per profile, across its linked identifiers: if any identifier's latest choice is a denial the
  profile is `denied` (the most restrictive wins), else `granted` if any grant, else `unknown`.
  When identifiers of one profile disagree, that is a *conflict*: it is shown beside the state and
  recorded in `consent_conflicts` by `refinery.governance.consent_sync`.
- **The service.** `ConsentService(engine)`: `state`, `allowed(profile, purpose, policy)`, and
  `relation()`/`allowed_filter()` - sqlglot expressions for bulk checks that segments, features,
  exports and activation join instead of reading the tables themselves.

The profile state is computed from the log and the *current* identity graph at read time, so a
merge or split changes it at once, with no job to re-run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from sqlglot import exp

from refinery.errors import NotFoundError
from refinery.governance.purposes import PURPOSES, ConsentPolicy, InvalidConsent, check_purpose, from_tcf
from refinery.governance.tcf import decode as decode_tcf
from refinery.identity import sql
from refinery.identity.rules import PII_TYPES, IdentityRules
from refinery.privacy.normalise import normalise
from refinery.privacy.pii import protect_identifier
from refinery.storage.engine import Engine

__all__ = [
    "ConsentService", "ProfileConsent", "Signal", "latest_per_identifier", "parse_subject", "profile_state",
    "record", "record_request",
]

GRANTED, DENIED, UNKNOWN = "granted", "denied", "unknown"
CHOICE_STATES = (GRANTED, DENIED)


# --- the rule, in plain Python (the SQL below implements the same; a test holds them together) ------

@dataclass(frozen=True)
class Signal:
    """One receipt, as far as the rule cares."""

    subject_type: str
    subject_value: str
    purpose: str
    state: str
    at: datetime
    log_id: int
    source: str = ""
    origin: str = ""


def _newest_key(s: Signal) -> tuple[datetime, int, int]:
    # Newest first; on a tie in time the denial wins, then the later receipt.
    return (s.at, 1 if s.state == DENIED else 0, s.log_id)


def latest_per_identifier(signals: Iterable[Signal]) -> dict[tuple[str, str, str], Signal]:
    """(subject type, subject value, purpose) -> the choice in force for that identifier."""
    out: dict[tuple[str, str, str], Signal] = {}
    for s in signals:
        key = (s.subject_type, s.subject_value, s.purpose)
        if key not in out or _newest_key(s) > _newest_key(out[key]):
            out[key] = s
    return out


@dataclass(frozen=True)
class ProfileConsent:
    """A profile's state for one purpose, the receipt that decided it, and any conflict."""

    purpose: str
    state: str
    at: datetime | None = None
    source: str | None = None
    origin: str | None = None
    log_id: int | None = None
    subject: str | None = None
    conflict: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "purpose": self.purpose, "state": self.state, "at": self.at.isoformat() if self.at else None,
            "source": self.source, "origin": self.origin, "log_id": self.log_id, "subject": self.subject,
            "conflict": self.conflict,
        }


def profile_state(purpose: str, latest: Iterable[Signal]) -> ProfileConsent:
    """The most restrictive of the identifiers' current choices (their latest, one per identifier)."""
    mine = [s for s in latest if s.purpose == purpose]
    if not mine:
        return ProfileConsent(purpose, UNKNOWN)
    denied = [s for s in mine if s.state == DENIED]
    pool = denied or mine
    win = max(pool, key=lambda s: (s.at, s.log_id))
    return ProfileConsent(
        purpose, win.state, win.at, win.source, win.origin, win.log_id, f"{win.subject_type}:{win.subject_value}",
        conflict=bool(denied) and len(denied) < len(mine),
    )


# --- the same rule in SQL: the relation later stages join -----------------------------------

#: Latest choice per identifier and purpose (ties: the denial, then the later receipt).
_LATEST = """
SELECT log_id, subject_type, subject_value, purpose, state, origin, source, chosen_at FROM (
    SELECT l.*, row_number() OVER (
        PARTITION BY subject_type, subject_value, purpose
        ORDER BY chosen_at DESC, CASE WHEN state = 'denied' THEN 0 ELSE 1 END, log_id DESC) AS rn
    FROM consent_log l
) t WHERE rn = 1
"""

#: One row per (profile, purpose) with a choice: the most restrictive of its identifiers' latest.
_PROFILE_CONSENT = """
SELECT profile_id, purpose, state, chosen_at, source, origin, log_id, subject_type, subject_value, conflict FROM (
    SELECT i.profile_id, c.purpose, c.state, c.chosen_at, c.source, c.origin, c.log_id, c.subject_type, c.subject_value,
           min(c.state) OVER (PARTITION BY i.profile_id, c.purpose) <> max(c.state) OVER (PARTITION BY i.profile_id, c.purpose) AS conflict,
           row_number() OVER (
               PARTITION BY i.profile_id, c.purpose
               ORDER BY CASE WHEN c.state = 'denied' THEN 0 ELSE 1 END, c.chosen_at DESC, c.log_id DESC) AS rn
    FROM (__latest) c
    JOIN identities i ON i.identifier_type = c.subject_type AND i.value = c.subject_value
    WHERE i.profile_id IS NOT NULL
) t WHERE rn = 1
"""


#: Profiles whose state for the purpose `__purpose` is `denied`: those with an identifier whose latest
#: choice is a denial (the most restrictive wins). An identifier's latest choice is a denial exactly when a
#: denial carries its newest time (a tie goes to the denial; the receipt id only orders equal states), so
#: the receipts need no window: a grouped maximum per identifier, over only the identifiers `__candidates`
#: names (any superset of the denied ones: those with a denial for the purpose, or those of the profiles
#: asked about). The same answer as `profile_consent`, far cheaper over millions of receipts.
_DENIED_PROFILES = """
SELECT DISTINCT i.profile_id FROM __identities i JOIN (
    SELECT l.subject_type, l.subject_value FROM consent_log l
    SEMI JOIN __candidates d ON l.subject_type = d.subject_type AND l.subject_value = d.subject_value
    WHERE l.purpose = __purpose
    GROUP BY l.subject_type, l.subject_value
    HAVING max(l.chosen_at) FILTER (WHERE l.state = 'denied') = max(l.chosen_at)
) c ON i.identifier_type = c.subject_type AND i.value = c.subject_value
WHERE i.profile_id IS NOT NULL
"""
_WITH_DENIAL = "SELECT subject_type, subject_value FROM consent_log WHERE purpose = __purpose AND state = 'denied'"
_OF_IDENTITIES = "SELECT identifier_type AS subject_type, value AS subject_value FROM __identities"

#: Profiles with a choice for `__purpose` (an identifier with any receipt for it): `granted` are these
#: minus the denied ones, since an identifier's latest choice is either.
_CHOSEN_PROFILES = """
SELECT DISTINCT i.profile_id FROM __identities i
SEMI JOIN (SELECT subject_type, subject_value FROM consent_log WHERE purpose = __purpose) c
    ON i.identifier_type = c.subject_type AND i.value = c.subject_value
WHERE i.profile_id IS NOT NULL
"""


def latest_relation() -> exp.Expression:
    """`(log_id, subject_type, subject_value, purpose, state, origin, source, chosen_at)`: each identifier's current choice."""
    return sql.template(_LATEST)


def profile_consent_relation() -> exp.Expression:
    """`profile_consent(profile_id, purpose, state, chosen_at, source, origin, log_id, subject_type, subject_value, conflict)`.

    Only `granted`/`denied` rows: a (profile, purpose) absent from it is `unknown`."""
    return sql.template(_PROFILE_CONSENT, latest=exp.Subquery(this=latest_relation()))


# --- subjects ---------------------------------------------------------------------------------

def parse_subject(engine: Engine, identifier: str, rules: IdentityRules) -> tuple[str, str, exp.Expression]:
    """`type:value` -> (type, normalised value, the stored form as an expression).

    Consent is always about a typed identifier: a bare value is refused (it could be anyone's)."""
    kind, sep, raw = identifier.partition(":")
    kinds = sorted(set(rules.priority))
    if not sep or kind not in kinds or not raw.strip():
        raise InvalidConsent(
            f"{identifier!r} is not a typed identifier.",
            fix=f"Write it as type:value, e.g. user_id:u-123 or email:jane@example.com; types: {', '.join(kinds)}.",
            field="identifier",
        )
    n = normalise(kind, raw, None, rules.phone_region)
    if n.reason is not None:
        raise InvalidConsent(
            f"The {kind} in {identifier!r} is not usable ({n.reason}).", fix="Correct the identifier.", field="identifier",
        )
    stored: exp.Expression = exp.Literal.string(n.value)
    if kind in PII_TYPES:
        stored = protect_identifier(engine, kind, stored)
    return kind, n.value, stored


def _stored_value(engine: Engine, stored: exp.Expression) -> str:
    return str(engine.fetch_all(exp.select(stored.as_("v")))[0][0])


# --- recording (call inside the writer) ---------------------------------------------------------

_INSERT = (
    "INSERT INTO consent_log (log_id, subject_type, subject_value, profile_id, purpose, state, origin, source, message_id, "
    "request_id, actor, chosen_at, recorded_at, evidence) "
    "SELECT nextval('consent_log_seq'), ?, ?, (SELECT profile_id FROM identities WHERE identifier_type = ? AND value = ?), "
    "?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
)


@dataclass
class Recorded:
    subject_type: str
    choices: dict[str, str]
    request_id: str
    log_ids: list[int] = field(default_factory=list)
    tcf: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "subject_type": self.subject_type, "choices": self.choices,
                "log_ids": self.log_ids, "tcf": self.tcf}


def record(
    engine: Engine, subject_type: str, subject_value: str, choices: Mapping[str, str], *,
    origin: str, source: str, at: datetime, evidence: Mapping[str, Any] | None,
    message_id: str | None = None, request_id: str | None = None, actor: str | None = None,
    now: datetime | None = None,
) -> list[int]:
    """Append one receipt per purpose in `choices` (call inside the writer); returns the log ids."""
    recorded_at = now or datetime.now(UTC)
    ids = []
    for purpose, state in sorted(choices.items()):
        check_purpose(purpose)
        if state not in CHOICE_STATES:
            raise InvalidConsent(
                f"Consent state {state!r} for {purpose!r} is not a choice.", fix="Use 'granted' or 'denied'.", field=f"purposes.{purpose}",
            )
        engine.execute(_INSERT, [
            subject_type, subject_value, subject_type, subject_value, purpose, state, origin, source, message_id,
            request_id, actor, at, recorded_at, json.dumps(dict(evidence)) if evidence is not None else None,
        ])
        ids.append(int(engine.fetch_all("SELECT currval('consent_log_seq')")[0][0]))
    return ids


def choices_from_request(purposes: Mapping[str, Any] | None, tc_string: str | None, *, now: datetime | None = None) -> tuple[dict[str, str], dict[str, Any] | None]:
    """Validate an API request's choices: `purposes` (purpose -> granted/denied, or true/false) and/or
    a TC string. Returns the choices and, for a TC string, its decoded summary."""
    choices: dict[str, str] = {}
    tcf: dict[str, Any] | None = None
    if tc_string is not None:
        tc = decode_tcf(tc_string, now=now)
        tcf = tc.to_dict()
        choices.update(from_tcf(tc.purposes_consent))
    unknown = sorted(p for p in (purposes or {}) if p not in PURPOSES)
    if unknown:
        check_purpose(unknown[0])
    for purpose, value in (purposes or {}).items():
        state = {True: GRANTED, False: DENIED}.get(value, value) if isinstance(value, bool) else value
        if state not in CHOICE_STATES:
            raise InvalidConsent(
                f"Consent for {purpose!r} is {value!r}, not a choice.", fix="Use 'granted' or 'denied' (or true/false).",
                field=f"purposes.{purpose}",
            )
        if purpose in choices and choices[purpose] != state:
            state = DENIED  # a request that says both: the most restrictive
        choices[purpose] = state
    if not choices:
        raise InvalidConsent(
            "The request records no choice.",
            fix=f"Send purposes (e.g. {{\"marketing\": \"granted\"}}; valid: {', '.join(PURPOSES)}) or a tcString.",
            field="purposes",
        )
    return choices, tcf


def record_request(
    engine: Engine, rules: IdentityRules, identifier: str, purposes: Mapping[str, Any] | None, tc_string: str | None,
    *, actor: str | None, now: datetime | None = None,
) -> Recorded:
    """Record a choice made through the API (call inside the writer)."""
    moment = now or datetime.now(UTC)
    kind, _, stored = parse_subject(engine, identifier, rules)
    choices, tcf = choices_from_request(purposes, tc_string, now=moment)
    value = _stored_value(engine, stored)
    evidence: dict[str, Any] = {}
    if purposes:
        evidence["purposes"] = {p: choices[p] for p in purposes}
    if tc_string is not None:
        evidence["tcString"] = tc_string
        evidence["tcf_purposes_consent"] = (tcf or {}).get("purposes_consent")
    request_id = "req_" + uuid.uuid4().hex
    origin = "tcf" if tc_string is not None and not purposes else "api"
    ids = record(engine, kind, value, choices, origin=origin, source="api", at=moment, evidence=evidence,
                 request_id=request_id, actor=actor, now=moment)
    return Recorded(kind, choices, request_id, ids, tcf)


# --- the service -------------------------------------------------------------------------------

def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


class ConsentService:
    """The one way to ask about consent. Reads run on the caller's reader cursor."""

    def __init__(self, engine: Engine):
        self.engine = engine

    # single profile
    def states(self, profile_id: str) -> dict[str, ProfileConsent]:
        """Every purpose's state for a profile (following merges to the surviving profile)."""
        from refinery.profiles.read import survivor

        live = survivor(self.engine, profile_id) or profile_id
        query = exp.select("*").from_(exp.Subquery(this=profile_consent_relation(), alias=exp.TableAlias(this=exp.to_identifier("pc")))) \
            .where(exp.column("profile_id").eq(exp.Literal.string(live)))
        out = {p: ProfileConsent(p, UNKNOWN) for p in PURPOSES}
        for r in self.engine.fetch_dicts(query, cursor=self.engine.reader()):
            out[r["purpose"]] = ProfileConsent(
                r["purpose"], r["state"], r["chosen_at"], r["source"], r["origin"], r["log_id"],
                f"{r['subject_type']}:{r['subject_value']}", bool(r["conflict"]),
            )
        return out

    def state(self, profile_id: str, purpose: str) -> ProfileConsent:
        return self.states(profile_id)[check_purpose(purpose)]

    def allowed(self, profile_id: str, purpose: str, policy: ConsentPolicy | None = None) -> bool:
        return (policy or ConsentPolicy()).allows(purpose, self.state(profile_id, purpose).state)

    # bulk
    @staticmethod
    def relation() -> exp.Expression:
        """The `profile_consent` relation (see `profile_consent_relation`) to join in bulk checks."""
        return profile_consent_relation()

    @staticmethod
    def allowed_filter(profile_id: exp.Expression, purpose: str, policy: ConsentPolicy | None = None, *,
                       identities: exp.Expression | None = None) -> exp.Expression:
        """A condition on `profile_id` that holds when the policy allows `purpose` for that profile:
        `profile_id IN (granted)`, or - where the policy allows unknown - `profile_id NOT IN (denied)`.

        The same states as `profile_consent_relation`, worked out for the one purpose without its windows
        (`_DENIED_PROFILES`, `_CHOSEN_PROFILES`): granted = chosen and not denied. `identities`, a relation
        `(identifier_type, value, profile_id)`, replaces the identities table for a check of a known set of
        profiles (a delivery batch): it must hold every identifier of every profile `profile_id` can be;
        only their receipts are read."""
        check_purpose(purpose)
        policy = policy or ConsentPolicy()
        lit = exp.Literal.string(purpose)
        idents = identities if identities is not None else exp.to_table("identities")
        candidates = sql.template(_OF_IDENTITIES, identities=idents) if identities is not None else sql.template(_WITH_DENIAL, purpose=lit)
        denied = sql.template(_DENIED_PROFILES, identities=idents, candidates=exp.Subquery(this=candidates), purpose=lit)
        not_denied = exp.Not(this=exp.In(this=profile_id.copy(), query=exp.Subquery(this=denied)))
        if purpose in policy.unknown_allowed:
            return not_denied
        chosen = exp.In(this=profile_id.copy(), query=exp.Subquery(this=sql.template(_CHOSEN_PROFILES, identities=idents, purpose=lit)))
        return exp.And(this=chosen, expression=not_denied)

    # identifiers and receipts (the API's view)
    def receipts(self, where: exp.Expression, limit: int = 1000) -> list[dict[str, Any]]:
        """Receipts of the identifiers `where` selects (a condition on `l.subject_type`/`l.subject_value`), newest first."""
        query = sql.template("""
            SELECT l.log_id, l.subject_type || ':' || l.subject_value AS subject, l.purpose, l.state, l.origin, l.source,
                   l.message_id, l.request_id, l.actor, l.chosen_at, l.recorded_at, l.evidence
            FROM consent_log l WHERE __where ORDER BY l.chosen_at DESC, l.log_id DESC LIMIT __limit
        """, where=where, limit=exp.Literal.number(limit))
        rows = self.engine.fetch_dicts(query, cursor=self.engine.reader())
        for r in rows:
            r["chosen_at"], r["recorded_at"] = _iso(r["chosen_at"]), _iso(r["recorded_at"])
            if isinstance(r["evidence"], str):
                r["evidence"] = json.loads(r["evidence"])
        return rows

    def for_identifier(self, identifier: str, rules: IdentityRules, *, limit: int = 1000) -> dict[str, Any]:
        """An identifier's own current choices with their receipts, and - when it belongs to a
        profile - the profile's state per purpose with its conflicts."""
        kind, _, stored = parse_subject(self.engine, identifier, rules)
        latest = exp.select("*").from_(exp.Subquery(this=latest_relation(), alias=exp.TableAlias(this=exp.to_identifier("l")))).where(
            exp.and_(exp.column("subject_type").eq(exp.Literal.string(kind)), exp.column("subject_value").eq(stored.copy()))
        )
        own = {p: {"state": UNKNOWN} for p in PURPOSES}
        for r in self.engine.fetch_dicts(latest, cursor=self.engine.reader()):
            own[r["purpose"]] = {"state": r["state"], "at": _iso(r["chosen_at"]), "source": r["source"], "origin": r["origin"], "log_id": r["log_id"]}
        own_subject = exp.and_(
            exp.column("subject_type", table="l").eq(exp.Literal.string(kind)), exp.column("subject_value", table="l").eq(stored.copy())
        )
        receipts = self.receipts(cast(exp.Expression, own_subject), limit)
        ident = self.engine.fetch_all(
            exp.select("profile_id", "status").from_("identities").where(
                exp.and_(exp.column("identifier_type").eq(exp.Literal.string(kind)), exp.column("value").eq(stored.copy()))
            ), cursor=self.engine.reader(),
        )
        if not receipts and not ident:
            raise NotFoundError(
                f"No consent and no identifier {identifier!r} is known.",
                fix="Record a choice with: refinery consent set " + identifier + " --grant PURPOSE, or check the identifier.",
            )
        body: dict[str, Any] = {"identifier": identifier, "identifier_type": kind, "identifier_consent": own, "receipts": receipts}
        profile_id = ident[0][0] if ident else None
        body["profile_id"] = profile_id
        body["identity_status"] = ident[0][1] if ident else None
        if profile_id:
            states = self.states(profile_id)
            body["consent"] = {p: s.to_dict() for p, s in states.items()}
            body["conflicts"] = self.conflicts(profile_id)
            # The receipts of every identifier of the profile: the ones that decided its state.
            body["receipts"] = self.receipts(sql.template(
                "(l.subject_type, l.subject_value) IN (SELECT identifier_type, value FROM identities WHERE profile_id = __pid)",
                pid=exp.Literal.string(profile_id),
            ), limit)
        else:
            body["consent"] = {p: dict(v, purpose=p, conflict=False) for p, v in own.items()}
            body["conflicts"] = []
        return body

    def conflicts(self, profile_id: str) -> list[dict[str, Any]]:
        """The identifiers of a profile whose current choices disagree, per purpose (live)."""
        lat = exp.Subquery(this=latest_relation(), alias=exp.TableAlias(this=exp.to_identifier("c")))
        query = sql.template("""
            SELECT c.purpose, c.state, c.subject_type, c.subject_value, c.chosen_at, c.source, c.origin, c.log_id
            FROM __lat JOIN identities i ON i.identifier_type = c.subject_type AND i.value = c.subject_value
            WHERE i.profile_id = __pid
            ORDER BY c.purpose, c.state, c.chosen_at DESC
        """, lat=lat, pid=exp.Literal.string(profile_id))
        by_purpose: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for r in self.engine.fetch_dicts(query, cursor=self.engine.reader()):
            side = by_purpose.setdefault(r["purpose"], {GRANTED: [], DENIED: []})
            side[r["state"]].append({"subject": f"{r['subject_type']}:{r['subject_value']}", "at": _iso(r["chosen_at"]),
                                     "source": r["source"], "origin": r["origin"], "log_id": r["log_id"]})
        return [
            {"purpose": p, "resolution": DENIED, "reason": "identifiers_disagree", "denied": s[DENIED], "granted": s[GRANTED]}
            for p, s in sorted(by_purpose.items()) if s[DENIED] and s[GRANTED]
        ]

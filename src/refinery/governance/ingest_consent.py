"""Consent at the door: what is kept of an event from a person who denied analytics.

The setting `analytics_denied_events` says:

- `keep`: stored as sent; every later stage asks the consent service before using it.
- `minimise` (default): stored without what makes it behavioural data: properties, the page (url,
  path, referrer, title, search), campaign, device details, location, IP, user agent, and traits
  other than the identifiers resolution needs (email, phone, device and advertising ids). It keeps its type, name, time, identifiers and
  consent (so the denial itself is recorded and resolution can apply it to the whole profile), and
  says so in `context.refinery.minimised`.

"Denied" is either the event's own consent (`context.consent.categoryPreferences` with an
analytics category false, or a TCF v2 string without the purposes analytics needs), or the
person's: a user or anonymous id whose latest choice, or whose profile's most restrictive choice,
denies analytics (refreshed from the consent log every few seconds, in the writer).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from refinery.governance.purposes import CategoryMap, from_tcf
from refinery.governance.tcf import TCFError
from refinery.governance.tcf import decode as decode_tcf
from refinery.privacy.normalise import clean_text
from refinery.storage.engine import Engine

AnalyticsDenied = Literal["keep", "minimise"]

#: Top-level fields a minimised event keeps.
_KEPT = ("type", "event", "userId", "anonymousId", "previousId", "groupId", "messageId", "timestamp",
         "originalTimestamp", "sentAt", "receivedAt", "channel", "version")
#: Traits a minimised event keeps: identifiers (already tokens), which resolution needs to apply the denial.
_KEPT_TRAITS = ("email", "phone")
_KEPT_CONTEXT = ("consent", "gdpr_consent", "externalIds")

_DENIED_IDS = """
SELECT i.identifier_type, i.value
FROM identities i JOIN (__profile_consent) pc ON pc.profile_id = i.profile_id
WHERE pc.purpose = 'analytics' AND pc.state = 'denied' AND i.identifier_type IN ('user_id', 'anonymous_id')
UNION
SELECT subject_type, subject_value FROM (__latest) l
WHERE l.purpose = 'analytics' AND l.state = 'denied' AND l.subject_type IN ('user_id', 'anonymous_id')
"""


@dataclass
class ConsentGate:
    mode: AnalyticsDenied = "minimise"
    categories: CategoryMap = field(default_factory=CategoryMap.build)
    refresh_seconds: float = 5.0
    _denied: set[tuple[str, str]] = field(default_factory=set, repr=False)
    _loaded_at: float = field(default=-1e9, repr=False)
    _tcf: OrderedDict[str, bool | None] = field(default_factory=OrderedDict, repr=False)

    @property
    def active(self) -> bool:
        return self.mode != "keep"

    def refresh(self, engine: Engine, *, force: bool = False) -> None:
        """Reload the identifiers whose person denied analytics (at most every `refresh_seconds`)."""
        now = time.monotonic()
        if not self.active or (not force and now - self._loaded_at < self.refresh_seconds):
            return
        from refinery.governance.consent import latest_relation, profile_consent_relation
        from refinery.identity import sql

        query = sql.template(_DENIED_IDS, profile_consent=profile_consent_relation(), latest=latest_relation())
        self._denied = {(str(k), str(v)) for k, v in engine.fetch_all(query)}
        self._loaded_at = now

    def reason(self, event: dict[str, Any]) -> str | None:
        """Why analytics is denied for this event (`event_consent`, `person_consent`), or None."""
        if not self.active:
            return None
        if self._event_denies(event):
            return "event_consent"
        if self._denied:
            for name, kind in (("userId", "user_id"), ("anonymousId", "anonymous_id")):
                value = event.get(name)
                if isinstance(value, str) and (kind, clean_text(value)) in self._denied:
                    return "person_consent"
        return None

    def _event_denies(self, event: dict[str, Any]) -> bool:
        context = event.get("context")
        if not isinstance(context, dict):
            return False
        consent = context.get("consent")
        if isinstance(consent, dict):
            prefs = consent.get("categoryPreferences")
            if isinstance(prefs, dict) and any(
                v is False and self.categories.purpose(str(k)) == "analytics" for k, v in prefs.items()
            ):
                return True
            tc = consent.get("tcString") or consent.get("tcfString")
        else:
            tc = None
        tc = tc or context.get("gdpr_consent")
        return isinstance(tc, str) and self._tcf_denies(tc)

    def _tcf_denies(self, tc: str) -> bool:
        if tc not in self._tcf:
            try:
                state = from_tcf(decode_tcf(tc).purposes_consent).get("analytics")
                self._tcf[tc] = state == "denied"
            except TCFError:
                self._tcf[tc] = None  # a bad string decides nothing (the consent job reports it)
            if len(self._tcf) > 10_000:
                self._tcf.popitem(last=False)
        return bool(self._tcf[tc])


def minimise(event: dict[str, Any], reason: str) -> dict[str, Any]:
    """What `minimise` keeps of an event (see the module docstring)."""
    out = {k: event[k] for k in _KEPT if k in event}
    traits = event.get("traits")
    if isinstance(traits, dict):
        out["traits"] = {k: traits[k] for k in _KEPT_TRAITS if k in traits}
    context = event.get("context")
    kept = {k: context[k] for k in _KEPT_CONTEXT if isinstance(context, dict) and k in context}
    ctx_traits = context.get("traits") if isinstance(context, dict) else None
    if isinstance(ctx_traits, dict):
        kept["traits"] = {k: ctx_traits[k] for k in _KEPT_TRAITS if k in ctx_traits}
    device = context.get("device") if isinstance(context, dict) else None
    if isinstance(device, dict) and (ids := {k: device[k] for k in ("id", "advertisingId") if k in device}):
        kept["device"] = ids  # identifiers only: the model, OS and screen go
    out["context"] = {**kept, "refinery": {"minimised": f"analytics_denied:{reason}"}}
    return out

"""A feature's definition: what it computes (an aggregate expression or a SELECT), for which
entity, over which window, how long a materialised value may be served, who owns it.

    lifetime_value   sum(total) of 'Order Completed'                       (expression)
    orders_90d       count of 'Order Completed'           window 90 days   (expression + window)
    basket_skus      SELECT ep.profile_id, count(DISTINCT ...) AS value ... (sql)

Pure: no I/O. `registry.py` stores definitions, `compile.py` compiles them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from refinery.features.errors import FeatureError

#: Feature names: as trait names (`orders_90d`), so they read the same in rules and data frames.
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
ENTITIES = ("profile",)
KINDS = ("expression", "sql")
_DURATION = re.compile(r"^\s*(\d+)\s*(second|minute|hour|day|week)s?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400, "week": 604_800}


@dataclass(frozen=True)
class Feature:
    name: str
    version: int
    entity: str
    kind: str                  # expression | sql
    definition: str            # the aggregate expression, or the SELECT
    window: str | None         # e.g. '90 days' (expression features only)
    ttl_seconds: int | None
    value_type: str | None
    owner: str
    description: str | None
    created_by: str
    created_at: datetime
    updated_by: str | None = None
    updated_at: datetime | None = None

    @property
    def ref(self) -> str:
        """`name@version`: the exact definition, as a training set can ask for it."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("created_at", "updated_at"):
            d[k] = d[k].astimezone(UTC).isoformat() if d[k] is not None else None
        return d


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise FeatureError(f"Feature name {name!r} is not allowed.",
                           fix="Use letters, digits and '_', starting with a letter, at most 64 characters, e.g. orders_90d.",
                           field="name")
    return name


def check_entity(entity: str) -> str:
    if entity not in ENTITIES:
        raise FeatureError(f"Entity {entity!r} is not one this feature store keys features by.",
                           fix=f"Use one of: {', '.join(ENTITIES)}.", field="entity")
    return entity


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise FeatureError(f"Feature kind {kind!r} is unknown.", fix=f"Use one of: {', '.join(KINDS)}.", field="kind")
    return kind


def parse_duration(text: str | int | None, field: str) -> timedelta | None:
    """'90 days', '12 hours', '1 week' (also a number of seconds) -> timedelta; None stays None."""
    if text is None or text == "":
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        seconds = text
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise FeatureError(f"{field} {text!r} is not a duration.",
                               fix="Write a whole number and a unit: seconds, minutes, hours, days or weeks, e.g. '90 days'.",
                               field=field)
        seconds = int(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    if seconds <= 0:
        raise FeatureError(f"{field} {text!r} is not longer than zero.", fix="Give a positive duration, e.g. '30 days'.", field=field)
    return timedelta(seconds=seconds)


def window_text(window: str | None) -> str | None:
    """The window in the rule language's words (`90 days`), checked; None without one."""
    delta = parse_duration(window, "window")
    if delta is None:
        return None
    if not isinstance(window, str):
        return f"{int(delta.total_seconds())} seconds"
    m = _DURATION.match(window)
    assert m is not None
    n, unit = int(m.group(1)), m.group(2).lower()
    return f"{n} {unit}{'' if n == 1 else 's'}"

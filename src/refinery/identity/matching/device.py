"""Device and session signals: anonymous and device ids that look like one browser or phone.

Two identifiers are linked when they were active on the same IP address with the same user agent
within a time window of each other: a cookie cleared and set again, an app reinstalled, a
private window. These signals are weak (a household's two identical phones look the same), so
their scores are capped (`DeviceSignalConfig.score_cap`, 0.6 by default) well below what a
person-record match or a deterministic edge carries, and an IP address that is seen with many
distinct devices on one day (an office, a campus, a carrier's NAT) links nothing at all.

Score of a pair = cap * (1 - 0.5 ** days) * 2 / max(2, devices), where `days` counts the days on
which the two were close in time on the same IP and user agent, and `devices` is the most
distinct devices that IP saw on one day: one close day with only the two of them gives half
the cap, three days give 7/8 of it, an IP shared by four devices halves the score.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyarrow as pa

from refinery.identity.matching.errors import MatchingError
from refinery.identity.matching.links import DEVICE_SIGNAL, build_links, fingerprint
from refinery.storage.engine import Engine

if TYPE_CHECKING:
    from refinery.settings import Settings

PIPELINE_VERSION = 1


@dataclass(frozen=True)
class DeviceSignalConfig:
    window_seconds: int = 1800  # activity this close in time counts as "together"
    max_devices_per_ip: int = 5  # an IP seen with more distinct devices on one day links nothing
    score_cap: float = 0.6  # no device-signal link scores higher

    def __post_init__(self) -> None:
        if not 0.0 < self.score_cap <= 0.6:
            raise MatchingError(
                f"The device-signal score cap must be in (0, 0.6]; got {self.score_cap}.",
                field="matching_device_score_cap",
                fix="Device signals are weak evidence; keep their cap at or below 0.6 so that a policy "
                "threshold above it excludes them.",
            )
        if self.window_seconds <= 0 or self.max_devices_per_ip < 2:
            raise MatchingError(
                "The device-signal window must be positive and the per-IP device limit at least 2; "
                f"got {self.window_seconds} s and {self.max_devices_per_ip}.",
                field="matching_device_window_seconds" if self.window_seconds <= 0 else "matching_device_max_per_ip",
                fix="Use e.g. a 1800 s window and a limit of 5 devices per IP.",
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> DeviceSignalConfig:
        return cls(
            window_seconds=settings.matching_device_window_seconds,
            max_devices_per_ip=settings.matching_device_max_per_ip,
            score_cap=settings.matching_device_score_cap,
        )

    @property
    def model_version(self) -> str:
        return "ds-" + fingerprint({"pipeline": PIPELINE_VERSION, **asdict(self)})


# Constant SQL over the clean zone; only the bound parameters vary.
SIGNALS_SQL = """
WITH obs AS (
    SELECT 'anonymous_id' AS id_type, anonymous_id AS id_value, ip, user_agent, "timestamp" AS ts
    FROM events
    WHERE anonymous_id IS NOT NULL AND ip IS NOT NULL AND user_agent IS NOT NULL
    UNION ALL
    SELECT 'device_id', device_id, ip, user_agent, "timestamp"
    FROM events
    WHERE device_id IS NOT NULL AND ip IS NOT NULL AND user_agent IS NOT NULL
),
ip_daily AS (
    SELECT ip, CAST(ts AS DATE) AS day, count(DISTINCT id_type || ':' || id_value) AS devices
    FROM obs GROUP BY ip, day
),
ip_load AS (
    SELECT ip, max(devices) AS devices FROM ip_daily GROUP BY ip
),
visits AS (
    SELECT o.id_type, o.id_value, o.ip, o.user_agent, l.devices,
           date_trunc('hour', o.ts) AS hour, min(o.ts) AS first_ts, max(o.ts) AS last_ts
    FROM obs AS o JOIN ip_load AS l ON l.ip = o.ip
    WHERE l.devices BETWEEN 2 AND $max_devices
    GROUP BY o.id_type, o.id_value, o.ip, o.user_agent, l.devices, hour
),
close AS (
    SELECT a.id_type AS a_type, a.id_value AS a_value, b.id_type AS b_type, b.id_value AS b_value,
           a.devices, CAST(least(a.first_ts, b.first_ts) AS DATE) AS day,
           greatest(0, epoch(greatest(a.first_ts, b.first_ts)) - epoch(least(a.last_ts, b.last_ts))) AS gap
    FROM visits AS a
    JOIN visits AS b
      ON a.ip = b.ip AND a.user_agent = b.user_agent
     AND (a.id_type < b.id_type OR (a.id_type = b.id_type AND a.id_value < b.id_value))
     AND b.first_ts <= a.last_ts + to_seconds($window) AND a.first_ts <= b.last_ts + to_seconds($window)
),
same_event AS (  -- an anonymous id and a device id sent together are a deterministic edge already
    SELECT DISTINCT anonymous_id, device_id FROM events WHERE anonymous_id IS NOT NULL AND device_id IS NOT NULL
),
pairs AS (
    SELECT a_type, a_value, b_type, b_value, count(DISTINCT day) AS days, max(devices) AS devices,
           min(gap) AS closest
    FROM close GROUP BY a_type, a_value, b_type, b_value
)
SELECT p.a_type, p.a_value, p.b_type, p.b_value, p.days, p.devices, p.closest,
       round($cap * (1 - power(0.5, p.days)) * 2.0 / greatest(p.devices, 2), 6) AS score
FROM pairs AS p
WHERE NOT EXISTS (
    SELECT 1 FROM same_event AS s
    WHERE p.a_type = 'anonymous_id' AND p.b_type = 'device_id' AND s.anonymous_id = p.a_value AND s.device_id = p.b_value
)
ORDER BY p.a_type, p.a_value, p.b_type, p.b_value
"""


def device_signal_links(engine: Engine, config: DeviceSignalConfig | None = None, *, now: datetime | None = None) -> pa.Table:
    """Score device-signal links over the clean `events` table; read-only, on a reader cursor."""
    config = config or DeviceSignalConfig()
    params = {"window": config.window_seconds, "max_devices": config.max_devices_per_ip, "cap": config.score_cap}
    rows = engine.fetch_dicts(SIGNALS_SQL, params, cursor=engine.reader())
    return build_links(
        (
            {
                "a_type": r["a_type"], "a_value": r["a_value"], "b_type": r["b_type"], "b_value": r["b_value"],
                "score": float(r["score"]),
                "evidence": json.dumps(
                    {
                        "days_together": int(r["days"]),
                        "closest_seconds": round(float(r["closest"]), 3),
                        "devices_on_ip": int(r["devices"]),
                        "window_seconds": config.window_seconds,
                        "same_user_agent": True,
                    },
                    sort_keys=True,
                ),
            }
            for r in rows
        ),
        method=DEVICE_SIGNAL,
        model_version=config.model_version,
        created_at=now or datetime.now(UTC),
    )  # fmt: skip

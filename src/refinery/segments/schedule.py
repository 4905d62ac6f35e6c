"""`refinery serve`'s segment job: every `segments_interval_minutes`, as the system principal,
re-materialise the computed traits that may have changed (defined or changed since they were last
computed, events loaded since, or a day passed: windows such as `in last 90 days` roll), then
recompute every live segment whose inputs changed (members.run_segments skips the others).

A failed segment is recorded as a failed run with its reason and the others carry on; an error of
the job itself is logged (its type only: no personal data) and the server carries on.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from refinery.segments import computed, members
from refinery.settings import Settings
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer

log = logging.getLogger(__name__)


def run_once(engine: Engine, writer: Writer, settings: Settings) -> members.RunReport:
    from refinery.governance import lineage
    from refinery.identity import rules_from_settings

    started = datetime.now(UTC)
    traits = refresh_traits(engine, writer)
    if traits:
        lineage.after_the_fact(settings, lineage.COMPUTED_TRAITS, started, lambda lr: lr.record_computed_traits(traits))
    started = datetime.now(UTC)
    report = members.run_segments(engine, writer, members.SYSTEM, trigger="scheduled", rules=rules_from_settings(settings))
    if report.runs:  # a run that skipped every segment did nothing worth a lineage run
        lineage.after_the_fact(settings, lineage.SEGMENTS_RUN, started, lambda lr: lr.record_segment_runs(report.to_dict()))
    changed = [r for r in report.runs if r.status == "completed" and (r.entered or r.exited)]
    if report.runs:
        log.info("segments: %d recomputed (%d changed, %d failed), %d unchanged", len(report.runs), len(changed),
                 len(report.failed), len(report.skipped))
    return report


#: Computed traits are recomputed at least this often, so relative windows roll forward.
_TRAIT_MAX_AGE = timedelta(days=1)


def refresh_traits(engine: Engine, writer: Writer, now: datetime | None = None) -> list[str]:
    """Re-materialise the computed traits that may have changed; returns their names. A trait that
    fails is logged (its type only) and the others carry on."""
    at = now or datetime.now(UTC)
    newest = engine.fetch_all("SELECT max(loaded_at) FROM events", cursor=engine.reader())[0][0]
    done = []
    for trait in computed.list_traits(engine):
        last = trait.computed_at
        stale = (last is None or trait.updated_at > last or (newest is not None and newest > last)
                 or at - last >= _TRAIT_MAX_AGE)
        if not stale:
            continue
        try:
            computed.materialise(engine, writer, members.SYSTEM, trait.name, as_of=at)
            done.append(trait.name)
        except Exception as e:  # one trait's failure must not stop the others or the segments
            log.warning("segments: computed trait %s failed: %s", trait.name, type(e).__name__)
    return done


async def scheduled(engine: Engine, writer: Writer, settings: Settings) -> None:
    """Run `run_once` every `segments_interval_minutes` (0: never), the first time one interval after start."""
    interval = settings.segments_interval_minutes * 60
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(run_once, engine, writer, settings)
        except Exception as e:  # never take the server down
            log.warning("segments: scheduled run failed: %s", type(e).__name__)

"""`refinery serve`'s segment job: every `segments_interval_minutes`, recompute every live segment
whose inputs changed (members.run_segments skips the others), as the system principal.

A failed segment is recorded as a failed run with its reason and the others carry on; an error of
the job itself is logged (its type only: no personal data) and the server carries on.
"""

from __future__ import annotations

import asyncio
import logging

from refinery.segments import members
from refinery.settings import Settings
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer

log = logging.getLogger(__name__)


def run_once(engine: Engine, writer: Writer, settings: Settings) -> members.RunReport:
    from refinery.identity import rules_from_settings

    report = members.run_segments(engine, writer, members.SYSTEM, trigger="scheduled", rules=rules_from_settings(settings))
    changed = [r for r in report.runs if r.status == "completed" and (r.entered or r.exited)]
    if report.runs:
        log.info("segments: %d recomputed (%d changed, %d failed), %d unchanged", len(report.runs), len(changed),
                 len(report.failed), len(report.skipped))
    return report


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

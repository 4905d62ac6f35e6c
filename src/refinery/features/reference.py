"""The reference for point-in-time training sets: each row's feature values in plain Python, by the
letter of docs/features.md, to hold the SQL (offline.py) to. Obviously right rather than fast: every
row looks at every event. The aggregates themselves are the segment language's reference
(`segments.reference.aggregate`), evaluated as of the row's time over the events the row may see.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from refinery.segments import reference as segments_reference
from refinery.segments.traits import CompiledTrait


def known_at(events: Iterable[Mapping[str, Any]], profile_id: str, moment: datetime) -> list[Mapping[str, Any]]:
    """The profile's events that had happened and been received by `moment`."""
    return [e for e in events if e["profile_id"] == profile_id and e["timestamp"] <= moment and e["received_at"] <= moment]


def value(trait: CompiledTrait, events: Iterable[Mapping[str, Any]], profile_id: str, moment: datetime) -> Any:
    """One feature's value for one profile at one moment."""
    tokenise = trait.ctx.tokenise if trait.ctx is not None else None
    definition = trait.definition
    return segments_reference.aggregate(definition.aggregate, definition.window, known_at(events, profile_id, moment), moment, tokenise)

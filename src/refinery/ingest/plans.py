"""Tracking plans: a JSON Schema per event name, checked on the way in.

A plan is a file `<event name>.json` in the plans folder holding a JSON Schema for the event's
`properties` (a file may name its event with `"x-refinery-event"` when the name cannot be a file
name). The folder is re-read when it changes, at most once a second, so plans can be edited while
the server runs. Per source: unplanned events are accepted or quarantined; a property that breaks
its plan is always quarantined with the JSON pointer of the bad value and the rule it broke.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from refinery.errors import ConfigurationError
from refinery.ingest.protocol import Failure

_PLANNED_TYPES = ("track",)


class TrackingPlans:
    def __init__(self, folder: Path, *, default_mode: str = "accept", check_interval: float = 1.0):
        self.folder = folder
        self.default_mode = default_mode
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._validators: dict[str, Draft202012Validator] = {}
        self._signature: tuple[tuple[str, float], ...] | None = None
        self._checked_at = 0.0
        self.errors: dict[str, str] = {}

    # --- loading --------------------------------------------------------------------------
    def _current_signature(self) -> tuple[tuple[str, float], ...]:
        if not self.folder.is_dir():
            return ()
        return tuple(sorted((p.name, p.stat().st_mtime) for p in self.folder.glob("*.json")))

    def reload(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.check_interval:
            return
        with self._lock:
            self._checked_at = now
            sig = self._current_signature()
            if sig == self._signature and not force:
                return
            validators: dict[str, Draft202012Validator] = {}
            errors: dict[str, str] = {}
            for name, _ in sig:
                path = self.folder / name
                try:
                    schema = json.loads(path.read_text("utf-8"))
                    Draft202012Validator.check_schema(schema)
                except (OSError, ValueError, SchemaError) as e:
                    errors[name] = str(e).splitlines()[0]
                    continue
                event = schema.get("x-refinery-event") or path.stem
                validators[event] = Draft202012Validator(schema)
            self._validators, self._signature, self.errors = validators, sig, errors

    def load_strict(self) -> dict[str, Draft202012Validator]:
        """Load and raise on the first broken plan file (for `refinery plans check`)."""
        self.reload(force=True)
        if self.errors:
            name, err = next(iter(self.errors.items()))
            raise ConfigurationError(f"Tracking plan {self.folder / name} is invalid: {err}", fix="Fix the JSON Schema in that file.")
        return dict(self._validators)

    @property
    def events(self) -> list[str]:
        self.reload()
        return sorted(self._validators)

    # --- checking -------------------------------------------------------------------------
    def applies_to(self, unplanned_mode: str | None) -> bool:
        """Whether events of a source with this mode need checking at all (cheap; the hot path asks)."""
        self.reload()
        return bool(self._validators) or (unplanned_mode or self.default_mode) == "quarantine"

    def check(self, event: dict[str, Any], unplanned_mode: str | None) -> Failure | None:
        """The plan failure of one (merged) event, or None when it passes or has no plan."""
        if event.get("type") not in _PLANNED_TYPES:
            return None
        self.reload()
        name = event.get("event")
        validator = self._validators.get(name) if isinstance(name, str) else None
        if validator is None:
            if (unplanned_mode or self.default_mode) == "quarantine":
                return Failure(
                    "unplanned_event",
                    f"Event {name!r} has no tracking plan and this source quarantines unplanned events; "
                    f"add {self.folder}/{name}.json or set the source to accept unplanned events.",
                    "/event",
                    "plan",
                )
            return None
        props = event.get("properties") or {}
        error = next(iter(sorted(validator.iter_errors(props), key=lambda e: list(e.absolute_path))), None)
        if error is None:
            return None
        pointer = "/properties" + "".join(f"/{_escape(p)}" for p in error.absolute_path)
        return Failure(
            "plan_violation",
            f"{pointer}: {error.message} (rule '{error.validator}' of plan {name!r}); "
            "fix the event or update its plan, then run `refinery events replay`.",
            pointer,
            "plan",
        )


def _escape(part: Any) -> str:
    return str(part).replace("~", "~0").replace("/", "~1")

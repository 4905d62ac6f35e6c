"""Tracking plans: a JSON Schema per event name, checked on the way in.

A plan is a file `<event name>.json` in the plans folder holding a JSON Schema for the event's
`properties` (a file may name its event with `"x-refinery-event"` when the name cannot be a file
name). The folder is re-read when it changes, at most once a second, so plans can be edited while
the server runs. Per source: unplanned events are accepted or quarantined; a property that breaks
its plan is always quarantined with the JSON pointer of the bad value and the rule it broke.

A plan file that stops parsing (an editor saving half a file, a typo) keeps its last good version
in force; a plan that never parsed quarantines its events as `plan_invalid` rather than letting
them through unchecked. Either way nothing is discarded: fix the file and replay.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

from refinery.errors import ConfigurationError
from refinery.ingest.protocol import Failure

log = logging.getLogger(__name__)

_PLANNED_TYPES = ("track",)
_MODES = ("accept", "quarantine")
_MAX_DETAIL = 200  # characters of a validator message kept (it can quote a large bad value)


@dataclass(frozen=True)
class PlanFile:
    """One plan file as last read: the event it governs, and its error if it does not load."""

    event: str
    path: Path
    error: str | None = None
    stale: bool = False  # broken now, but an earlier good version is still in force

    def to_dict(self) -> dict[str, Any]:
        status = "ok" if self.error is None else ("stale" if self.stale else "invalid")
        return {"event": self.event, "file": str(self.path), "status": status, "error": self.error}


class TrackingPlans:
    """The plans folder, re-read on change; `check` is safe to call from many threads."""

    def __init__(self, folder: Path, *, default_mode: str = "accept", check_interval: float = 1.0):
        if default_mode not in _MODES:
            raise ConfigurationError(f"unplanned_events {default_mode!r} is not a mode.", fix="Use 'accept' or 'quarantine'.")
        self.folder = folder
        self.default_mode = default_mode
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._validators: dict[str, Draft202012Validator] = {}
        self._broken: dict[str, str] = {}  # event -> error, for plans with no good version in force
        self._files: list[PlanFile] = []
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._checked_at = float("-inf")

    # --- loading --------------------------------------------------------------------------
    def _current_signature(self) -> tuple[tuple[str, int, int], ...]:
        if not self.folder.is_dir():
            return ()
        sig = []
        for p in self.folder.glob("*.json"):
            try:
                st = p.stat()
            except OSError:  # removed between glob and stat
                continue
            sig.append((p.name, st.st_mtime_ns, st.st_size))
        return tuple(sorted(sig))

    def reload(self, *, force: bool = False) -> None:
        """Re-read the folder if a file was added, changed or removed (checked at most once per interval)."""
        now = time.monotonic()
        if not force and now - self._checked_at < self.check_interval:
            return
        with self._lock:
            self._checked_at = now
            sig = self._current_signature()
            if sig == self._signature and not force:
                return
            validators: dict[str, Draft202012Validator] = {}
            broken: dict[str, str] = {}
            files: list[PlanFile] = []
            for name, _, _ in sig:
                path = self.folder / name
                event = path.stem
                try:
                    schema = json.loads(path.read_text("utf-8"))
                    if not isinstance(schema, dict):
                        raise ValueError(f"the file holds a JSON {type(schema).__name__}, not a JSON Schema object")
                    event = schema.get("x-refinery-event") or event
                    if not isinstance(event, str):
                        raise ValueError("x-refinery-event must be a string")
                    Draft202012Validator.check_schema(schema)
                    if event in validators:
                        raise ValueError(f"another file already holds the plan for event {event!r}")
                except (OSError, ValueError, SchemaError) as e:
                    error = _first_line(e)
                    previous = self._validators.get(event)
                    if previous is not None and event not in validators:
                        validators[event] = previous
                    else:
                        broken[event] = f"{path}: {error}"
                    files.append(PlanFile(event, path, error, stale=previous is not None))
                    log.warning("tracking plan %s does not load: %s", path, error)
                    continue
                validators[event] = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
                broken.pop(event, None)
                files.append(PlanFile(event, path))
            self._validators, self._broken, self._files, self._signature = validators, broken, files, sig

    def files(self) -> list[PlanFile]:
        """Every plan file with its status (for `refinery plans list`)."""
        self.reload(force=True)
        return list(self._files)

    def load_strict(self) -> dict[str, Draft202012Validator]:
        """Load and raise on the first broken plan file (for `refinery plans check`)."""
        bad = [f for f in self.files() if f.error is not None]
        if bad:
            raise ConfigurationError(
                f"Tracking plan {bad[0].path} is invalid: {bad[0].error}"
                + (f" ({len(bad) - 1} more broken files)" if len(bad) > 1 else ""),
                fix="Fix the JSON Schema in that file (https://json-schema.org/understanding-json-schema/).",
            )
        return dict(self._validators)

    @property
    def events(self) -> list[str]:
        self.reload()
        return sorted(self._validators)

    # --- checking -------------------------------------------------------------------------
    def applies_to(self, unplanned_mode: str | None) -> bool:
        """Whether events of a source with this mode need checking at all (cheap; the hot path asks)."""
        self.reload()
        return bool(self._validators or self._broken) or (unplanned_mode or self.default_mode) == "quarantine"

    def check(self, event: dict[str, Any], unplanned_mode: str | None) -> Failure | None:
        """The plan failure of one (merged) event, or None when it passes or needs no plan."""
        if event.get("type") not in _PLANNED_TYPES:
            return None
        self.reload()
        name = event.get("event")
        validator = self._validators.get(name) if isinstance(name, str) else None
        if validator is None:
            if isinstance(name, str) and name in self._broken:
                return Failure(
                    "plan_invalid",
                    f"The tracking plan for {name!r} does not load ({self._broken[name]}); "
                    "fix the plan file, then run `refinery events replay`.",
                    "/event",
                    "plan",
                )
            if (unplanned_mode or self.default_mode) == "quarantine":
                return Failure(
                    "unplanned_event",
                    f"Event {name!r} has no tracking plan and this source quarantines unplanned events; "
                    f"add {self.folder}/{name}.json or run `refinery sources set SOURCE --unplanned accept`, "
                    "then `refinery events replay`.",
                    "/event",
                    "plan",
                )
            return None
        props = event.get("properties")
        if props is None:
            props = {}
        errors = sorted(validator.iter_errors(props), key=lambda e: [str(p) for p in e.absolute_path])
        if not errors:
            return None
        error = errors[0]
        pointer = "/properties" + "".join(f"/{_escape(p)}" for p in [*error.absolute_path, *_culprit(error)])
        detail = error.message if len(error.message) <= _MAX_DETAIL else error.message[:_MAX_DETAIL] + "..."
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        return Failure(
            "plan_violation",
            f"{pointer}: {detail} (rule '{error.validator}' of plan {name!r}){more}; "
            "fix the event or update its plan, then run `refinery events replay`.",
            pointer,
            "plan",
        )


def _culprit(error: ValidationError) -> list[str]:
    """For rules about a missing or extra key, the key itself, so the pointer names it."""
    instance = error.instance
    if not isinstance(instance, dict):
        return []
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in instance]
        return missing[:1]
    if error.validator == "additionalProperties" and error.validator_value is False:
        declared = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        patterns = error.schema.get("patternProperties", {}) if isinstance(error.schema, dict) else {}
        import re

        extra = sorted(k for k in instance if k not in declared and not any(re.search(p, k) for p in patterns))
        return extra[:1]
    return []


def _escape(part: Any) -> str:
    return str(part).replace("~", "~0").replace("/", "~1")


def _first_line(e: Exception) -> str:
    text = e.message if isinstance(e, SchemaError) else str(e)
    return text.splitlines()[0] if text else type(e).__name__

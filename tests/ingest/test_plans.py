"""Tracking plans: pointers and rules of violations, reloads, broken files, unplanned modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refinery.errors import ConfigurationError
from refinery.ingest.plans import TrackingPlans

ORDER_PLAN = {
    "type": "object",
    "required": ["order_id", "total"],
    "additionalProperties": False,
    "properties": {
        "order_id": {"type": "string"},
        "total": {"type": "number", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}}}},
        "a/b~c": {"type": "boolean"},
    },
}


def _plans(folder: Path, mode: str = "accept") -> TrackingPlans:
    return TrackingPlans(folder, default_mode=mode, check_interval=0)


def _track(event: str, **props: object) -> dict[str, object]:
    return {"type": "track", "event": event, "userId": "u1", "properties": props}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "plans"
    d.mkdir()
    (d / "Order Completed.json").write_text(json.dumps(ORDER_PLAN))
    return d


def test_a_valid_event_passes(folder: Path) -> None:
    assert _plans(folder).check(_track("Order Completed", order_id="o1", total=9.5), None) is None


@pytest.mark.parametrize(
    ("props", "pointer", "rule"),
    [
        ({"order_id": "o1", "total": "9.5"}, "/properties/total", "type"),
        ({"order_id": "o1", "total": -1}, "/properties/total", "minimum"),
        ({"order_id": "o1"}, "/properties/total", "required"),
        ({"order_id": "o1", "total": 1, "coupon": "X"}, "/properties/coupon", "additionalProperties"),
        ({"order_id": "o1", "total": 1, "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 1.5}]}, "/properties/items/1/qty", "type"),
        ({"order_id": "o1", "total": 1, "email": "not-an-email"}, "/properties/email", "format"),
        ({"order_id": "o1", "total": 1, "a/b~c": "yes"}, "/properties/a~1b~0c", "type"),
    ],
)
def test_a_violation_names_the_pointer_and_the_rule(folder: Path, props: dict[str, object], pointer: str, rule: str) -> None:
    failure = _plans(folder).check(_track("Order Completed", **props), None)
    assert failure is not None
    assert (failure.reason, failure.field, failure.stage) == ("plan_violation", pointer, "plan")
    assert f"rule '{rule}'" in failure.message and pointer in failure.message
    assert "refinery events replay" in failure.message


def test_only_track_calls_are_planned(folder: Path) -> None:
    plans = _plans(folder, "quarantine")
    assert plans.check({"type": "identify", "userId": "u1", "traits": {"total": "x"}}, None) is None
    assert plans.check({"type": "page", "userId": "u1", "name": "Order Completed", "properties": {}}, None) is None


def test_unplanned_events_follow_the_source_mode_then_the_default(folder: Path) -> None:
    accepting, quarantining = _plans(folder, "accept"), _plans(folder, "quarantine")
    event = _track("Never Planned", x=1)
    assert accepting.check(event, None) is None
    assert accepting.check(event, "accept") is None
    failure = accepting.check(event, "quarantine")
    assert failure is not None and failure.reason == "unplanned_event" and failure.field == "/event"
    assert "Never Planned.json" in failure.message
    assert quarantining.check(event, None) is not None
    assert quarantining.check(event, "accept") is None
    assert accepting.applies_to("quarantine") and quarantining.applies_to(None)


def test_a_new_or_changed_file_is_picked_up(folder: Path) -> None:
    plans = _plans(folder)
    assert plans.check(_track("Signed Up", plan="gold"), None) is None
    (folder / "Signed Up.json").write_text(json.dumps({"properties": {"plan": {"enum": ["free", "pro"]}}}))
    failure = plans.check(_track("Signed Up", plan="gold"), None)
    assert failure is not None and "enum" in failure.message
    (folder / "Signed Up.json").write_text(json.dumps({"properties": {"plan": {"enum": ["free", "pro", "gold"]}}}))
    assert plans.check(_track("Signed Up", plan="gold"), None) is None
    (folder / "Signed Up.json").unlink()
    assert "Signed Up" not in plans.events


def test_reload_is_throttled(folder: Path) -> None:
    plans = TrackingPlans(folder, check_interval=3600)
    assert plans.events == ["Order Completed"]
    (folder / "Later.json").write_text("{}")
    assert plans.events == ["Order Completed"]  # not re-read within the interval
    plans.reload(force=True)
    assert plans.events == ["Later", "Order Completed"]


def test_x_refinery_event_names_events_that_cannot_be_file_names(folder: Path) -> None:
    (folder / "checkout-step.json").write_text(json.dumps({"x-refinery-event": "Checkout / Step", "required": ["step"]}))
    failure = _plans(folder).check(_track("Checkout / Step"), None)
    assert failure is not None and failure.field == "/properties/step"


def test_a_broken_edit_keeps_the_last_good_plan(folder: Path) -> None:
    plans = _plans(folder)
    assert plans.check(_track("Order Completed", order_id="o1"), None) is not None
    (folder / "Order Completed.json").write_text('{"type": "object", ')  # an editor mid-save
    failure = plans.check(_track("Order Completed", order_id="o1"), None)
    assert failure is not None and failure.reason == "plan_violation"
    [status] = [f.to_dict() for f in plans.files()]
    assert status["status"] == "stale" and status["error"]


def test_a_plan_that_never_loaded_quarantines_its_events(folder: Path) -> None:
    (folder / "Refund.json").write_text('{"type": "nonsense-type"}')
    plans = _plans(folder)
    failure = plans.check(_track("Refund", amount=1), None)
    assert failure is not None and failure.reason == "plan_invalid" and "Refund.json" in failure.message
    with pytest.raises(ConfigurationError, match="Refund.json"):
        plans.load_strict()


def test_two_files_for_one_event_is_an_error(folder: Path) -> None:
    (folder / "other.json").write_text(json.dumps({"x-refinery-event": "Order Completed"}))
    errors = [f for f in _plans(folder).files() if f.error]
    assert len(errors) == 1 and "already holds" in (errors[0].error or "")


def test_a_missing_folder_means_no_plans(tmp_path: Path) -> None:
    plans = _plans(tmp_path / "nope")
    assert plans.events == [] and not plans.applies_to(None)
    assert plans.check(_track("X"), None) is None


def test_unknown_default_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="quarantine"):
        TrackingPlans(tmp_path, default_mode="drop")

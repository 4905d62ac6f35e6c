"""Activation core on a real store: planning (diff, full, mirror) against the state table, the consent
and suppression gates at planning and at delivery, the outbox's retries, dead letters and replay,
recovery of a batch cut off mid-delivery, real-time syncs, and mapping checks. Deliveries go to a
real destination registered like a third party's (ledger_destination.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from activation_core_support import ACTOR, define_segment, ledger_destination, membership, person, set_consent
from ledger_destination import calls, faults, members
from pydantic import BaseModel

from refinery.activation import operations as ops
from refinery.activation import outbox, service
from refinery.activation import worker as worker_module
from refinery.activation.destination import Batch, DestinationType, register
from refinery.activation.errors import ActivationError, UnknownMappingSource
from refinery.activation.worker import Deliverer, backoff
from refinery.runtime import Runtime
from refinery.settings import Settings


def _world(rt: Runtime, tmp_path: Path, n: int = 6, *, mode: str = "diff") -> Path:
    for i in range(n):
        person(rt, f"p{i}", email=f"Person.{i}@Example.com", plan="pro" if i % 2 else "free")
    define_segment(rt, "vip")
    folder = tmp_path / "ledger"
    ledger_destination(rt, "crm", folder)
    ops.create_sync(rt, ACTOR, "vip-crm", "vip", "crm", {"id": "profile_id", "email": "email", "plan": "plan"}, mode=mode)
    return folder


def _run(rt: Runtime) -> dict:
    result = ops.run_sync(rt, ACTOR, "vip-crm")
    return result["run"] or {}


def test_diff_sends_who_entered_and_who_left_with_revealed_fields(runtime: Runtime, tmp_path: Path) -> None:
    folder = _world(runtime, tmp_path)
    membership(runtime, "vip", ["p0", "p1", "p2"])
    r1 = _run(runtime)
    assert (r1["status"], r1["planned"], r1["added"], r1["removed"], r1["sent"]) == ("completed", 3, 3, 0, 3)
    assert members(folder) == {f"p{i}": {"id": f"p{i}", "email": f"person.{i}@example.com", "plan": "pro" if i % 2 else "free"}
                               for i in range(3)}
    membership(runtime, "vip", ["p1", "p2", "p3"])
    r2 = _run(runtime)
    assert (r2["planned"], r2["added"], r2["removed"]) == (2, 1, 1)
    assert sorted(members(folder)) == ["p1", "p2", "p3"]
    # Nothing changed: nothing planned, nothing sent.
    r3 = _run(runtime)
    assert (r3["planned"], r3["batches"], r3["status"]) == (0, 0, "completed")
    assert len(calls(folder)) == 2
    # The outbox holds profile ids and actions, never values.
    cols = [c[0] for c in runtime.engine.fetch_all("SELECT column_name FROM information_schema.columns WHERE table_name = 'activation_records'")]
    assert cols == ["batch_id", "profile_id", "action"]


def test_full_resends_every_member_and_mirror_resends_changed_fields(runtime: Runtime, tmp_path: Path) -> None:
    folder = _world(runtime, tmp_path, mode="full")
    membership(runtime, "vip", ["p0", "p1"])
    assert _run(runtime)["added"] == 2
    assert _run(runtime)["added"] == 2  # full: everyone again
    ops.update_sync(runtime, ACTOR, "vip-crm", mode="mirror")
    first = _run(runtime)  # no hashes recorded yet under full: mirror sends everyone once
    assert first["added"] == 2
    assert _run(runtime)["planned"] == 0
    runtime.writer.call(lambda e: e.execute("UPDATE profiles SET traits = json_merge_patch(traits, '{\"plan\": \"enterprise\"}') "
                                            "WHERE profile_id = 'p1'"))
    changed = _run(runtime)
    assert (changed["added"], changed["removed"]) == (1, 0)
    assert members(folder)["p1"]["plan"] == "enterprise" and members(folder)["p0"]["plan"] == "free"


def test_batches_split_by_size_and_ids_are_stable_idempotency_keys(runtime: Runtime, tmp_path: Path) -> None:
    folder = _world(runtime, tmp_path, n=7)
    ops.update_sync(runtime, ACTOR, "vip-crm", batch_size=3)
    membership(runtime, "vip", [f"p{i}" for i in range(7)])
    r = _run(runtime)
    assert (r["batches"], r["sent"]) == (3, 7)
    ids = [c["batch_id"] for c in calls(folder)]
    assert len(set(ids)) == 3 and all(i.startswith("b_" + r["run_id"][4:]) for i in ids)
    assert sorted(c["records"] for c in calls(folder)) == [1, 3, 3]


def test_withdrawn_consent_is_removed_at_the_next_run_and_never_sent_again(runtime: Runtime, tmp_path: Path) -> None:
    folder = _world(runtime, tmp_path)
    person(runtime, "nobody", email="no@example.com", marketing=None)  # no choice recorded: unknown means no
    person(runtime, "denier", email="deny@example.com", marketing="denied")
    membership(runtime, "vip", ["p0", "p1", "nobody", "denier"])
    r1 = _run(runtime)
    assert (r1["added"], r1["skipped_consent"]) == (2, 2)
    set_consent(runtime, "p1", "denied")
    r2 = _run(runtime)
    assert (r2["removed"], r2["added"], r2["skipped_consent"]) == (1, 0, 3)
    assert sorted(members(folder)) == ["p0"]
    sent = {rec for c in calls(folder) for rec in [c["batch_id"]]}
    assert len(sent) == 2


def test_consent_withdrawn_while_the_batch_waits_is_not_sent(runtime: Runtime, tmp_path: Path) -> None:
    folder = _world(runtime, tmp_path)
    membership(runtime, "vip", ["p0", "p1"])
    plan = service.plan(runtime, __import__("refinery.activation.store", fromlist=["x"]).get_sync(runtime.engine, "vip-crm"), trigger="cli")
    assert plan.added == 2
    set_consent(runtime, "p0", "denied")  # after planning, before delivery
    ops.deliver_now(runtime, "crm")
    assert sorted(members(folder)) == ["p1"]
    run = ops.list_runs(runtime, "vip-crm")[0]
    assert (run["added"], run["skipped_consent"], run["status"]) == (1, 1, "completed")
    # it left the state, so the next run does not think the destination holds it
    assert _run(runtime)["planned"] == 0
    set_consent(runtime, "p0", "granted")
    assert _run(runtime)["added"] == 1 and sorted(members(folder)) == ["p0", "p1"]


def test_an_erased_person_is_removed_and_never_sent_even_from_a_waiting_batch(runtime: Runtime, tmp_path: Path) -> None:
    from refinery.activation.store import get_sync
    from refinery.privacy import requests

    folder = _world(runtime, tmp_path)
    membership(runtime, "vip", ["p0", "p1"])
    _run(runtime)
    assert sorted(members(folder)) == ["p0", "p1"]
    person(runtime, "late", email="late@example.com")
    membership(runtime, "vip", ["p0", "p1", "late"])
    plan = service.plan(runtime, get_sync(runtime.engine, "vip-crm"), trigger="cli")  # 'late' waits in the outbox
    assert plan.added == 1
    # Erase p1 (held by the destination) and 'late' (waiting) through the real subject-request path.
    for who in ("u-p1", "u-late"):
        requests.erase(runtime, f"user_id:{who}", ACTOR)
    ops.deliver_now(runtime, "crm")
    assert sorted(members(folder)) == ["p0"]
    everything = (folder / "calls.jsonl").read_text() + (folder / "members.json").read_text()
    assert "late@example.com" not in everything
    assert runtime.engine.fetch_all("SELECT count(*) FROM sync_state WHERE profile_id IN ('p1', 'late')")[0][0] == 0
    runs = ops.list_runs(runtime, "vip-crm")
    # Each erasure took the person back from the destination at once (its own run, a remove batch), and the
    # waiting add of 'late' was dropped at delivery: the state no longer holds it.
    assert sorted(r["removed"] for r in runs if r["trigger"] == "erasure") == [1, 1]
    assert [r["superseded"] for r in runs if r["run_id"] == plan.run_id] == [1]


def test_a_suppressed_identifier_is_not_sent(runtime: Runtime, tmp_path: Path) -> None:
    folder = _world(runtime, tmp_path)
    membership(runtime, "vip", ["p0", "p1"])
    h = runtime.vault.suppression_hash("user_id", "u-p1")
    runtime.writer.call(lambda e: e.execute("INSERT INTO suppression_list VALUES (?, 'user_id', 'dsr_test', ?)", [h, datetime.now(UTC)]))
    runtime.vault.suppressed.add(h)
    r = _run(runtime)
    assert (r["added"], r["skipped_suppressed"]) == (1, 1)
    assert sorted(members(folder)) == ["p0"]


def test_backoff_is_full_jitter_capped_and_retry_after_wins() -> None:
    assert backoff(1, 1.0, 300, rand=lambda: 1.0) == 1.0
    assert backoff(4, 1.0, 300, rand=lambda: 1.0) == 8.0
    assert backoff(20, 1.0, 300, rand=lambda: 1.0) == 300
    assert backoff(4, 1.0, 300, rand=lambda: 0.25) == 2.0
    assert backoff(3, 1.0, 300, retry_after=42) == 42
    assert backoff(3, 1.0, 300, retry_after=4000) == 300


def test_transient_failures_retry_with_retry_after_then_deliver_once(runtime: Runtime, tmp_path: Path) -> None:
    folder = _world(runtime, tmp_path)
    membership(runtime, "vip", ["p0", "p1"])
    faults(folder, {"kind": "transient", "retry_after": 0.3}, {"kind": "transient", "retry_after": 0.2})
    r = _run(runtime)
    assert r["status"] == "delivering" and members(folder) == {}
    batch = runtime.engine.fetch_all("SELECT batch_id, attempts, next_attempt_at, last_error FROM activation_batches")[0]
    assert batch[1] == 1 and "503" in batch[3]
    assert 0.1 < (batch[2] - datetime.now(UTC)).total_seconds() <= 0.3
    d = Deliverer(runtime.engine, runtime.writer, runtime.settings, "crm", runtime.vault)
    deadline = time.monotonic() + 10
    while members(folder) == {} and time.monotonic() < deadline:
        d.drain()
        time.sleep(0.05)
    assert sorted(members(folder)) == ["p0", "p1"]
    attempts = [c["attempt"] for c in calls(folder)]
    assert attempts == [1, 2, 3] and len({c["batch_id"] for c in calls(folder)}) == 1
    assert ops.list_runs(runtime, "vip-crm")[0]["status"] == "completed"


def test_terminal_failure_dead_letters_and_replay_delivers_the_same_batch(runtime: Runtime, tmp_path: Path) -> None:
    folder = _world(runtime, tmp_path)
    membership(runtime, "vip", ["p0", "p1"])
    faults(folder, {"kind": "terminal"})
    r = _run(runtime)
    assert (r["status"], r["failed"], r["sent"]) == ("completed_with_errors", 2, 0)
    assert r["errors"][0]["kind"] == "terminal" and "400" in r["errors"][0]["message"]
    dead = ops.dead_letters(runtime, "vip-crm")
    assert len(dead) == 1 and dead[0]["reason"] == "terminal" and dead[0]["records"] == 2
    replayed = ops.replay(runtime, ACTOR, sync="vip-crm")
    assert replayed["replayed"] == [dead[0]["batch_id"]]
    assert sorted(members(folder)) == ["p0", "p1"]
    assert [c["batch_id"] for c in calls(folder)] == [dead[0]["batch_id"]] * 2
    run = ops.list_runs(runtime, "vip-crm")[0]
    assert (run["status"], run["failed"], run["sent"]) == ("completed", 0, 2)
    assert ops.dead_letters(runtime, "vip-crm") == []
    with pytest.raises(Exception, match="No dead letter"):
        ops.replay(runtime, ACTOR, batch_ids=[dead[0]["batch_id"]])


def test_attempts_run_out_into_a_dead_letter(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", admin_token="t", activation_max_attempts=2, activation_backoff_base_seconds=0.01)
    with Runtime.open(settings) as rt:
        folder = _world(rt, tmp_path)
        membership(rt, "vip", ["p0"])
        faults(folder, *[{"kind": "transient"}] * 5)
        _run(rt)
        time.sleep(0.05)
        ops.deliver_now(rt, "crm")
        dead = ops.dead_letters(rt, "vip-crm")
        assert [(d["reason"], d["attempts"]) for d in dead] == [("attempts_exhausted", 2)]


def test_a_superseded_batch_never_undoes_a_newer_one(runtime: Runtime, tmp_path: Path) -> None:
    from refinery.activation.store import get_sync

    folder = _world(runtime, tmp_path)
    membership(runtime, "vip", ["p0"])
    faults(folder, {"kind": "terminal"})
    _run(runtime)  # the add of p0 dead-lettered
    membership(runtime, "vip", [])
    service.plan(runtime, get_sync(runtime.engine, "vip-crm"), trigger="cli")  # the remove of p0
    ops.deliver_now(runtime, "crm")
    ops.replay(runtime, ACTOR, sync="vip-crm")  # the old add comes back late
    assert members(folder) == {}
    assert ops.list_runs(runtime, "vip-crm")[-1]["superseded"] == 1


def test_a_batch_cut_off_mid_delivery_is_delivered_again_with_the_same_id(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", admin_token="t")
    with Runtime.open(settings) as rt:
        folder = _world(rt, tmp_path)
        membership(rt, "vip", ["p0", "p1"])
        from refinery.activation.store import get_sync

        service.plan(rt, get_sync(rt.engine, "vip-crm"), trigger="cli")
        batch = outbox.due(rt.engine, "crm", datetime.now(UTC))
        assert batch is not None
        # The attempt begins and the receiver applies the batch; the process dies before it records the success.
        rt.writer.call(lambda e: outbox.begin_attempt(e, batch, datetime.now(UTC)))
        d = Deliverer(rt.engine, rt.writer, rt.settings, "crm", rt.vault)
        from refinery.activation.destination import Batch, Record

        d._destination(__import__("refinery.activation.store", fromlist=["x"]).get_destination(rt.engine, "crm")).deliver(
            Batch(batch.batch_id, "vip-crm", "vip", "crm", "diff", (Record("p0", "add", {"id": "p0"}), Record("p1", "add", {"id": "p1"})),
                  batch.created_at, 1))
    with Runtime.open(settings) as rt:
        assert rt.engine.fetch_all("SELECT status, attempts FROM activation_batches")[0] == ("delivering", 1)
        assert ops.deliver_now(rt, "crm") == {"delivered": 1}
        assert [c["batch_id"] for c in calls(folder)] == [batch.batch_id] * 2
        assert [c["attempt"] for c in calls(folder)] == [1, 2]
        assert sorted(members(folder)) == ["p0", "p1"]
        assert rt.engine.fetch_all("SELECT status, attempts FROM activation_batches")[0] == ("delivered", 2)


def test_a_slow_destination_does_not_hold_up_another(runtime: Runtime, tmp_path: Path) -> None:
    _world(runtime, tmp_path)
    ledger_destination(runtime, "slow", tmp_path / "slow", delay=3.0)
    ops.create_sync(runtime, ACTOR, "vip-slow", "vip", "slow", {"id": "profile_id"}, schedule="realtime")
    ops.update_sync(runtime, ACTOR, "vip-crm", schedule="realtime")
    membership(runtime, "vip", ["p0", "p1"])
    svc = service.ActivationService(runtime)
    started = time.monotonic()
    svc.start()
    try:
        deadline = time.monotonic() + 10
        while sorted(members(tmp_path / "ledger")) != ["p0", "p1"] and time.monotonic() < deadline:
            time.sleep(0.05)
        fast_done = time.monotonic() - started
        assert sorted(members(tmp_path / "ledger")) == ["p0", "p1"]
        assert fast_done < 2.5, fast_done
        assert members(tmp_path / "slow") == {}  # still sleeping in its own worker
        while members(tmp_path / "slow") == {} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(members(tmp_path / "slow")) == ["p0", "p1"]
    finally:
        svc.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("refinery-activation")]


def test_realtime_sync_follows_segment_events_by_its_cursor(runtime: Runtime, tmp_path: Path) -> None:
    from refinery.activation.store import get_sync

    folder = _world(runtime, tmp_path)
    membership(runtime, "vip", ["p0"])
    ops.update_sync(runtime, ACTOR, "vip-crm", schedule="realtime")
    svc = service.ActivationService(runtime)
    first = svc.tick(workers=False)  # its first plan covers the segment as it is
    assert [(p.trigger, p.added) for p in first] == [("realtime", 1)]
    ops.deliver_now(runtime, "crm")
    cursor = get_sync(runtime.engine, "vip-crm").event_cursor
    membership(runtime, "vip", ["p1", "p2"])
    plans = svc.tick(workers=False)
    assert [(p.added, p.removed, p.members) for p in plans] == [(2, 1, 2)]  # only the 3 profiles named by the events are looked at
    assert get_sync(runtime.engine, "vip-crm").event_cursor > cursor
    assert svc.tick(workers=False) == [] or all(p.planned == 0 and not p.recorded for p in svc.tick(workers=False))
    ops.deliver_now(runtime, "crm")
    assert sorted(members(folder)) == ["p1", "p2"]
    other = tmp_path / "other"
    define_segment(runtime, "other")
    membership(runtime, "other", ["p3"])  # events of another segment move nothing here
    assert all(p.planned == 0 for p in svc.tick(workers=False))
    assert sorted(members(folder)) == ["p1", "p2"] and not other.exists()


def test_mapping_naming_a_missing_trait_is_refused_with_a_suggestion(runtime: Runtime, tmp_path: Path) -> None:
    _world(runtime, tmp_path)
    with pytest.raises(UnknownMappingSource) as err:
        ops.create_sync(runtime, ACTOR, "typo", "vip", "crm", {"id": "profile_id", "mail": "emial"})
    assert "did you mean 'email'" in err.value.message and err.value.field == "mapping.mail"
    with pytest.raises(ActivationError, match="Unknown sync mode"):
        ops.create_sync(runtime, ACTOR, "bad", "vip", "crm", {"id": "profile_id"}, mode="sometimes")
    with pytest.raises(ActivationError, match="Schedule"):
        ops.create_sync(runtime, ACTOR, "bad", "vip", "crm", {"id": "profile_id"}, schedule="hourly-ish")
    with pytest.raises(Exception, match="No segment 'nope'"):
        ops.create_sync(runtime, ACTOR, "bad", "nope", "crm", {"id": "profile_id"})
    assert [s["name"] for s in ops.list_syncs(runtime)] == ["vip-crm"]


def test_destination_secrets_are_sealed_and_never_shown(runtime: Runtime, tmp_path: Path) -> None:
    folder = _world(runtime, tmp_path)
    shown = ops.show_destination(runtime, "crm")
    assert shown["config"]["token"] == "***" and shown["secret_fields"] == ["token"]
    sealed = runtime.engine.fetch_all("SELECT sealed FROM destination_secrets")[0][0]
    assert b"s3cret-token" not in bytes(sealed)
    stored = runtime.engine.fetch_all("SELECT config FROM destinations")[0][0]
    assert "s3cret" not in stored
    audit_rows = " ".join(str(r[0]) for r in runtime.engine.fetch_all("SELECT details FROM audit_log"))
    assert "s3cret" not in audit_rows
    membership(runtime, "vip", ["p0"])
    _run(runtime)
    assert calls(folder)[0]["token"] == "s3cret-token"  # the destination itself gets it
    ops.update_destination(runtime, ACTOR, "crm", config={"folder": str(folder)})  # left out: kept
    assert ops.show_destination(runtime, "crm")["secret_fields"] == ["token"]
    with pytest.raises(ActivationError, match=r"config\.delay_seconds"):
        ops.create_destination(runtime, ACTOR, "bad", "ledger", "marketing", {"folder": "x", "delay_seconds": "soon", "token": "hush"})
    with pytest.raises(ActivationError, match="purpose"):
        ops.create_destination(runtime, ACTOR, "bad", "ledger", "gossip", {"folder": "x"})
    with pytest.raises(Exception, match="used by sync"):
        ops.delete_destination(runtime, ACTOR, "crm")


# --- a group of batches checked together (worker.gate_many) ----------------------------------------------

class _HookConfig(BaseModel):
    name: str


_SEEN: dict[str, list[Batch]] = {}
_HOOKS: dict[str, Callable[[Batch], None]] = {}


class _Hooked:
    """Keeps every batch it is given and runs the test's hook on it (before answering)."""

    def __init__(self, config: _HookConfig, ctx: object):
        self.name = config.name

    def deliver(self, batch: Batch) -> None:
        _SEEN.setdefault(self.name, []).append(batch)
        hook = _HOOKS.get(self.name)
        if hook is not None:
            hook(batch)

    def close(self) -> None:
        return None


register(DestinationType("hooked", _HookConfig, lambda config, ctx: _Hooked(config, ctx), "Test: keeps batches, runs a hook."))


def _hooked_world(rt: Runtime, name: str, n: int, *, mode: str = "diff", batch_size: int = 2) -> None:
    for i in range(n):
        person(rt, f"p{i}", email=f"person.{i}@example.com")
    define_segment(rt, "vip")
    ops.create_destination(rt, ACTOR, "hook", "hooked", "marketing", {"name": name})
    ops.create_sync(rt, ACTOR, "vip-hook", "vip", "hook", {"email": "email"}, mode=mode, batch_size=batch_size)


def _plan(rt: Runtime) -> None:
    from refinery.activation.store import get_sync

    service.plan(rt, get_sync(rt.engine, "vip-hook"), trigger="cli")


def _sent(name: str) -> list[tuple[str, str, str]]:
    return [(b.id, r.action, r.profile_id) for b in _SEEN.get(name, []) for r in b.records]


def test_consent_withdrawn_while_a_group_is_delivered_is_seen_before_the_next_batch(runtime: Runtime, tmp_path: Path) -> None:
    name = f"g{tmp_path.name}"
    _hooked_world(runtime, name, 6)
    membership(runtime, "vip", [f"p{i}" for i in range(6)])
    _plan(runtime)  # three batches of two, checked together in one group
    last = runtime.engine.fetch_all("SELECT max(profile_id) FROM activation_records WHERE batch_id = "
                                    "(SELECT batch_id FROM activation_batches ORDER BY seq DESC LIMIT 1)")[0][0]
    _HOOKS[name] = lambda b: set_consent(runtime, last, "denied") if len(_SEEN[name]) == 1 else None
    d = Deliverer(runtime.engine, runtime.writer, runtime.settings, "hook", runtime.vault)
    assert d.drain() == {"delivered": 3}
    sent = _sent(name)
    assert ("add", last) not in [(a, p) for _, a, p in sent]  # withdrawn after the group's checks: never sent
    assert ("remove", last) in [(a, p) for _, a, p in sent]
    fields = {r.profile_id: r.fields for b in _SEEN[name] for r in b.records if r.action == "add"}
    assert fields == {f"p{i}": {"email": f"person.{i}@example.com"} for i in range(6) if f"p{i}" != last}
    run = ops.list_runs(runtime, "vip-hook")[0]
    assert (run["added"], run["removed"], run["skipped_consent"], run["status"]) == (5, 1, 1, "completed")


def test_batches_of_one_group_are_decided_as_if_delivered_one_after_another(runtime: Runtime, tmp_path: Path) -> None:
    name = f"s{tmp_path.name}"
    _hooked_world(runtime, name, 2, mode="full")
    membership(runtime, "vip", ["p0", "p1"])
    _plan(runtime)
    _plan(runtime)  # full: both added again by a second run
    set_consent(runtime, "p0", "denied")
    d = Deliverer(runtime.engine, runtime.writer, runtime.settings, "hook", runtime.vault)
    assert d.drain() == {"delivered": 2}
    # The first batch takes p0 back (withheld: it leaves the state); the second finds it no longer held.
    assert [(a, p) for _, a, p in _sent(name)] == [("remove", "p0"), ("add", "p1"), ("add", "p1")]
    runs = ops.list_runs(runtime, "vip-hook")
    assert sorted((r["skipped_consent"], r["superseded"]) for r in runs) == [(0, 1), (1, 0)]
    assert runtime.engine.fetch_all("SELECT profile_id FROM sync_state") == [("p1",)]


def test_a_group_whose_checks_grew_old_leaves_the_rest_untried(runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from refinery.activation import worker

    monkeypatch.setattr(worker, "FRESH_SECONDS", 0.0)  # every group stops after its first batch
    name = f"o{tmp_path.name}"
    _hooked_world(runtime, name, 6)
    membership(runtime, "vip", [f"p{i}" for i in range(6)])
    _plan(runtime)
    d = Deliverer(runtime.engine, runtime.writer, runtime.settings, "hook", runtime.vault)
    assert d.drain() == {"delivered": 3}
    assert [b.attempt for b in _SEEN[name]] == [1, 1, 1]  # an attempt counted for the group but not made is undone
    assert runtime.engine.fetch_all("SELECT status, attempts FROM activation_batches ORDER BY seq") == [("delivered", 1)] * 3
    assert sorted(p for _, a, p in _sent(name) if a == "add") == [f"p{i}" for i in range(6)]


def test_a_receipt_rolled_back_before_the_checks_does_not_stop_a_group(runtime: Runtime, tmp_path: Path) -> None:
    """The checks' consent mark is the receipts' sequence (a catalog read before each batch); a receipt
    whose transaction rolled back moved the sequence without a row, so the group falls back to the
    receipts themselves and - nothing new being there - delivers every batch in one group."""
    name = f"r{tmp_path.name}"
    _hooked_world(runtime, name, 6)
    membership(runtime, "vip", [f"p{i}" for i in range(6)])
    _plan(runtime)

    def abandoned(e: Any) -> None:
        e.execute("INSERT INTO consent_log (log_id, subject_type, subject_value, purpose, state, origin, source, actor, chosen_at, "
                  "recorded_at) VALUES (nextval('consent_log_seq'), 'user_id', 'p0', 'marketing', 'denied', 'api', 'api', 't', now(), now())")
        raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        runtime.writer.call(abandoned)
    d = Deliverer(runtime.engine, runtime.writer, runtime.settings, "hook", runtime.vault)
    groups: list[int] = []  # how many batches each group attempted
    whole = d.deliver_group
    d.deliver_group = lambda batches, **kw: groups.append(len(out := whole(batches, **kw))) or out  # type: ignore[method-assign]
    cur = runtime.engine.reader()
    newest, sequence, _ = d._marks(cur)
    assert sequence is not None and sequence != newest  # the sequence moved, no row was kept
    assert d.drain() == {"delivered": 3}
    assert groups == [3]  # one group, never cut short
    assert sorted(p for _, a, p in _sent(name) if a == "add") == [f"p{i}" for i in range(6)]
    # a receipt that does commit, between two batches, still stops the group
    for i in range(6, 12):
        person(runtime, f"p{i}", email=f"person.{i}@example.com")
    _HOOKS[name] = lambda b: set_consent(runtime, "p11", "denied") if len(_SEEN[name]) == 4 else None
    membership(runtime, "vip", [f"p{i}" for i in range(12)])
    _plan(runtime)
    assert d.drain() == {"delivered": 3}
    assert groups == [3, 1, 2]  # the receipt committed during the group's first batch: the rest waited for new checks
    assert ("remove", "p11") in [(a, p) for _, a, p in _sent(name)] and ("add", "p11") not in [(a, p) for _, a, p in _sent(name)]


def test_the_collector_pause_nests_across_threads() -> None:
    import gc

    pause = worker_module._CollectorPause()
    assert gc.isenabled()
    inside = threading.Event()
    leave = threading.Event()

    def other() -> None:
        with pause:
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with pause:
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread is still inside
    leave.set()
    t.join(10)
    assert gc.isenabled()
    gc.disable()
    try:
        with pause:
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()

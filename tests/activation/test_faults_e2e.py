"""Activation end to end under receiver faults: a real store, a real webhook destination (signed
HTTP over loopback through the SSRF guard) and Refinery's receiver as the far end, injecting each
fault issue 6 lists. Whatever the fault, once the outbox is drained the receiver holds exactly the
segment's members whose consent allows the destination's purpose (none missing, none extra, each
batch applied once), and nobody whose consent forbade it was ever sent."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from activation_core_support import ACTOR, define_segment, membership, person, set_consent

from refinery.activation import operations as ops
from refinery.activation import service
from refinery.activation.receiver import Fault, Receiver
from refinery.activation.store import get_sync
from refinery.activation.worker import Deliverer
from refinery.runtime import Runtime
from refinery.settings import Settings

TIMEOUT = 0.6
FAULTS: dict[str, list[Fault]] = {
    "timeout": [Fault.timeout(TIMEOUT * 3)],                   # applied, but no answer in time: sent again, applied once
    "timeout_unapplied": [Fault.timeout(TIMEOUT * 3, apply=False)],
    "500": [Fault.error(500), Fault.error(503)],
    "429_retry_after": [Fault.too_many("1")],
    "closed_connection": [Fault.close()],
    "slow": [Fault.slow(TIMEOUT / 3)],
    "accepts_then_fails_next": [Fault.accept(), Fault.error(500), Fault.close()],
}


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    settings = Settings(data_dir=tmp_path / "data", admin_token="t", activation_workers=False,
                        activation_allowed_networks=["127.0.0.1/32"], activation_timeout_seconds=TIMEOUT,
                        activation_backoff_base_seconds=0.05, activation_backoff_max_seconds=0.2, activation_max_attempts=20,
                        activation_batch_size=4)
    runtime = Runtime.open(settings)
    try:
        yield runtime
    finally:
        runtime.close()


def _drain(rt: Runtime, deliverer: Deliverer, deadline_s: float = 30.0) -> None:
    """Deliver until no batch is pending (retries wait for their backoff or Retry-After)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        deliverer.drain()
        left = rt.engine.fetch_all("SELECT count(*) FROM activation_batches WHERE status IN ('pending', 'delivering')",
                                   cursor=rt.engine.fresh_reader())[0][0]
        if not left:
            return
        time.sleep(0.05)
    raise AssertionError("the outbox did not drain")


def _expected(rt: Runtime, segment: str, consented: set[str]) -> set[str]:
    open_ids = {r[0] for r in rt.engine.fetch_all("SELECT profile_id FROM segment_members WHERE segment = ? AND exited_at IS NULL",
                                                  [segment], cursor=rt.engine.fresh_reader())}
    return open_ids & consented


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_after_each_fault_the_receiver_holds_exactly_the_consented_members(rt: Runtime, fault: str) -> None:
    secret = secrets.token_urlsafe(16)
    people = [f"p{i:02d}" for i in range(1, 15)]
    denied = {"p12", "p13", "p14"}
    for pid in people:
        person(rt, pid, email=f"{pid}@example.com", marketing="denied" if pid in denied else "granted")
    consented = set(people) - denied
    define_segment(rt, "vip")
    membership(rt, "vip", people[:8] + ["p12", "p13"])

    with Receiver(secret) as rx:
        ops.create_destination(rt, ACTOR, "hook", "webhook", "marketing", {"url": rx.url, "secret": secret})
        ops.create_sync(rt, ACTOR, "vip_hook", "vip", "hook", {"email": "email"}, mode="diff")
        deliverer = Deliverer(rt.engine, rt.writer, rt.settings, "hook", rt.vault)
        try:
            # first delivery, with the fault on its first requests
            rx.inject(*FAULTS[fault])
            service.plan(rt, get_sync(rt.engine, "vip_hook"), trigger="test")
            _drain(rt, deliverer)
            assert set(rx.members("vip")) == _expected(rt, "vip", consented)

            # membership changes (some leave, some enter), one member withdraws consent; the fault again
            membership(rt, "vip", people[4:11] + ["p13", "p14"])
            set_consent(rt, "p05", "denied")
            consented.discard("p05")
            rx.inject(*FAULTS[fault])
            service.plan(rt, get_sync(rt.engine, "vip_hook"), trigger="test")
            _drain(rt, deliverer)
        finally:
            deliverer.close()
        held = rx.members("vip")
        stats = rx.stats
        ever = rx.ever_added

    assert set(held) == _expected(rt, "vip", consented) == set(people[4:11]) - {"p05"}
    assert all(fields["email"] == f"{pid}@example.com" for pid, fields in held.items())  # revealed at delivery
    assert not ever & denied  # never sent, even while a member
    assert stats.bad_signatures == 0 and stats.faults >= 1
    # each batch was applied once however often it was sent
    batches = rt.engine.fetch_all("SELECT count(*) FROM activation_batches WHERE status = 'delivered'", cursor=rt.engine.fresh_reader())[0][0]
    assert stats.batches == batches
    runs = ops.list_runs(rt, "vip_hook")
    assert runs and all(r["failed"] == 0 for r in runs)
    assert sum(r["skipped_consent"] for r in runs) >= 2

"""The webhook destination against the real loopback receiver, one fault at a time: each gives the
right transient/terminal answer, and retrying the same batch leaves the receiver holding exactly
the members it should (applied once, by Idempotency-Key)."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from refinery.activation.destination import (
    DestinationContext,
    TerminalDeliveryError,
    TransientDeliveryError,
    get_type,
)
from refinery.activation.receiver import Fault, Receiver, verify_signature
from refinery.activation.webhook import WebhookConfig, WebhookDestination, parse_retry_after, sign

SECRET = "a-signing-secret-of-some-length"
LOOPBACK = ("127.0.0.1/32",)


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver(SECRET) as receiver:
        yield receiver


@pytest.fixture
def hook(rx: Receiver, dest_context: Callable[..., DestinationContext]) -> Iterator[WebhookDestination]:
    dest = WebhookDestination(WebhookConfig(url=rx.url, secret=SECRET), dest_context(LOOPBACK, timeout=1.0))
    try:
        yield dest
    finally:
        dest.close()


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"batch_id":"b1"}'
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, "1700000000", body) == "sha256=" + expected
    assert verify_signature(SECRET, "1700000000", "sha256=" + expected, body, now=1700000100)
    assert not verify_signature(SECRET, "1700000000", "sha256=" + expected, body + b" ", now=1700000100)
    assert not verify_signature("another-secret-entirely", "1700000000", "sha256=" + expected, body, now=1700000100)
    # A replay long after the timestamp is refused even with a valid signature.
    assert not verify_signature(SECRET, "1700000000", "sha256=" + expected, body, now=1700000000 + 3600)


def test_delivers_adds_and_removes_signed_and_once(rx: Receiver, hook: WebhookDestination, dest_batch) -> None:
    hook.deliver(dest_batch({"p1": {"email": "a@example.com", "plan": "gold"}, "p2": {"email": "b@example.com"}}))
    hook.deliver(dest_batch({"p3": {"email": "c@example.com"}}, ["p1"]))
    assert rx.members("vip") == {"p2": {"email": "b@example.com"}, "p3": {"email": "c@example.com"}}
    st = rx.stats
    assert (st.batches, st.duplicates, st.bad_signatures, st.added, st.removed) == (2, 0, 0, 3, 1)


def test_a_repeated_batch_is_applied_once(rx: Receiver, hook: WebhookDestination, dest_batch) -> None:
    batch = dest_batch({"p1": {"n": 1}})
    hook.deliver(batch)
    hook.deliver(dest_batch(removes=["p1"]))
    hook.deliver(batch)  # a late repeat of the first batch must not bring p1 back
    assert rx.members("vip") == {}
    assert (rx.stats.batches, rx.stats.duplicates) == (2, 1)


def test_wrong_secret_is_refused_by_the_receiver_as_terminal(rx: Receiver, dest_context, dest_batch) -> None:
    dest = WebhookDestination(WebhookConfig(url=rx.url, secret="not-the-receivers-secret"), dest_context(LOOPBACK))
    with pytest.raises(TerminalDeliveryError) as err:
        dest.deliver(dest_batch({"p1": {}}))
    dest.close()
    assert err.value.details["status"] == 401
    assert "signing secret" in (err.value.fix or "")
    assert rx.stats.bad_signatures == 1 and rx.members() == {}


def test_timeout_is_transient_and_the_retry_is_a_duplicate(rx: Receiver, hook: WebhookDestination, dest_batch) -> None:
    rx.inject(Fault.timeout(2.5))  # applies, then answers after the client (1 s) gave up
    batch = dest_batch({"p1": {"email": "secret-person@example.com"}})
    with pytest.raises(TransientDeliveryError) as err:
        hook.deliver(batch)
    assert "Timed out" in str(err.value) and err.value.retry_after is None
    assert "secret-person@example.com" not in str(err.value)
    hook.deliver(batch)
    assert rx.members("vip") == {"p1": {"email": "secret-person@example.com"}}
    assert (rx.stats.batches, rx.stats.duplicates) == (1, 1)


@pytest.mark.parametrize("status", [500, 502, 503, 408])
def test_server_errors_and_408_are_transient(status: int, rx: Receiver, hook: WebhookDestination, dest_batch) -> None:
    rx.inject(Fault.error(status))
    batch = dest_batch({"p1": {}})
    with pytest.raises(TransientDeliveryError) as err:
        hook.deliver(batch)
    assert err.value.details["status"] == status and err.value.retry_after is None
    assert rx.members() == {}
    hook.deliver(batch)
    assert set(rx.members("vip")) == {"p1"}


def test_429_retry_after_in_seconds(rx: Receiver, hook: WebhookDestination, dest_batch) -> None:
    rx.inject(Fault.too_many("7"))
    with pytest.raises(TransientDeliveryError) as err:
        hook.deliver(dest_batch({"p1": {}}))
    assert err.value.details["status"] == 429
    assert err.value.retry_after == 7.0


def test_429_retry_after_as_http_date(rx: Receiver, hook: WebhookDestination, dest_batch) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    rx.inject(Fault.too_many(format_datetime(when, usegmt=True)))
    with pytest.raises(TransientDeliveryError) as err:
        hook.deliver(dest_batch({"p1": {}}))
    assert err.value.retry_after is not None and 25 <= err.value.retry_after <= 31


def test_503_with_retry_after_is_passed_on(rx: Receiver, hook: WebhookDestination, dest_batch) -> None:
    rx.inject(Fault.error(503, retry_after="12"))
    with pytest.raises(TransientDeliveryError) as err:
        hook.deliver(dest_batch({"p1": {}}))
    assert err.value.retry_after == 12.0


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 60) == 60.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 + 60) == 0.0


def test_connection_closed_without_answer_is_transient(rx: Receiver, hook: WebhookDestination, dest_batch) -> None:
    rx.inject(Fault.close())
    batch = dest_batch({"p1": {}})
    with pytest.raises(TransientDeliveryError) as err:
        hook.deliver(batch)
    assert "Connection failed" in str(err.value)
    assert rx.members() == {}
    hook.deliver(batch)
    assert set(rx.members("vip")) == {"p1"} and rx.stats.batches == 1


def test_a_slow_answer_within_the_timeout_is_delivered(rx: Receiver, hook: WebhookDestination, dest_batch) -> None:
    rx.inject(Fault.slow(0.4))
    hook.deliver(dest_batch({"p1": {}}))
    assert set(rx.members("vip")) == {"p1"} and rx.stats.faults == 1


def test_accept_one_then_fail_the_next(rx: Receiver, hook: WebhookDestination, dest_batch) -> None:
    rx.inject(Fault.accept(), Fault.error(500))
    first, second = dest_batch({"p1": {}, "p2": {}}), dest_batch({"p3": {}}, ["p1"])
    hook.deliver(first)
    with pytest.raises(TransientDeliveryError):
        hook.deliver(second)
    assert set(rx.members("vip")) == {"p1", "p2"}
    hook.deliver(second)
    assert set(rx.members("vip")) == {"p2", "p3"}
    assert (rx.stats.batches, rx.stats.duplicates, rx.stats.requests) == (2, 0, 3)


@pytest.mark.parametrize("status", [400, 404, 410, 422])
def test_other_4xx_are_terminal(status: int, rx: Receiver, hook: WebhookDestination, dest_batch) -> None:
    rx.inject(Fault.error(status))
    with pytest.raises(TerminalDeliveryError) as err:
        hook.deliver(dest_batch({"p1": {"email": "x@example.com"}}))
    assert err.value.details["status"] == status
    assert "x@example.com" not in str(err.value)


def test_nothing_listening_is_transient(dest_context, dest_batch) -> None:
    with Receiver(SECRET) as rx:
        url = rx.url
    dest = WebhookDestination(WebhookConfig(url=url, secret=SECRET), dest_context(LOOPBACK))
    with pytest.raises(TransientDeliveryError):
        dest.deliver(dest_batch({"p1": {}}))
    dest.close()


def test_registered_kind_builds_from_config_and_hides_the_secret(rx: Receiver, dest_context, dest_batch) -> None:
    dtype = get_type("webhook")
    config = dtype.config_model.model_validate({"url": rx.url, "secret": SECRET})
    assert SECRET not in repr(config) and SECRET not in str(config.model_dump())
    dest = dtype.factory(config, dest_context(LOOPBACK))
    dest.deliver(dest_batch({"p9": {}}))
    dest.close()
    assert set(rx.members("vip")) == {"p9"}


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://example.com/x", "http(s) URL"),
        ("https://user:pw@example.com/x", "credentials"),
        ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata"),
    ],
)
def test_bad_urls_are_refused_at_configuration(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        WebhookConfig(url=url, secret=SECRET)
    assert words in str(err.value)


def test_the_receiver_runs_as_a_process(dest_context, dest_batch) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "refinery.activation.receiver", "--secret", SECRET],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        base = started["url"].rsplit("/", 1)[0]
        httpx.post(f"{base}/_receiver/faults", json=[{"kind": "status", "status": 503, "retry_after": "2"}]).raise_for_status()
        dest = WebhookDestination(WebhookConfig(url=started["url"], secret=SECRET), dest_context(LOOPBACK))
        batch = dest_batch({"p1": {"plan": "gold"}})
        with pytest.raises(TransientDeliveryError) as err:
            dest.deliver(batch)
        assert err.value.retry_after == 2.0
        dest.deliver(batch)
        dest.close()
        state = httpx.get(started["state"]).json()
        assert state["members"] == {"vip": {"p1": {"plan": "gold"}}}
        assert state["stats"]["batches"] == 1 and state["stats"]["faults"] == 1
    finally:
        proc.kill()
        proc.wait(10)

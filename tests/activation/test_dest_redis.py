"""The Redis destination against a real redis-server (tests/services.py): sets and hashes after
adds and removes, a repeated batch changes nothing, a server that is down is a transient failure."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from refinery.activation.destination import TerminalDeliveryError, TransientDeliveryError, get_type
from refinery.activation.redis_destination import RedisConfig, RedisDestination
from services import REDIS_PASSWORD, RedisServer, start_redis

LOOPBACK = ("127.0.0.1/32",)


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, password=server.password, decode_responses=True)


def _dest(server: RedisServer, dest_context, prefix: str, **kw: object) -> RedisDestination:
    config = RedisConfig(host="127.0.0.1", port=server.port, password=REDIS_PASSWORD, prefix=prefix, **kw)  # type: ignore[arg-type]
    return RedisDestination(config, dest_context(LOOPBACK))


def test_adds_removes_and_fields(redis_server: RedisServer, dest_context, dest_batch) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    dest = _dest(redis_server, dest_context, prefix)
    r = _client(redis_server)
    dest.deliver(dest_batch({"p1": {"email": "a@example.com", "ltv": 12.5, "vip": True, "tags": ["x"], "gone": None},
                             "p2": {"email": "b@example.com"}}))
    assert r.smembers(f"{prefix}:segment:vip") == {"p1", "p2"}
    assert r.hgetall(f"{prefix}:profile:p1") == {"email": "a@example.com", "ltv": "12.5", "vip": "true", "tags": '["x"]'}
    # Mirror: p2's fields change (one disappears), p1 leaves, p3 arrives.
    dest.deliver(dest_batch({"p2": {"plan": "gold"}, "p3": {"email": "c@example.com"}}, ["p1"]))
    assert r.smembers(f"{prefix}:segment:vip") == {"p2", "p3"}
    assert r.hgetall(f"{prefix}:profile:p2") == {"plan": "gold"}
    assert r.exists(f"{prefix}:profile:p1") == 0
    dest.close()


def test_a_repeated_batch_changes_nothing(redis_server: RedisServer, dest_context, dest_batch) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    dest = _dest(redis_server, dest_context, prefix)
    r = _client(redis_server)
    first = dest_batch({"p1": {"n": 1}})
    dest.deliver(first)
    dest.deliver(dest_batch(removes=["p1"]))
    dest.deliver(first)  # late repeat: must not bring p1 back
    assert r.smembers(f"{prefix}:segment:vip") == set()
    assert 0 < r.ttl(f"{prefix}:batch:{first.id}") <= 30 * 86400
    dest.close()


def test_only_the_chosen_fields_are_written(redis_server: RedisServer, dest_context, dest_batch) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    dest = _dest(redis_server, dest_context, prefix, fields=["plan"])
    dest.deliver(dest_batch({"p1": {"plan": "gold", "email": "a@example.com"}}))
    assert _client(redis_server).hgetall(f"{prefix}:profile:p1") == {"plan": "gold"}
    dest.close()


def test_server_down_is_transient_then_delivers(tmp_path: Path, dest_context, dest_batch) -> None:
    server = start_redis(tmp_path)
    dest = _dest(server, dest_context, "down")
    batch = dest_batch({"p1": {"n": 1}})
    try:
        dest.deliver(dest_batch({"p0": {}}))
        server.stop()
        with pytest.raises(TransientDeliveryError, match="Redis unavailable"):
            dest.deliver(batch)
        server.start()  # same port, empty again (no persistence)
        dest.deliver(batch)
        assert _client(server).smembers("down:segment:vip") == {"p1"}
    finally:
        dest.close()
        server.stop()


def test_wrong_password_is_terminal(redis_server: RedisServer, dest_context, dest_batch) -> None:
    config = RedisConfig(host="127.0.0.1", port=redis_server.port, password="not-the-password")  # type: ignore[arg-type]
    dest = RedisDestination(config, dest_context(LOOPBACK))
    with pytest.raises(TerminalDeliveryError) as err:
        dest.deliver(dest_batch({"p1": {}}))
    assert err.value.field == "password" and "not-the-password" not in str(err.value)
    dest.close()


def test_a_key_of_another_type_is_terminal(redis_server: RedisServer, dest_context, dest_batch) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    _client(redis_server).set(f"{prefix}:segment:vip", "a string, not a set")
    dest = _dest(redis_server, dest_context, prefix)
    with pytest.raises(TerminalDeliveryError, match="prefix"):
        dest.deliver(dest_batch({"p1": {}}))
    dest.close()


def test_loopback_redis_is_refused_without_the_allow_list(redis_server: RedisServer, dest_context, dest_batch) -> None:
    config = RedisConfig(host="localhost", port=redis_server.port, password=REDIS_PASSWORD)  # type: ignore[arg-type]
    dest = RedisDestination(config, dest_context())
    with pytest.raises(TerminalDeliveryError) as err:
        dest.deliver(dest_batch({"p1": {}}))
    assert err.value.field == "host" and "loopback" in err.value.message
    dest.close()


def test_registered_and_secret_hidden(redis_server: RedisServer, dest_context) -> None:
    dtype = get_type("redis")
    config = dtype.config_model.model_validate({"host": "127.0.0.1", "password": REDIS_PASSWORD})
    assert REDIS_PASSWORD not in repr(config)
    assert isinstance(dtype.factory(config, dest_context(LOOPBACK)), RedisDestination)


def test_a_host_that_does_not_resolve_is_transient(dest_context, dest_batch) -> None:
    dest = RedisDestination(RedisConfig(host="no-such-host.invalid"), dest_context())
    with pytest.raises(TransientDeliveryError, match="Cannot resolve"):
        dest.deliver(dest_batch({"p1": {}}))

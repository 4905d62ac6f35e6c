"""The PostgreSQL destination against a real PostgreSQL server (tests/services.py): the table made
when missing, upserts and deletes, a repeated batch changes nothing, a server that is down is a
transient failure, bad credentials a terminal one."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from refinery.activation.destination import TerminalDeliveryError, TransientDeliveryError, get_type
from refinery.activation.postgres_destination import PostgresConfig, PostgresDestination
from services import PostgresServer

LOOPBACK = ("127.0.0.1/32",)


def _config(server: PostgresServer, table: str, **kw: Any) -> PostgresConfig:
    return PostgresConfig(host="127.0.0.1", port=server.port, user=server.user, password=server.password,
                          table=table, **kw)


def _rows(server: PostgresServer, table: str, schema: str = "public") -> dict[tuple[str, str], dict[str, Any]]:
    with psycopg.connect(host="127.0.0.1", port=server.port, user=server.user, password=server.password,
                         dbname=server.dbname) as conn:
        cur = conn.execute(
            psycopg.sql.SQL("SELECT profile_id, segment, fields FROM {}").format(psycopg.sql.Identifier(schema, table))
        )
        return {(pid, seg): fields for pid, seg, fields in cur.fetchall()}


def _table() -> str:
    return f"members_{uuid.uuid4().hex[:8]}"


def test_table_created_then_upserts_and_deletes(postgres_server: PostgresServer, dest_context, dest_batch) -> None:
    table = _table()
    dest = PostgresDestination(_config(postgres_server, table), dest_context(LOOPBACK))
    dest.deliver(dest_batch({"p1": {"email": "a@example.com", "ltv": 12.5}, "p2": {"tags": ["x"]}}))
    dest.deliver(dest_batch({"p9": {}}, segment="other"))
    assert _rows(postgres_server, table) == {
        ("p1", "vip"): {"email": "a@example.com", "ltv": 12.5},
        ("p2", "vip"): {"tags": ["x"]},
        ("p9", "other"): {},
    }
    dest.deliver(dest_batch({"p2": {"plan": "gold"}, "p3": {}}, ["p1"]))
    assert _rows(postgres_server, table) == {
        ("p2", "vip"): {"plan": "gold"},
        ("p3", "vip"): {},
        ("p9", "other"): {},
    }
    dest.close()


def test_a_repeated_batch_changes_nothing(postgres_server: PostgresServer, dest_context, dest_batch) -> None:
    table = _table()
    dest = PostgresDestination(_config(postgres_server, table), dest_context(LOOPBACK))
    first = dest_batch({"p1": {"n": 1}, "p2": {"n": 2}})
    dest.deliver(first)
    dest.deliver(dest_batch(removes=["p1"]))
    dest.deliver(first)  # a late repeat must not bring p1 back
    assert set(_rows(postgres_server, table)) == {("p2", "vip")}
    dest.close()


def test_names_are_quoted_not_interpreted(postgres_server: PostgresServer, dest_context, dest_batch) -> None:
    with pytest.raises(ValueError, match="plain SQL name"):
        _config(postgres_server, 'x"; DROP TABLE y; --')
    table = "Mixed_Case_" + uuid.uuid4().hex[:6]
    dest = PostgresDestination(_config(postgres_server, table), dest_context(LOOPBACK))
    dest.deliver(dest_batch({"p'; DROP TABLE x; --": {"quote": "it's"}}, segment="o'brien"))
    assert _rows(postgres_server, table) == {("p'; DROP TABLE x; --", "o'brien"): {"quote": "it's"}}
    dest.close()


def test_server_down_is_transient_then_delivers(postgres_server: PostgresServer, dest_context, dest_batch) -> None:
    table = _table()
    dest = PostgresDestination(_config(postgres_server, table), dest_context(LOOPBACK))
    dest.deliver(dest_batch({"p0": {}}))  # connected, table made
    batch = dest_batch({"p1": {}})
    postgres_server.stop()
    try:
        with pytest.raises(TransientDeliveryError):
            dest.deliver(batch)  # the open connection breaks
        with pytest.raises(TransientDeliveryError):
            dest.deliver(batch)  # and a new one is refused
    finally:
        postgres_server.start()
    dest.deliver(batch)
    assert set(_rows(postgres_server, table)) == {("p0", "vip"), ("p1", "vip")}
    dest.close()


def test_wrong_password_is_terminal_and_not_shown(postgres_server: PostgresServer, dest_context, dest_batch) -> None:
    config = PostgresConfig(host="127.0.0.1", port=postgres_server.port, user=postgres_server.user,
                            password="not-the-password", table=_table())  # type: ignore[arg-type]
    dest = PostgresDestination(config, dest_context(LOOPBACK))
    with pytest.raises(TerminalDeliveryError) as err:
        dest.deliver(dest_batch({"p1": {}}))
    assert "not-the-password" not in str(err.value) and "password" in (err.value.fix or "")


def test_unknown_database_is_terminal(postgres_server: PostgresServer, dest_context, dest_batch) -> None:
    dest = PostgresDestination(_config(postgres_server, _table(), dbname="no_such_db"), dest_context(LOOPBACK))
    with pytest.raises(TerminalDeliveryError):
        dest.deliver(dest_batch({"p1": {}}))


def test_dsn_works_and_its_host_is_guarded(postgres_server: PostgresServer, dest_context, dest_batch) -> None:
    table = _table()
    dsn = (f"postgresql://{postgres_server.user}:{postgres_server.password}@localhost:{postgres_server.port}"
           f"/{postgres_server.dbname}")
    config = PostgresConfig(dsn=dsn, table=table)  # type: ignore[arg-type]
    assert postgres_server.password not in repr(config)
    refused = PostgresDestination(config, dest_context())
    with pytest.raises(TerminalDeliveryError) as err:
        refused.deliver(dest_batch({"p1": {}}))
    assert err.value.field == "dsn" and "loopback" in err.value.message and postgres_server.password not in str(err.value)
    allowed = PostgresDestination(config, dest_context(("localhost",)))
    allowed.deliver(dest_batch({"p1": {"a": 1}}))
    assert _rows(postgres_server, table) == {("p1", "vip"): {"a": 1}}
    allowed.close()


def test_config_needs_host_or_dsn() -> None:
    with pytest.raises(ValueError, match="either host"):
        PostgresConfig()
    assert get_type("postgresql").config_model is PostgresConfig


def test_a_host_that_does_not_resolve_is_transient(dest_context, dest_batch) -> None:
    config = PostgresConfig(host="no-such-host.invalid", password="x", table=_table())  # type: ignore[arg-type]
    with pytest.raises(TransientDeliveryError, match="Cannot resolve"):
        PostgresDestination(config, dest_context()).deliver(dest_batch({"p1": {}}))

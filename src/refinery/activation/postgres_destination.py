"""The PostgreSQL destination: a table of segment members, upserted and deleted per batch.

The table (created when missing) is::

    <schema>.<table> (profile_id text, segment text, fields jsonb, updated_at timestamptz,
                      PRIMARY KEY (profile_id, segment))
    <schema>.<table>_batches (batch_id text PRIMARY KEY, applied_at timestamptz)

Each batch is one transaction: its id is inserted into `<table>_batches` first (a batch already
there is a repeat and changes nothing), then adds are upserted (`INSERT ... ON CONFLICT DO UPDATE`,
from arrays, in one statement) and removes deleted. Identifiers are quoted with `psycopg.sql`,
values are bound parameters.

The host goes through the SSRF guard (netguard): it is resolved once, checked, and libpq is given
the checked address as `hostaddr` while `host` keeps the name for TLS. Connection failures, a
server shutting down, serialization failures, deadlocks and timeouts are transient; refused
credentials, a missing database and permission errors are terminal. The password (or a whole
connection string, `dsn`) is a secret: stored encrypted, never logged.
"""

from __future__ import annotations

import math
import re
import threading
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from refinery.activation.destination import (
    Batch,
    DestinationContext,
    DestinationType,
    TerminalDeliveryError,
    TransientDeliveryError,
    register,
)
from refinery.activation.netguard import AddressRefused, NetworkGuard, UnresolvableHost

if TYPE_CHECKING:
    import psycopg

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,50}")
#: SQLSTATE classes and codes worth retrying: connection exceptions, insufficient resources,
#: operator intervention (shutdown, cannot connect now, query cancelled by a timeout), lock not
#: available, serialization failure, deadlock.
_TRANSIENT_CLASSES = ("08", "53", "57")
_TRANSIENT_CODES = frozenset({"40001", "40P01", "55P03"})
_TERMINAL_AT_CONNECT = ("28", "3D")  # bad credentials, unknown database
#: libpq reports a refused connection without a SQLSTATE: these server answers need an operator
#: (anything else when connecting, e.g. "starting up", "too many clients", refused, is transient).
_TERMINAL_CONNECT_PHRASES = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "permission denied",
    "password is missing",
    "no password supplied",
)


class PostgresConfig(BaseModel):
    """Configuration of a PostgreSQL destination. Give `host` (with port, dbname, user, password) or `dsn`."""

    model_config = {"extra": "forbid"}

    host: str | None = Field(None, description="Server host name or address (checked against activation_allowed_networks).")
    port: int = Field(5432, ge=1, le=65535, description="Server port.")
    dbname: str = Field("postgres", description="Database name.")
    user: str | None = Field(None, description="User name.")
    password: SecretStr | None = Field(None, description="Password. Stored encrypted, never shown.")
    dsn: SecretStr | None = Field(
        None,
        description="Instead of host/port/dbname/user/password: a libpq connection string or URI "
        "(postgresql://user:pw@host/db). Stored encrypted, never shown; its host is checked like `host`.",
    )
    table_schema: str = Field("public", description="Schema of the members table.")
    table: str = Field("refinery_members", description="Members table (letters, digits, _); created when missing, with <table>_batches beside it.")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        "prefer", description="libpq sslmode."
    )

    @field_validator("table", "table_schema")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a plain SQL name. Fix: use letters, digits and underscores (at most 51), starting with a letter."
            )
        return value

    @model_validator(mode="after")
    def _host_or_dsn(self) -> PostgresConfig:
        if (self.host is None) == (self.dsn is None):
            raise ValueError("Give either host (with port, dbname, user, password) or dsn, not both and not neither.")
        return self


class PostgresDestination:
    def __init__(self, config: PostgresConfig, context: DestinationContext) -> None:
        self.config = config
        self.timeout = context.timeout_seconds
        self.guard = NetworkGuard(context.allowed_networks, field="dsn" if config.dsn else "host")
        self._conn: psycopg.Connection[Any] | None = None
        self._tables_ready = False
        self._lock = threading.Lock()

    # -- connecting ------------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        from psycopg.conninfo import conninfo_to_dict

        c = self.config
        if c.dsn is not None:
            try:
                params: dict[str, Any] = dict(conninfo_to_dict(c.dsn.get_secret_value()))
            except Exception:
                raise TerminalDeliveryError(
                    "The destination's dsn is not a valid PostgreSQL connection string.",
                    field="dsn",
                    fix="Write it as postgresql://user:password@host:5432/dbname or host=... dbname=... .",
                ) from None
        else:
            params = {"host": c.host, "port": c.port, "dbname": c.dbname, "user": c.user}
            if c.password is not None:
                params["password"] = c.password.get_secret_value()
        host = str(params.get("host") or params.get("hostaddr") or "")
        if not host or "," in host or host.startswith("/") or "," in str(params.get("hostaddr") or ""):
            raise TerminalDeliveryError(
                "The PostgreSQL destination needs exactly one TCP host (not a socket folder or a list of hosts).",
                field=self.guard.field,
                fix="Name one host name or address.",
            )
        port = int(str(params.get("port") or 5432))
        # One lookup, checked; libpq connects to that address and keeps the name for TLS.
        params["hostaddr"] = str(self.guard.resolve(host, port)[0])
        params["host"] = host
        params["port"] = port
        params.setdefault("sslmode", c.sslmode)
        params["connect_timeout"] = max(2, math.ceil(self.timeout))
        params["options"] = f"-c statement_timeout={int(self.timeout * 1000)}"
        params["application_name"] = "refinery-activation"
        return params

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(**self._params())
            self._tables_ready = False
        if not self._tables_ready:
            self._create_tables(self._conn)
            self._tables_ready = True
        return self._conn

    # -- SQL (identifiers quoted by psycopg.sql, values bound) -------------------------------------

    def _names(self) -> tuple[Any, Any]:
        from psycopg import sql

        c = self.config
        return sql.Identifier(c.table_schema, c.table), sql.Identifier(c.table_schema, c.table + "_batches")

    def _create_tables(self, conn: psycopg.Connection[Any]) -> None:
        from psycopg import sql

        members, batches = self._names()
        with conn.transaction():
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (profile_id text NOT NULL, segment text NOT NULL, "
                    "fields jsonb NOT NULL DEFAULT '{{}}'::jsonb, updated_at timestamptz NOT NULL DEFAULT now(), "
                    "PRIMARY KEY (profile_id, segment))"
                ).format(members)
            )
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (batch_id text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(batches)
            )

    def _apply(self, conn: psycopg.Connection[Any], batch: Batch) -> None:
        from psycopg import sql

        members, batches = self._names()
        adds: dict[str, str] = {}
        for record in batch.added:  # last one wins if a profile appears twice
            adds[record.profile_id] = orjson.dumps(dict(record.fields), default=str).decode()
        removes = list(dict.fromkeys(r.profile_id for r in batch.removed if r.profile_id not in adds))
        with conn.transaction():
            fresh = conn.execute(
                sql.SQL("INSERT INTO {} (batch_id) VALUES (%s) ON CONFLICT (batch_id) DO NOTHING").format(batches),
                (batch.id,),
            )
            if fresh.rowcount == 0:
                return  # applied before: a repeat must change nothing
            if adds:
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (profile_id, segment, fields, updated_at) "
                        "SELECT p, %s, f::jsonb, now() FROM unnest(%s::text[], %s::text[]) AS u(p, f) "
                        "ON CONFLICT (profile_id, segment) DO UPDATE "
                        "SET fields = EXCLUDED.fields, updated_at = EXCLUDED.updated_at"
                    ).format(members),
                    (batch.segment, list(adds), list(adds.values())),
                )
            if removes:
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE segment = %s AND profile_id = ANY(%s)").format(members),
                    (batch.segment, removes),
                )

    # -- delivery ----------------------------------------------------------------------------------

    def deliver(self, batch: Batch) -> None:
        import psycopg

        where = f"batch {batch.id} to PostgreSQL"
        with self._lock:
            connecting = True
            try:
                conn = self._connect()
                connecting = False
                self._apply(conn, batch)
            except AddressRefused as exc:
                raise TerminalDeliveryError(exc.message, field=exc.field, fix=exc.fix) from None
            except UnresolvableHost as exc:
                raise TransientDeliveryError(f"PostgreSQL unavailable for {where}: {exc}") from None
            except psycopg.Error as exc:
                self._classify(exc, where, connecting)

    def _classify(self, exc: Exception, where: str, connecting: bool) -> None:
        import psycopg

        state = getattr(exc, "sqlstate", None) or ""
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        said = f"PostgreSQL failed {where}: {first_line}"
        refused = connecting and any(phrase in str(exc) for phrase in _TERMINAL_CONNECT_PHRASES)
        if state.startswith(_TERMINAL_AT_CONNECT) or refused:
            self._reset()
            raise TerminalDeliveryError(
                said, field=self.guard.field, fix="Check the destination's user, password and dbname."
            ) from None
        if (
            state.startswith(_TRANSIENT_CLASSES)
            or state in _TRANSIENT_CODES
            or (connecting and isinstance(exc, psycopg.OperationalError))
            or isinstance(exc, psycopg.InterfaceError)
            or (not state and isinstance(exc, psycopg.OperationalError))
        ):
            self._reset()
            raise TransientDeliveryError(said, sqlstate=state or None) from None
        if self._conn is not None and self._conn.broken:
            self._reset()
        raise TerminalDeliveryError(
            said,
            fix="Check that the user may create and write the destination's table (or that the table has the expected columns).",
            sqlstate=state or None,
        ) from None

    def _reset(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        with self._lock:
            self._reset()


POSTGRES = register(
    DestinationType(
        kind="postgresql",
        config_model=PostgresConfig,
        factory=PostgresDestination,
        description="A PostgreSQL table of members (profile_id, segment, fields jsonb), upserted and deleted per batch in one transaction.",
    )
)

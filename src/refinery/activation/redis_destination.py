"""The Redis destination: a set of members per segment and a hash of mapped fields per profile.

For each batch, in one MULTI/EXEC transaction:

- adds: `SADD <prefix>:segment:<segment> <profile_id>...`, and for each added profile
  `DEL` + `HSET <prefix>:profile:<profile_id>` of its mapped fields (DEL first, so a field that
  left the mapping or became empty does not linger);
- removes: `SREM` from the segment's set and `DEL` of the profile's hash;
- `SET <prefix>:batch:<batch id>` (expiring after `batch_ttl_days`), the idempotency record.

The batch key is WATCHed and checked first: a batch already applied is not applied again, so a late
repeat cannot undo a later batch. Profile hashes are shared by every sync writing with the same
prefix; give syncs whose segments overlap prefixes of their own.

The host goes through the SSRF guard (netguard) and the client connects to the checked address.
Values: strings as they are, numbers and booleans as text (`true`/`false`), lists and objects as
JSON, empty fields left out. Connection failures, timeouts, a loading or read-only server are
transient; a refused password and a command Redis rejects are terminal.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, SecretStr

from refinery.activation.destination import (
    Batch,
    DestinationContext,
    DestinationType,
    TerminalDeliveryError,
    TransientDeliveryError,
    field_text,
    register,
)
from refinery.activation.netguard import AddressRefused, NetworkGuard

if TYPE_CHECKING:
    import redis


class RedisConfig(BaseModel):
    """Configuration of a Redis destination."""

    model_config = {"extra": "forbid"}

    host: str = Field(description="Redis host name or address (checked against activation_allowed_networks like every network destination).")
    port: int = Field(6379, ge=1, le=65535, description="Redis port.")
    db: int = Field(0, ge=0, description="Database number.")
    username: str | None = Field(None, description="ACL user name (Redis 6+); leave empty for the default user.")
    password: SecretStr | None = Field(None, description="Password (AUTH). Stored encrypted, never shown.")
    prefix: str = Field("refinery", min_length=1, max_length=100, description="Prefix of every key written: <prefix>:segment:<segment>, <prefix>:profile:<id>, <prefix>:batch:<id>.")
    fields: list[str] | None = Field(None, description="Mapped fields written to each profile's hash; all of them when not set.")
    batch_ttl_days: int = Field(30, ge=1, le=3650, description="How long the record of an applied batch (its idempotency key) is kept.")



class RedisDestination:
    def __init__(self, config: RedisConfig, context: DestinationContext) -> None:
        self.config = config
        self.timeout = context.timeout_seconds
        self.guard = NetworkGuard(context.allowed_networks, field="host")
        self.guard.check_host_name(config.host, f"{config.host}:{config.port}")
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    def key(self, *parts: str) -> str:
        return ":".join((self.config.prefix, *parts))

    def _connect(self) -> redis.Redis:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if self._client is None:
            # One lookup, checked; the client then connects to that address and never resolves again.
            address = self.guard.resolve(self.config.host, self.config.port)[0]
            self._client = redis.Redis(
                host=str(address),
                port=self.config.port,
                db=self.config.db,
                username=self.config.username,
                password=self.config.password.get_secret_value() if self.config.password else None,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0),  # the outbox retries, with backoff, not the client
                decode_responses=False,
            )
        return self._client

    def _hash_of(self, fields: Mapping[str, Any]) -> dict[str, str]:
        wanted = self.config.fields
        out: dict[str, str] = {}
        for name, value in fields.items():
            if wanted is not None and name not in wanted:
                continue
            text = field_text(value)
            if text is not None:
                out[name] = text
        return out

    def deliver(self, batch: Batch) -> None:
        import redis

        where = f"batch {batch.id} to Redis {self.config.host}:{self.config.port}"
        with self._lock:
            try:
                self._apply(self._connect(), batch)
            except AddressRefused as exc:
                raise TerminalDeliveryError(exc.message, field=exc.field, fix=exc.fix) from None
            except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
                self._reset()
                raise TerminalDeliveryError(
                    f"Redis refused the credentials for {where}: {exc}",
                    field="password",
                    fix="Check the destination's username and password.",
                ) from None
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
                    redis.exceptions.TryAgainError, redis.exceptions.ReadOnlyError,
                    redis.exceptions.OutOfMemoryError, OSError) as exc:
                self._reset()
                raise TransientDeliveryError(f"Redis unavailable for {where}: {type(exc).__name__}: {exc}") from None
            except redis.exceptions.RedisError as exc:
                raise TerminalDeliveryError(
                    f"Redis rejected {where}: {type(exc).__name__}: {exc}",
                    fix="Check that the destination's prefix does not collide with keys of another type.",
                ) from None

    def _apply(self, client: redis.Redis, batch: Batch) -> None:
        import redis

        marker = self.key("batch", batch.id)
        segment = self.key("segment", batch.segment)
        adds = list(dict.fromkeys(r.profile_id for r in batch.added))
        removes = list(dict.fromkeys(r.profile_id for r in batch.removed))
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(marker)
                if pipe.exists(marker):
                    return  # applied before: a repeat must change nothing
                pipe.multi()
                if adds:
                    pipe.sadd(segment, *adds)
                for record in batch.added:
                    profile = self.key("profile", record.profile_id)
                    pipe.delete(profile)
                    mapping = self._hash_of(record.fields)
                    if mapping:
                        pipe.hset(profile, mapping=mapping)  # type: ignore[arg-type]
                if removes:
                    pipe.srem(segment, *removes)
                    pipe.delete(*(self.key("profile", pid) for pid in removes))
                pipe.set(marker, datetime.now(UTC).isoformat(), ex=self.config.batch_ttl_days * 86400)
                pipe.execute()
            except redis.exceptions.WatchError:
                return  # another delivery of this very batch committed meanwhile

    def _reset(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # closing a broken client must not hide the real error
                self._client.close()
            self._client = None

    def close(self) -> None:
        with self._lock:
            self._reset()


REDIS = register(
    DestinationType(
        kind="redis",
        config_model=RedisConfig,
        factory=RedisDestination,
        description="A Redis set of members per segment and a hash of mapped fields per profile (MULTI per batch).",
    )
)

"""The online store: the latest value of each feature per profile, for serving (docs/features.md#the-online-store).

Values are written by `materialize.py` (the offline store's computation at one moment for every
profile) and read here by profile id. Two backends behind one small interface:

- `SqliteStore` (default): a SQLite file, `<data_dir>/features/online.sqlite`; any process on the
  machine can read it (WAL), lookups are a primary-key range read.
- `RedisStore`: a Redis server, for deployments that serve from many processes or machines.

Each store also keeps what a lookup needs without the database: the merged profile ids and their
survivors as of the last full materialisation (`aliases`), the profiles an erasure removed
(`erased`: a lookup for them answers 404 "erased", and a materialisation running while the erasure
happened cannot write them back), and the run state (`state`: the last run's moment, feature
versions and table summaries, which the next run's incremental decision reads).

A value older than its feature's time-to-live is reported `stale` with no value (never served as
if it were current); a feature with no value for the profile is `missing`.
"""

from __future__ import annotations

import abc
import json
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from refinery.errors import ConfigurationError, NotFoundError
from refinery.settings import Settings

#: One stored value: (version, value as JSON-ready data, as_of in epoch seconds, ttl_seconds or None).
Entry = tuple[int, Any, float, int | None]
#: How long a process trusts its copy of the run state (other processes may materialise meanwhile).
STATE_SECONDS = 1.0
#: Merge chains longer than this are a bug in the identity tables, not data.
MAX_HOPS = 32


class ProfileErased(NotFoundError):
    code = "profile_erased"


class ProfileNotServed(NotFoundError):
    code = "profile_not_served"


@dataclass(frozen=True)
class FeatureValue:
    name: str
    version: int
    value: Any                  # None when stale
    status: str                 # fresh | stale
    as_of: str                  # when the value was computed (ISO 8601)
    confirmed_at: str           # the newest run that found it still right (incremental runs confirm untouched values)
    ttl_seconds: int | None
    expires_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Lookup:
    profile_id: str             # as asked
    profile_id_now: str         # the survivor whose values these are
    values: dict[str, FeatureValue]

    def to_dict(self) -> dict[str, Any]:
        return {"profile_id": self.profile_id, "profile_id_now": self.profile_id_now,
                "features": {k: v.to_dict() for k, v in self.values.items()}}


def jsonable(value: Any) -> Any:
    """A feature value as stored and served: numbers, text, booleans, times as ISO 8601 (UTC)."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


class OnlineStore(abc.ABC):
    """The interface both backends implement; lookups and TTLs are decided once, here."""

    kind: str
    location: str

    def __init__(self) -> None:
        self._state: tuple[float, dict[str, Any]] | None = None

    # --- backend hooks ---
    @abc.abstractmethod
    def _read(self, profile_id: str) -> tuple[bool, str | None, dict[str, Entry]]:
        """(erased, survivor if merged, values of `profile_id` itself)."""

    @abc.abstractmethod
    def put(self, values: Mapping[str, Mapping[str, Entry]], *, replace: bool, since: float) -> int:
        """Write each profile's values (`replace`: its other values go); profiles erased after `since`
        (epoch seconds; the moment the values were read from the database) are skipped. Returns values written."""

    @abc.abstractmethod
    def retain(self, profiles: set[str], features: set[str]) -> int:
        """After a full run: drop profiles not in `profiles` and features not in `features`."""

    @abc.abstractmethod
    def set_aliases(self, aliases: Mapping[str, str]) -> None: ...

    @abc.abstractmethod
    def erase(self, profile_ids: Iterable[str]) -> int:
        """Remove the profiles' values and aliases and remember them as erased; returns values removed."""

    @abc.abstractmethod
    def export(self, profile_ids: Iterable[str]) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def _load_state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _save_state(self, state: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def count(self) -> int:
        """Values held."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # --- shared ---
    def state(self, *, fresh: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        if fresh or self._state is None or now - self._state[0] > STATE_SECONDS:
            self._state = (now, self._load_state())
        return self._state[1]

    def save_state(self, state: dict[str, Any]) -> None:
        self._save_state(state)
        self._state = (time.monotonic(), state)

    def lookup(self, profile_id: str, *, now: float | None = None) -> Lookup:
        """The profile's values (following a merge to its survivor), each fresh or stale by its TTL.
        Raises ProfileErased (404) for an erased profile, ProfileNotServed (404) for one the store does not hold."""
        current = profile_id
        for _ in range(MAX_HOPS):
            erased, survivor, values = self._read(current)
            if erased:
                raise ProfileErased(f"Profile {profile_id!r} was erased (a privacy request): the online store holds no features for it.",
                                    fix="Nothing to fix: an erased person's features are gone for good. Use a live profile id.",
                                    field="profile_id")
            if survivor is None:
                break
            current = survivor
        else:
            raise ProfileNotServed(f"Profile {profile_id!r} leads through more than {MAX_HOPS} merges.", fix="Report this; it is a bug.")
        if not values:
            raise ProfileNotServed(
                f"The online store holds no features for profile {profile_id!r}.",
                fix="Check the id (refinery profiles show ID); a profile newer than the last materialisation is served after the next "
                    "(refinery features materialize).", field="profile_id")
        confirmed = self.state().get("confirmed", {})
        at = time.time() if now is None else now
        out: dict[str, FeatureValue] = {}
        for name, (version, value, as_of, ttl) in sorted(values.items()):
            seen = confirmed.get(name)
            last = max(as_of, float(seen[1])) if seen and int(seen[0]) == version else as_of
            expires = last + ttl if ttl else None
            stale = expires is not None and at > expires
            out[name] = FeatureValue(name, version, None if stale else value, "stale" if stale else "fresh", _iso(as_of), _iso(last),
                                     ttl, None if expires is None else _iso(expires))
        return Lookup(profile_id, current, out)


# --- SQLite ----------------------------------------------------------------------------------------
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS feature_values (profile_id TEXT NOT NULL, feature TEXT NOT NULL, version INTEGER NOT NULL, "
    "value TEXT, as_of REAL NOT NULL, ttl_seconds INTEGER, PRIMARY KEY (profile_id, feature)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS aliases (profile_id TEXT PRIMARY KEY, survivor TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS erased (profile_id TEXT PRIMARY KEY, erased_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)
_READ = ("SELECT 'e', NULL, NULL, NULL, NULL FROM erased WHERE profile_id = ?1 "
         "UNION ALL SELECT 'a', survivor, NULL, NULL, NULL FROM aliases WHERE profile_id = ?1 "
         "UNION ALL SELECT feature, version, value, as_of, ttl_seconds FROM feature_values WHERE profile_id = ?1")


class SqliteStore(OnlineStore):
    """One SQLite file (WAL): a connection per reading thread, one writer at a time."""

    kind = "sqlite"

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.location = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._cons: list[sqlite3.Connection] = []
        con = self._con()
        con.execute("PRAGMA journal_mode=WAL")
        for statement in _SCHEMA:
            con.execute(statement)
        con.commit()

    def _con(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
            self._cons.append(con)
        return con

    def _read(self, profile_id: str) -> tuple[bool, str | None, dict[str, Entry]]:
        erased, survivor, values = False, None, {}
        for kind, a, b, c, d in self._con().execute(_READ, (profile_id,)):
            if kind == "e":
                erased = True
            elif kind == "a":
                survivor = a
            else:
                values[kind] = (a, json.loads(b), c, d)
        return erased, survivor, values

    def _write(self, fn: Any) -> Any:
        with self._lock:
            con = self._con()
            con.execute("BEGIN IMMEDIATE")
            try:
                out = fn(con)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            return out

    def put(self, values: Mapping[str, Mapping[str, Entry]], *, replace: bool, since: float) -> int:
        def write(con: sqlite3.Connection) -> int:
            erased = {r[0] for r in con.execute("SELECT profile_id FROM erased WHERE erased_at >= ?", (since,))}
            keep = [p for p in values if p not in erased]
            if replace:
                con.executemany("DELETE FROM feature_values WHERE profile_id = ?", ((p,) for p in keep))
            rows = [(p, name, v, json.dumps(x), a, t) for p in keep for name, (v, x, a, t) in values[p].items()]
            con.executemany("INSERT OR REPLACE INTO feature_values VALUES (?, ?, ?, ?, ?, ?)", rows)
            return len(rows)

        return int(self._write(write))

    def retain(self, profiles: set[str], features: set[str]) -> int:
        def write(con: sqlite3.Connection) -> int:
            con.execute("CREATE TEMP TABLE IF NOT EXISTS keep_p (profile_id TEXT PRIMARY KEY) WITHOUT ROWID")
            con.execute("CREATE TEMP TABLE IF NOT EXISTS keep_f (feature TEXT PRIMARY KEY) WITHOUT ROWID")
            con.execute("DELETE FROM keep_p")
            con.execute("DELETE FROM keep_f")
            con.executemany("INSERT INTO keep_p VALUES (?)", ((p,) for p in profiles))
            con.executemany("INSERT INTO keep_f VALUES (?)", ((f,) for f in features))
            n = con.execute("DELETE FROM feature_values WHERE profile_id NOT IN (SELECT profile_id FROM keep_p) "
                            "OR feature NOT IN (SELECT feature FROM keep_f)").rowcount
            return int(n)

        return int(self._write(write))

    def set_aliases(self, aliases: Mapping[str, str]) -> None:
        def write(con: sqlite3.Connection) -> None:
            erased = {r[0] for r in con.execute("SELECT profile_id FROM erased")}
            con.execute("DELETE FROM aliases")
            con.executemany("INSERT INTO aliases VALUES (?, ?)",
                            ((a, s) for a, s in aliases.items() if a not in erased and s not in erased))

        self._write(write)

    def erase(self, profile_ids: Iterable[str]) -> int:
        ids = sorted(set(profile_ids))

        def write(con: sqlite3.Connection) -> int:
            n = 0
            at = time.time()
            for p in ids:
                n += con.execute("DELETE FROM feature_values WHERE profile_id = ?", (p,)).rowcount
                con.execute("DELETE FROM aliases WHERE profile_id = ? OR survivor = ?", (p, p))
                con.execute("INSERT OR REPLACE INTO erased VALUES (?, ?)", (p, at))
            return n

        return int(self._write(write))

    def export(self, profile_ids: Iterable[str]) -> list[dict[str, Any]]:
        out = []
        for p in sorted(set(profile_ids)):
            for name, version, value, as_of, ttl in self._con().execute(
                    "SELECT feature, version, value, as_of, ttl_seconds FROM feature_values WHERE profile_id = ? ORDER BY feature", (p,)):
                out.append({"profile_id": p, "feature": name, "version": version, "value": json.loads(value), "as_of": _iso(as_of),
                            "ttl_seconds": ttl})
        return out

    def _load_state(self) -> dict[str, Any]:
        row = self._con().execute("SELECT value FROM state WHERE key = 'materialize'").fetchone()
        return dict(json.loads(row[0])) if row else {}

    def _save_state(self, state: dict[str, Any]) -> None:
        text = json.dumps(state, sort_keys=True)
        self._write(lambda con: con.execute("INSERT OR REPLACE INTO state VALUES ('materialize', ?)", (text,)))

    def count(self) -> int:
        return int(self._con().execute("SELECT count(*) FROM feature_values").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            for con in self._cons:
                con.close()  # check_same_thread=False: any thread may close them
            self._cons = []
        self._local = threading.local()


# --- Redis -----------------------------------------------------------------------------------------
class RedisStore(OnlineStore):
    """Keys under `prefix`: `v:<profile>` a hash of feature -> [version, value, as_of, ttl]; `profiles`
    a set of the profiles held; `alias` and `erased` hashes; `state` the run state as JSON."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "refinery:features:"):
        super().__init__()
        try:
            import redis
        except ImportError as e:  # pragma: no cover - redis is a dependency
            raise ConfigurationError("The Redis online store needs redis-py.", fix="pip install redis") from e
        self.prefix = prefix
        self.client: Any = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)  # str in, str out
        host = self.client.connection_pool.connection_kwargs.get("host", "?")
        port = self.client.connection_pool.connection_kwargs.get("port", "?")
        self.location = f"redis://{host}:{port} ({prefix}*)"  # never the password
        try:
            self.client.ping()
        except redis.RedisError as e:
            raise ConfigurationError(f"The Redis online store at {self.location} cannot be reached: {type(e).__name__}.",
                                     fix="Start Redis or correct features_redis_url (redis://:PASSWORD@HOST:PORT/DB).",
                                     field="features_redis_url") from None

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _read(self, profile_id: str) -> tuple[bool, str | None, dict[str, Entry]]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hexists(self._k("erased"), profile_id)
        pipe.hget(self._k("alias"), profile_id)
        pipe.hgetall(self._k("v", profile_id))
        erased, survivor, raw = pipe.execute()
        values = {name: tuple(json.loads(text)) for name, text in raw.items()}
        return bool(erased), survivor, values

    def put(self, values: Mapping[str, Mapping[str, Entry]], *, replace: bool, since: float) -> int:
        erased = {p for p, at in self.client.hgetall(self._k("erased")).items() if float(at) >= since}
        n = 0
        pipe = self.client.pipeline(transaction=False)
        for i, (p, entries) in enumerate(values.items()):
            if p in erased:
                continue
            if replace:
                pipe.delete(self._k("v", p))
            if entries:
                pipe.hset(self._k("v", p), mapping={name: json.dumps(list(e)) for name, e in entries.items()})
                pipe.sadd(self._k("profiles"), p)
                n += len(entries)
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
        return n

    def retain(self, profiles: set[str], features: set[str]) -> int:
        held = set(self.client.smembers(self._k("profiles")))
        gone = held - profiles
        pipe = self.client.pipeline(transaction=False)
        for p in gone:
            pipe.delete(self._k("v", p))
            pipe.srem(self._k("profiles"), p)
        removed = len(gone)
        old = set(self.state(fresh=True).get("features", {})) - features
        if old:
            for p in held & profiles:
                pipe.hdel(self._k("v", p), *sorted(old))
        pipe.execute()
        return removed

    def set_aliases(self, aliases: Mapping[str, str]) -> None:
        erased = set(self.client.hkeys(self._k("erased")))
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._k("alias"))
        kept = {a: s for a, s in aliases.items() if a not in erased and s not in erased}
        if kept:
            pipe.hset(self._k("alias"), mapping=kept)
        pipe.execute()

    def erase(self, profile_ids: Iterable[str]) -> int:
        ids = sorted(set(profile_ids))
        if not ids:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for p in ids:
            pipe.hlen(self._k("v", p))
        n = sum(int(x) for x in pipe.execute())
        aliases = self.client.hgetall(self._k("alias"))
        at = str(time.time())
        pipe = self.client.pipeline(transaction=True)
        for p in ids:
            pipe.delete(self._k("v", p))
            pipe.srem(self._k("profiles"), p)
            pipe.hset(self._k("erased"), p, at)
        dropped = [a for a, s in aliases.items() if a in ids or s in ids]
        if dropped:
            pipe.hdel(self._k("alias"), *dropped)
        pipe.execute()
        return n

    def export(self, profile_ids: Iterable[str]) -> list[dict[str, Any]]:
        out = []
        for p in sorted(set(profile_ids)):
            for name, text in sorted(self.client.hgetall(self._k("v", p)).items()):
                version, value, as_of, ttl = json.loads(text)
                out.append({"profile_id": p, "feature": name, "version": version, "value": value, "as_of": _iso(as_of),
                            "ttl_seconds": ttl})
        return out

    def _load_state(self) -> dict[str, Any]:
        text = self.client.get(self._k("state"))
        return dict(json.loads(text)) if text else {}

    def _save_state(self, state: dict[str, Any]) -> None:
        self.client.set(self._k("state"), json.dumps(state, sort_keys=True))

    def count(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for p in self.client.smembers(self._k("profiles")):
            pipe.hlen(self._k("v", p))
        return sum(int(x) for x in pipe.execute())

    def close(self) -> None:
        self.client.close()


# --- which store -----------------------------------------------------------------------------------
def open_store(settings: Settings) -> OnlineStore:
    """The online store `settings.features_online_store` names."""
    if settings.features_online_store == "redis":
        if not settings.features_redis_url:
            raise ConfigurationError("features_online_store is 'redis' but features_redis_url is not set.",
                                     fix="Set features_redis_url (redis://:PASSWORD@HOST:PORT/DB) or use the embedded store (sqlite).",
                                     field="features_redis_url")
        return RedisStore(settings.features_redis_url, settings.features_redis_prefix)
    return SqliteStore(settings.features_online_path)


_OPEN: weakref.WeakKeyDictionary[Any, OnlineStore] = weakref.WeakKeyDictionary()
_OPEN_LOCK = threading.Lock()


def store_of(engine: Any, settings: Settings | None = None) -> OnlineStore:
    """The online store of the database `engine` (opened once per engine). Without `settings` (a
    subject request in a process that never served features), the settings are loaded as the process
    would (refinery.toml, environment) for the engine's data dir."""
    with _OPEN_LOCK:
        store = _OPEN.get(engine)
        if store is None:
            if settings is None:
                from refinery.settings import load_settings

                settings = load_settings(data_dir=Path(engine.path).parent)
            store = open_store(settings)
            _OPEN[engine] = store
        return store


def close_store(engine: Any) -> None:
    with _OPEN_LOCK:
        store = _OPEN.pop(engine, None)
    if store is not None:
        store.close()

"""Keys: the master key, the keys derived from it, and the store of per-subject data keys.

- The **master key** (32 random bytes) comes from `REFINERY_MASTER_KEY` (base64) or a key file
  (`master_key_file`, default `<data_dir>/keys/master.key`, mode 0600). It never reaches the
  database or the repository. A fresh installation without one gets one generated; an existing
  vault with a missing or different master key refuses to start (`MasterKeyError`) before any
  data is touched.
- From it, HKDF derives one key per use: the HMAC key of pseudonymisation tokens, the key that
  names subjects, the suppression-list key, and the key-encryption key that wraps data keys.
- Each **subject** (a person's user id, else anonymous id) gets a random 256-bit data key, stored
  wrapped (AES-GCM under the key-encryption key) in the key store: a small SQLite file of its own
  (`key_store_file`, default `<data_dir>/keys/subject-keys.sqlite`), kept apart from the data so
  that backups of the data do not carry the keys. Destroying a subject's key deletes its row:
  every copy of what was sealed with it (raw zone, failed zone, vault, backups) becomes unreadable.

A key is committed to the key store (synchronously) before anything sealed with it is written, so
a data transaction that rolls back can leave an unused key behind but never data without its key.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from refinery.errors import ConfigurationError

MASTER_KEY_ENV = "REFINERY_MASTER_KEY"
_CHECK_PLAINTEXT = b"refinery master key check v1"
_KEY_BYTES = 32
_NONCE_BYTES = 12


class MasterKeyError(ConfigurationError):
    """The master key is missing, malformed, or not the one the vault was created with."""

    code = "master_key_error"


def derive(master: bytes, purpose: str) -> bytes:
    """A 256-bit key for one purpose, derived from the master key (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=b"refinery/" + purpose.encode()).derive(master)


def seal(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    """nonce || ciphertext || tag: AES-GCM with a random 96-bit nonce, bound to `aad`."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + aead.encrypt(nonce, plaintext, aad)


def unseal(aead: AESGCM, sealed: bytes, aad: bytes) -> bytes:
    return aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], aad)


def load_master_key(key_file: Path, *, env: dict[str, str] | None = None, create: bool) -> bytes:
    """The master key from the environment or `key_file`; generated into `key_file` when `create`."""
    environ = os.environ if env is None else env
    if environ.get(MASTER_KEY_ENV):
        return _decode(environ[MASTER_KEY_ENV], MASTER_KEY_ENV)
    if key_file.exists():
        try:
            text = key_file.read_text("ascii").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise MasterKeyError(f"Cannot read the master key file {key_file}: {e}.",
                                 fix="Make the file readable by this user, or set REFINERY_MASTER_KEY.") from e
        return _decode(text, str(key_file))
    if not create:
        raise MasterKeyError(
            f"The master key is missing: {MASTER_KEY_ENV} is not set and {key_file} does not exist, "
            "but this data directory already holds a vault sealed with a master key.",
            fix=f"Restore the key file to {key_file} (or set {MASTER_KEY_ENV} / master_key_file); "
            "without it the personal data in this store cannot be read. Nothing was changed.",
        )
    key = os.urandom(_KEY_BYTES)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(base64.b64encode(key).decode() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def _decode(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError as e:
        raise MasterKeyError(f"The master key in {where} is not base64.",
                             fix="Use 32 random bytes, base64-encoded (e.g. `openssl rand -base64 32`).") from e
    if len(key) != _KEY_BYTES:
        raise MasterKeyError(f"The master key in {where} is {len(key)} bytes long; it must be {_KEY_BYTES}.",
                             fix="Use 32 random bytes, base64-encoded (e.g. `openssl rand -base64 32`).")
    return key


class KeyStore:
    """Per-subject data keys, wrapped by the key-encryption key, in their own SQLite file.

    Thread-safe (one connection behind a lock); unwrapped keys are cached (bounded LRU) as their
    32 bytes. Cipher objects are not cached: one holds ~2.6 KB of OpenSSL state (measured: a million
    would be 2.6 GB) and builds in ~0.7 us, less than a tenth of fetching a key that is not cached.

    A miss costs a B-tree search in the key file (random: key ids are keyed hashes), so misses are
    fetched in one query per call, in key order (neighbouring pages), over a memory map of the file
    (`mmap_bytes`) with a larger page cache (`page_cache_bytes`): ~3 us a key on a 1.5M-key file
    instead of ~6-7 us in chunks of 500 through read calls. A call that misses more keys than a
    quarter of the cache (a bulk reveal: a delivery touching a million people once each) does not
    remember them: they would only push out the keys that are used again (ingestion's people).
    """

    def __init__(self, path: Path, master: bytes, *, cache_size: int = 200_000, mmap_bytes: int = 1 << 30,
                 page_cache_bytes: int = 64 << 20):
        self.path = path
        self._kek = AESGCM(derive(master, "key-encryption"))
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_size = cache_size
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")  # a destroyed key's bytes are overwritten, not just unlinked
        self._db.execute(f"PRAGMA mmap_size={int(mmap_bytes)}")  # reads only: writes still go through the WAL
        self._db.execute(f"PRAGMA cache_size={-(int(page_cache_bytes) >> 10)}")  # negative: KiB
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS subject_keys (key_id TEXT PRIMARY KEY, wrapped BLOB NOT NULL, created_at TEXT NOT NULL)"
        )
        self._check_master()

    @staticmethod
    def holds_keys(path: Path) -> bool:
        """Whether a key store exists at `path` (then its master key must be supplied, never generated)."""
        return path.exists() and path.stat().st_size > 0

    def _check_master(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'check'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('check', ?)", [seal(self._kek, _CHECK_PLAINTEXT, b"check")])
            return
        try:
            unseal(self._kek, bytes(row[0]), b"check")
        except InvalidTag as e:
            raise MasterKeyError(
                f"The master key does not open the key store {self.path}: it is not the key this vault was created with.",
                fix="Supply the original master key (REFINERY_MASTER_KEY or master_key_file). Nothing was changed.",
            ) from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- keys -----------------------------------------------------------------------------
    def get(self, key_ids: Iterable[str], *, create: bool) -> dict[str, AESGCM]:
        """The data keys of `key_ids`; missing ones are created (and committed) when `create`,
        else left out (destroyed or never made)."""
        out: dict[str, AESGCM] = {}
        missing: list[str] = []
        with self._lock:
            for k in key_ids:
                key = self._cache.get(k)
                if key is None:
                    missing.append(k)
                elif k not in out:
                    self._cache.move_to_end(k)
                    out[k] = AESGCM(key)
            if not missing:
                return out
            missing = sorted(set(missing))
            remember = len(missing) <= self._cache_size // 4
            kek, cache = self._kek, self._cache
            rows = self._db.execute("SELECT key_id, wrapped FROM subject_keys WHERE key_id IN (SELECT value FROM json_each(?))",
                                    [json.dumps(missing)])
            for key_id, wrapped in rows:
                key = unseal(kek, wrapped, key_id.encode())
                if remember:
                    cache[key_id] = key
                out[key_id] = AESGCM(key)
            if remember:
                while len(cache) > self._cache_size:
                    cache.popitem(last=False)
            new = [k for k in missing if k not in out]
            if new and create:
                now = datetime.now(UTC).isoformat()
                fresh = {k: os.urandom(_KEY_BYTES) for k in new}
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "INSERT OR IGNORE INTO subject_keys VALUES (?, ?, ?)",
                        [(k, seal(self._kek, key, k.encode()), now) for k, key in fresh.items()],
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                for k, key in fresh.items():
                    out[k] = AESGCM(self._remember(k, key))
        return out

    def _remember(self, key_id: str, key: bytes) -> bytes:
        self._cache[key_id] = key
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return key

    def destroy(self, key_ids: Iterable[str]) -> int:
        """Delete the keys (crypto-shredding); returns how many existed. Committed before returning."""
        ids = list(dict.fromkeys(key_ids))
        destroyed = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    destroyed += self._db.execute(f"DELETE FROM subject_keys WHERE key_id IN ({marks})", chunk).rowcount  # noqa: S608
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            for k in ids:
                self._cache.pop(k, None)
            # The WAL still holds page images with the deleted keys: fold it into the file and empty it.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return destroyed

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM subject_keys").fetchone()[0])

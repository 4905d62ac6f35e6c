"""The import's side of the vault: subject keys, suppression, sealed failures and the sealed raw zone.

Each chunk of rows the import's SELECT yields goes through `ChunkPrivacy` before the writer sees it:

- every row gets the key id of its subject (the user id, else the anonymous id, normalised as
  `tokens.subject_of` does; a row with neither gets a key of its own from its message id);
- rows whose user id, anonymous id, email or phone is on the suppression list (people who were
  erased) are dropped: counted, never stored, not even quarantined;
- the payloads of failed rows are sealed under their row's key (`failed_events.key_id/sealed`);
- the personal values of rows about to be loaded are sealed once per (token, subject key) for
  `vault_values`.

The raw zone of an import (docs/decisions/0016-sealed-import-raw-zone.md) is a Parquet file per
imported file, `<raw_dir>/<sha256>.sealed.parquet`: one record per subject and buffer, holding the
row numbers (clear) and the rows as read from the file (a JSON array of their texts), sealed with
AES-GCM under that subject's data key. Destroying a subject's key makes their rows unreadable and
leaves everyone else's readable.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlglot import exp

from refinery.errors import ImportError_
from refinery.ingest.import_pii import PiiSlot
from refinery.privacy.tokens import normal_id
from refinery.privacy.vault import Vault
from refinery.storage.engine import Engine

RAW_SUFFIX = ".sealed.parquet"
RAW_SCHEMA = pa.schema([
    ("key_id", pa.string()),
    ("row_numbers", pa.list_(pa.int64())),
    ("sealed", pa.binary()),  # AES-GCM under key_id's data key: a JSON array of the rows' texts as read
])
_GROUPS_PER_SLICE = 4_096  # subjects sealed and written at a time
_BUFFER_BYTES = 32 << 20  # compressed rows buffered before they are sealed: one record per subject per buffer
#: Ciphertext does not compress: only the key ids and row numbers are.
_COMPRESSION = {"key_id": "zstd", "row_numbers.list.element": "zstd", "sealed": "none"}
VAULT_SCHEMA = pa.schema([("token", pa.string()), ("key_id", pa.string()), ("kind", pa.string()), ("sealed", pa.binary())])
_MEMO = 200_000
_NONCE = 12  # AES-GCM nonce bytes, as privacy/keys.py seals
_SEAL_BATCH = 4_096


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in large blocks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as e:
        raise ImportError_(f"Cannot read {path.name}: {e.strerror}.", fix=f"Check that {path} is readable.") from e
    return digest.hexdigest()


def raw_path(raw_dir: Path, sha: str) -> Path:
    return raw_dir / f"{sha}{RAW_SUFFIX}"


class Sealer:
    """`Vault.seal_many` for an import's many rows: the same sealed form (nonce || AES-GCM ciphertext
    and tag, bound to the key id), with the nonces drawn at once. Cipher objects live for one call
    only (each holds ~2.4 KB of OpenSSL state); the key store caches the keys themselves (the key
    store creates and commits a key before anything is sealed with it)."""

    def __init__(self, vault: Vault):
        self.vault = vault

    def seal_many(self, key_ids: Sequence[str], plaintexts: Sequence[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for lo in range(0, len(key_ids), _SEAL_BATCH):  # at most _SEAL_BATCH cipher objects alive at once
            ids, texts = key_ids[lo:lo + _SEAL_BATCH], plaintexts[lo:lo + _SEAL_BATCH]
            aead = self.vault.keys.get(dict.fromkeys(ids), create=True)
            nonces = os.urandom(_NONCE * len(ids))
            out.extend(
                nonces[i * _NONCE:(i + 1) * _NONCE] + aead[k].encrypt(nonces[i * _NONCE:(i + 1) * _NONCE], p, k.encode())
                for i, (k, p) in enumerate(zip(ids, texts, strict=True))
            )
            del aead
        return out


@dataclass
class Prepared:
    """A chunk after `ChunkPrivacy.prepare`: its rows, and the vault rows the writer stores with them."""

    rows: pa.Table  # with `_key_id` and `_sealed` (failed rows' payloads) appended
    vault_rows: pa.Table  # sealed personal values of rows certain to load


@dataclass
class ChunkPrivacy:
    """Per-import state: memoised subject keys and suppression checks, the pairs already sealed."""

    vault: Vault
    engine: Engine
    source: str
    file_sha256: str
    slots: list[PiiSlot]
    _keys: dict[str, str | None] = field(default_factory=dict)
    _blocked: dict[tuple[str, str], bool] = field(default_factory=dict)
    _sealed_pairs: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))  # token 0x1f key id
    _known_ids: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    _known_keys: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    sealer: Sealer | None = None

    def __post_init__(self) -> None:
        if self.sealer is None:
            self.sealer = Sealer(self.vault)

    def _key_of(self, value: str) -> str | None:
        key = self._keys.get(value, "")
        if key == "":
            subject = normal_id(value)
            key = None if subject is None else self.vault.key_id(subject)
            if len(self._keys) >= _MEMO:
                self._keys.clear()
            self._keys[value] = key
        return key

    def _keys_of(self, values: pa.Array) -> pa.Array:
        """Key ids of distinct id values: those met before found in Arrow, the new ones computed."""
        known = pc.index_in(values, value_set=self._known_ids) if len(self._known_ids) else pa.nulls(len(values), pa.int32())
        out = pc.take(self._known_keys, known) if len(self._known_ids) else pa.nulls(len(values), pa.string())
        new = np.flatnonzero(~known.is_valid().to_numpy(zero_copy_only=False))
        if len(new):
            fresh_ids = pc.take(values, pa.array(new))
            fresh_keys = pa.array([self._key_of(v) for v in fresh_ids.to_pylist()], pa.string())
            if len(self._known_ids) + len(new) > _MEMO * 10:
                self._known_ids, self._known_keys = pa.array([], pa.string()), pa.array([], pa.string())
            self._known_ids = pa.concat_arrays([self._known_ids, fresh_ids.cast(pa.string())])
            self._known_keys = pa.concat_arrays([self._known_keys, fresh_keys])
            self._keys.clear()
            merged = out.to_pylist()
            for i, k in zip(new.tolist(), fresh_keys.to_pylist(), strict=True):
                merged[i] = k
            out = pa.array(merged, pa.string())
        return out

    def key_ids(self, rows: pa.Table) -> pa.Array:
        """Each row's key id: its subject's, else one of its own (source + message id or row number)."""
        out: pa.Array | None = None
        for name in ("user_id", "anonymous_id"):
            col = rows.column(name).combine_chunks()
            if col.null_count == len(col):
                continue
            enc = pc.dictionary_encode(col)
            these = pc.take(self._keys_of(enc.dictionary), enc.indices)
            out = these if out is None else pc.coalesce(out, these)
        if out is None:
            out = pa.nulls(rows.num_rows, pa.string())
        if out.null_count:
            keys_list = out.to_pylist()
            mids = rows.column("message_id").to_pylist()
            numbers = rows.column("row_number").to_pylist()
            for i, k in enumerate(keys_list):
                if k is None:
                    keys_list[i] = self.vault.event_key_id(self.source, mids[i] or f"file:{self.file_sha256}:{numbers[i]}")
            out = pa.array(keys_list, pa.string())
        return out

    def _is_blocked(self, kind: str, normal: str) -> bool:
        hit = self._blocked.get((kind, normal))
        if hit is None:
            hit = self.vault.suppressed_identifier(kind, normal)
            if len(self._blocked) >= _MEMO:
                self._blocked.clear()
            self._blocked[(kind, normal)] = hit
        return hit

    def suppressed(self, rows: pa.Table) -> np.ndarray:
        """Rows whose user id, anonymous id, email or phone is on the suppression list."""
        mask = np.zeros(rows.num_rows, bool)
        if not self.vault.suppressed:
            return mask
        columns: list[tuple[str, str, bool]] = [("user_id", "user_id", True), ("anonymous_id", "anonymous_id", True)]
        columns += [(f"_pn{j}", s.kind, False) for j, s in enumerate(self.slots) if s.kind in ("email", "phone")]
        for name, kind, is_id in columns:
            col = rows.column(name).combine_chunks()
            if col.null_count == len(col):
                continue
            enc = pc.dictionary_encode(col)
            flags = []
            for v in enc.dictionary.to_pylist():
                normal = normal_id(v) if is_id else v
                flags.append(normal is not None and self._is_blocked(kind, normal))
            hit = pc.take(pa.array(flags, pa.bool_()), enc.indices)
            mask |= pc.fill_null(hit, False).to_numpy(zero_copy_only=False)
        return mask

    def prepare(self, rows: pa.Table, loads: np.ndarray) -> Prepared:
        """Give each row its key id, seal failed payloads, and seal the personal values of the rows
        in `loads` (rows that will certainly be loaded) not sealed yet."""
        keys = self.key_ids(rows)
        rows = rows.append_column("_key_id", keys).append_column("_sealed", self._seal_failed(rows, keys))
        return Prepared(rows, self._vault_rows(rows, loads))

    def _seal_failed(self, rows: pa.Table, keys: pa.Array) -> pa.Array:
        reason = rows.column("_reason")
        failing = pc.and_(reason.is_valid(), pc.not_equal(pc.fill_null(reason, ""), "blank_line"))
        fail = pc.fill_null(failing, False).to_numpy(zero_copy_only=False)
        sealed: list[bytes | None] = [None] * rows.num_rows
        idx = np.flatnonzero(fail & rows.column("payload").is_valid().to_numpy(zero_copy_only=False))
        if len(idx):
            payloads = pc.take(rows.column("payload"), pa.array(idx)).to_pylist()
            key_list = pc.take(keys, pa.array(idx)).to_pylist()
            plain = [p.encode() for p in payloads]
            assert self.sealer is not None
            for i, s in zip(idx, self.sealer.seal_many(key_list, plain), strict=True):
                sealed[i] = s
        return pa.array(sealed, pa.binary())

    def pairs(self, engine: Engine, rows: pa.Table, mask: np.ndarray, *, cursor: Any = None) -> pa.Table:
        """Distinct (token, key_id, kind, normal) of the personal values in the rows of `mask` (in DuckDB,
        on `cursor`)."""
        cols = ["_key_id", *[f"_{p}{j}" for j in range(len(self.slots)) for p in ("pt", "pn")]]
        engine.register("_imp_pairs", rows.select(cols).filter(pa.array(mask)), cursor=cursor)
        try:
            return engine.fetch_arrow(self._pairs_sql, cursor=cursor)
        finally:
            engine.unregister("_imp_pairs", cursor=cursor)

    @property
    def _pairs_sql(self) -> exp.Expression:
        selects = [
            exp.select(exp.column(f"_pt{j}").as_("token"), exp.column("_key_id").as_("key_id"),
                       exp.Literal.string(slot.kind).as_("kind"), exp.column(f"_pn{j}").as_("normal"))
            .from_("_imp_pairs").where(exp.column(f"_pt{j}").is_(exp.null()).not_())
            for j, slot in enumerate(self.slots)
        ]
        union: exp.Query = selects[0]
        for sel in selects[1:]:
            union = exp.union(union, sel, distinct=False)
        return exp.select("token", "key_id", "kind", "normal").from_(union.subquery("_p")).distinct()

    def _vault_rows(self, rows: pa.Table, loads: np.ndarray) -> pa.Table:
        if not self.slots or not loads.any():
            return VAULT_SCHEMA.empty_table()
        # All in Arrow: each (token, key id) pair of the rows in `loads` as one string; pairs this
        # import sealed already are dropped before anything reaches Python, then the rest made distinct.
        mask = pa.array(loads)
        keys = pc.filter(rows.column("_key_id"), mask)
        parts: dict[str, list[pa.Array]] = {"pair": [], "token": [], "key_id": [], "kind": [], "normal": []}
        for j, slot in enumerate(self.slots):
            token = pc.filter(rows.column(f"_pt{j}"), mask)
            if token.null_count == len(token):
                continue
            present = token.is_valid()
            token, key, normal = pc.filter(token, present), pc.filter(keys, present), pc.filter(pc.filter(rows.column(f"_pn{j}"), mask), present)
            pair = pc.binary_join_element_wise(token, key, "\x1f")
            if len(self._sealed_pairs):
                new = pc.invert(pc.is_in(pair, value_set=self._sealed_pairs))
                token, key, normal, pair = (pc.filter(c, new) for c in (token, key, normal, pair))
            if len(pair):
                for name, col in (("pair", pair), ("token", token), ("key_id", key), ("normal", normal)):
                    parts[name].append(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
                parts["kind"].append(pa.array([slot.kind] * len(pair), pa.string()))
        if not parts["pair"]:
            return VAULT_SCHEMA.empty_table()
        pair = pa.concat_arrays(parts["pair"])
        first = pc.index_in(pc.unique(pair), value_set=pair)  # the first row of each distinct pair
        cols = {name: pc.take(pa.concat_arrays(parts[name]), first) for name in ("token", "key_id", "kind", "normal")}
        assert self.sealer is not None
        sealed = self.sealer.seal_many(cols["key_id"].to_pylist(), [n.encode() for n in cols["normal"].to_pylist()])
        if len(self._sealed_pairs) > _MEMO * 10:
            self._sealed_pairs = pa.array([], pa.string())
        self._sealed_pairs = pa.concat_arrays([self._sealed_pairs, pc.take(pair, first)])
        return pa.table({"token": cols["token"], "key_id": cols["key_id"], "kind": cols["kind"],
                         "sealed": pa.array(sealed, pa.binary())}, schema=VAULT_SCHEMA)


# --- the sealed raw zone -------------------------------------------------------------------------

_BUFFER_SCHEMA = pa.schema([("key_id", pa.string()), ("row_number", pa.int64()), ("orig", pa.string())])
_BUCKETS = 16
_HEX = "0123456789abcdef"


def _bucket(head: str | None) -> int:
    """The part a key id's rows wait in: from two hex digits of its MAC (any other text still lands somewhere)."""
    text = head or ""
    if len(text) == 2 and text[0] in _HEX and text[1] in _HEX:
        return int(text, 16) % _BUCKETS
    return sum(map(ord, text)) % _BUCKETS


class _Part:
    """One part of the raw zone's buffer: Arrow IPC batches compressed with zstd, in memory."""

    _OPTIONS = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=1), use_threads=False)

    def __init__(self) -> None:
        self._sink: pa.BufferOutputStream | None = None
        self._writer: Any = None

    def write(self, rows: pa.Table) -> None:
        if self._writer is None:
            self._sink = pa.BufferOutputStream()
            self._writer = pa.ipc.new_stream(self._sink, _BUFFER_SCHEMA, options=self._OPTIONS)
        self._writer.write_table(rows)

    def size(self) -> int:
        return 0 if self._sink is None else int(self._sink.tell())

    def read(self) -> pa.Table | None:
        """The part's rows (and the part is emptied)."""
        if self._writer is None or self._sink is None:
            return None
        self._writer.close()
        buf = self._sink.getvalue()
        self._sink = self._writer = None
        return pa.ipc.open_stream(buf, options=pa.ipc.IpcReadOptions(use_threads=False)).read_all()


class SealedRawWriter:
    """Writes one import's rows, sealed per subject, to a temporary file; `commit` moves it to its
    content-addressed place (read-only), `abort` removes it.

    Rows wait in memory until they are sealed, compressed (zstd, ~10x on rows as JSON) and split
    into `_BUCKETS` parts by their key id, so a buffer of `_BUFFER_BYTES` holds ten times the rows
    (a subject spread through the file gets ten times fewer records and seals) and is sealed one
    part at a time (what is clear and uncompressed at once is a part, not the buffer). Nothing
    of it reaches the disk before it is sealed."""

    def __init__(self, vault: Vault, final: Path, sealer: Sealer | None = None):
        self.vault = vault
        self.sealer = sealer or Sealer(vault)
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = final.parent / f".incoming-{uuid.uuid4().hex}{RAW_SUFFIX}"
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0
        self._parts: list[_Part] = []
        self._buffered = 0
        self.flushes = 0

    def add(self, rows: pa.Table) -> None:
        """Buffer the chunk's rows (`row_number`, `_key_id`, `_orig`), compressed, by part; sealed
        per subject when the buffer is full (one record per subject per buffer) and at `commit`."""
        if rows.num_rows == 0:
            return
        part = pa.table([rows.column(c).cast(t.type) for c, t in zip(("_key_id", "row_number", "_orig"), _BUFFER_SCHEMA, strict=True)],
                        schema=_BUFFER_SCHEMA)
        keys = part.column("key_id").combine_chunks()
        head = pc.dictionary_encode(pc.utf8_slice_codeunits(keys, 3, 5))  # two hex digits of the key id's MAC
        bucket_of = pa.array([_bucket(h) for h in head.dictionary.to_pylist()], pa.int32())
        buckets = pc.take(bucket_of, head.indices).to_numpy(zero_copy_only=False)
        order = np.argsort(buckets, kind="stable")
        bounds = np.searchsorted(buckets[order], np.arange(_BUCKETS + 1))
        part = part.take(pa.array(order))
        if not self._parts:
            self._parts = [_Part() for _ in range(_BUCKETS)]
        for b in range(_BUCKETS):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            if hi > lo:
                self._parts[b].write(part.slice(lo, hi - lo))
        self._buffered = sum(p.size() for p in self._parts)
        if self._buffered >= _BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        parts, self._parts, self._buffered = self._parts, [], 0
        if parts:
            self.flushes += 1
        for part in parts:
            rows = part.read()
            if rows is not None:
                self._seal_and_write(rows)

    def _seal_and_write(self, rows: pa.Table) -> None:
        # One record per subject: sort by (key id, row number), cut where the key changes, and join
        # each run of rows into a JSON array, all in Arrow; Python only seals.
        enc = pc.dictionary_encode(rows.column("key_id").combine_chunks())
        order = pa.array(np.lexsort((rows.column("row_number").to_numpy(), enc.indices.to_numpy(zero_copy_only=False))))
        keys = pc.take(rows.column("key_id"), order).combine_chunks()
        numbers = pc.take(rows.column("row_number"), order).combine_chunks()
        texts = pc.take(rows.column("orig"), order).combine_chunks()
        del rows, enc, order
        changed = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)).to_numpy(zero_copy_only=False)
        starts = np.concatenate(([0], np.flatnonzero(changed) + 1)).astype(np.int32)
        # In slices of whole groups, so the plaintexts in memory at once stay small.
        for lo in range(0, len(starts), _GROUPS_PER_SLICE):
            first, last = int(starts[lo]), int(starts[lo + _GROUPS_PER_SLICE]) if lo + _GROUPS_PER_SLICE < len(starts) else len(keys)
            cut = starts[lo:lo + _GROUPS_PER_SLICE] - first
            offsets = pa.array(np.append(cut, last - first).astype(np.int32))
            joined = pc.binary_join(pa.ListArray.from_arrays(offsets, texts.slice(first, last - first)), ",")
            plain = pc.binary_join_element_wise("[", joined, "]", "").cast(pa.binary())
            key_ids = pc.take(keys, pa.array(starts[lo:lo + _GROUPS_PER_SLICE]))
            sealed = self.sealer.seal_many(key_ids.to_pylist(), plain.to_pylist())
            del joined, plain
            table = pa.table({"key_id": key_ids, "row_numbers": pa.ListArray.from_arrays(offsets, numbers.slice(first, last - first)),
                              "sealed": pa.array(sealed, pa.binary())}, schema=RAW_SCHEMA)
            del sealed
            if self._writer is None:
                self._writer = pq.ParquetWriter(str(self.tmp), RAW_SCHEMA, compression=_COMPRESSION, write_statistics=["key_id"])
            self._writer.write_table(table)
        self.rows += len(keys)

    def commit(self) -> Path:
        self._flush()
        if self._writer is None:  # no rows at all: an empty file still says the import was stored
            self._writer = pq.ParquetWriter(str(self.tmp), RAW_SCHEMA, compression=_COMPRESSION)
        self._writer.close()
        self._writer = None
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.final.exists():
            self.tmp.unlink()
        else:
            os.chmod(self.tmp, 0o444)
            os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        self._parts, self._buffered = [], 0
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
        self.tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class RawRow:
    row_number: int
    key_id: str
    #: The row as read: an object of the columns (CSV, Parquet) or the line's text (JSON lines);
    #: None when its subject's key was destroyed (the person was erased).
    value: Any
    readable: bool


def read_sealed_rows(vault: Vault, path: Path) -> Iterator[RawRow]:
    """The rows of a sealed raw file, in file order per subject record; erased subjects' rows have no text."""
    table = pq.read_table(path, schema=RAW_SCHEMA)
    key_ids: list[Any] = table.column("key_id").to_pylist()
    plains = vault.unseal_many(key_ids, table.column("sealed").to_pylist())
    for key_id, numbers, plain in zip(key_ids, table.column("row_numbers").to_pylist(), plains, strict=True):
        values: list[Any] = orjson.loads(plain) if plain is not None else [None] * len(numbers)
        for n, v in zip(numbers, values, strict=True):
            yield RawRow(int(n), str(key_id), v, plain is not None)

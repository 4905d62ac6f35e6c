"""The sealed raw zone's writer on its own: rows buffered compressed in parts, sealed per subject per
buffer, read back as written; destroying one subject's key makes only their rows unreadable."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.ingest import import_vault
from refinery.ingest.import_vault import SealedRawWriter, _bucket, read_sealed_rows
from refinery.runtime import Runtime


def _chunk(runtime: Runtime, numbers: range, people: int) -> pa.Table:
    subjects = [f"person-{n % people}" for n in numbers]
    return pa.table({
        "_key_id": pa.array([runtime.vault.key_id(s) for s in subjects], pa.string()),
        "row_number": pa.array(list(numbers), pa.int64()),
        "_orig": pa.array([json.dumps({"who": s, "email": f"{s}@mail.example", "n": n}) for s, n in zip(subjects, numbers, strict=True)],
                          pa.string()),
        "_reason": pa.nulls(len(numbers), pa.string()),
    })


@pytest.mark.parametrize("buffer_bytes", [1 << 30, 2_000])
def test_rows_read_back_as_written_whatever_the_buffer(runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       buffer_bytes: int) -> None:
    monkeypatch.setattr(import_vault, "_BUFFER_BYTES", buffer_bytes)
    final = tmp_path / "raw" / "f.sealed.parquet"
    writer = SealedRawWriter(runtime.vault, final)
    people, step = 37, 250
    for lo in range(2, 2_002, step):
        writer.add(_chunk(runtime, range(lo, lo + step), people))
    assert writer.commit() == final
    assert writer.rows == 2_000
    # one buffer: one record per person; a tiny buffer: sealed at every chunk, so one per person per chunk
    records = pq.read_table(final)
    assert records.num_rows == (people if buffer_bytes > 1 << 20 else people * 8)
    assert (writer.flushes == 1) == (buffer_bytes > 1 << 20)
    got = {r.row_number: r for r in read_sealed_rows(runtime.vault, final)}
    assert sorted(got) == list(range(2, 2_002))
    for n, r in got.items():
        assert r.readable and r.value == {"who": f"person-{n % people}", "email": f"person-{n % people}@mail.example", "n": n}
        assert r.key_id == runtime.vault.key_id(f"person-{n % people}")
    assert b"mail.example" not in final.read_bytes()  # sealed, not in clear (the parts were compressed, never written)

    runtime.vault.destroy([runtime.vault.key_id("person-5")])
    after = {r.row_number: r for r in read_sealed_rows(runtime.vault, final)}
    assert {n for n, r in after.items() if not r.readable} == {n for n in range(2, 2_002) if n % people == 5}
    assert all(after[n].value == got[n].value for n in after if n % people != 5)


def test_an_aborted_writer_leaves_nothing(runtime: Runtime, tmp_path: Path) -> None:
    final = tmp_path / "raw" / "f.sealed.parquet"
    writer = SealedRawWriter(runtime.vault, final)
    writer.add(_chunk(runtime, range(2, 50), 5))
    writer.abort()
    assert not final.exists() and list(final.parent.iterdir()) == []


def test_every_key_id_has_a_part() -> None:
    parts = {_bucket(h) for h in ("00", "0f", "ff", "a7", "zz", "", None, "é")}
    assert parts <= set(range(import_vault._BUCKETS))
    assert len({_bucket(f"{i:02x}") for i in range(256)}) == import_vault._BUCKETS

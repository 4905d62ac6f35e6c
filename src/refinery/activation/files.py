"""The files destination: each batch becomes one CSV, JSON lines or Parquet file in a folder.

The file is named by the batch id and written atomically (a temporary file in the same folder,
flushed to disk, then renamed over the final name), so a reader never sees half a file and a
repeated batch replaces its own file with the same rows: idempotent by construction.

Rows: `action` (add or remove), `profile_id`, then the mapped fields. JSON lines keep the fields
nested (`{"action": ..., "profile_id": ..., "fields": {...}}`); CSV and Parquet get one column per
field (a field named like `action` or `profile_id` becomes `field_action`), nested values as JSON.

A relative `folder` is under `<data_dir>/exports/`; an absolute one is used as it is.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import uuid
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, field_validator

from refinery.activation.destination import (
    Batch,
    DestinationContext,
    DestinationType,
    TerminalDeliveryError,
    TransientDeliveryError,
    field_text,
    register,
)

FileFormat = Literal["csv", "jsonl", "parquet"]
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")
_BASE_COLUMNS = ("action", "profile_id")


class FilesConfig(BaseModel):
    """Configuration of a files destination."""

    model_config = {"extra": "forbid"}

    folder: str = Field(
        description="Folder the files are written to: relative paths are under <data_dir>/exports/, absolute "
        "paths are used as they are. Created when missing."
    )
    format: FileFormat = Field("jsonl", description="File format: csv, jsonl (JSON lines) or parquet.")

    @field_validator("folder")
    @classmethod
    def _no_escape(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("folder is empty. Fix: name a folder, e.g. exports/vip.")
        if not os.path.isabs(value) and ".." in Path(value).parts:
            raise ValueError(f"folder {value!r} climbs out of <data_dir>/exports with '..'. Fix: use a plain relative or an absolute path.")
        return value


def resolve_folder(folder: str, context: DestinationContext) -> Path:
    path = Path(folder)
    return path if path.is_absolute() else context.data_dir / "exports" / path


def file_stem(batch_id: str) -> str:
    """The batch id when it is a safe file name, else a digest of it (stable across attempts)."""
    if _SAFE_NAME.fullmatch(batch_id):
        return batch_id
    return "batch-" + hashlib.sha256(batch_id.encode()).hexdigest()[:32]


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delivery_error(exc: OSError, where: Path) -> TransientDeliveryError | TerminalDeliveryError:
    """A permission problem needs an operator; anything else (a full disk, a lost mount) may pass."""
    if isinstance(exc, PermissionError):
        return TerminalDeliveryError(
            f"Cannot write to {where}: permission denied.",
            field="folder",
            fix="Give Refinery's user write access to the folder, or choose another folder; then replay the dead letter.",
        )
    return TransientDeliveryError(f"Cannot write to {where}: {exc.strerror or exc}.")



def _columns(batch: Batch) -> list[str]:
    seen: dict[str, None] = {}
    for record in batch.records:
        for name in record.fields:
            seen.setdefault(name, None)
    return list(seen)


def _column_name(field: str) -> str:
    return f"field_{field}" if field in _BASE_COLUMNS else field


def encode_csv(batch: Batch) -> bytes:
    fields = _columns(batch)
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*_BASE_COLUMNS, *(_column_name(f) for f in fields)])
    for r in batch.records:
        writer.writerow([r.action, r.profile_id, *((field_text(r.fields.get(f)) or "") for f in fields)])
    return out.getvalue().encode()


def encode_jsonl(batch: Batch) -> bytes:
    return b"".join(
        orjson.dumps({"action": r.action, "profile_id": r.profile_id, "fields": dict(r.fields)}, default=str) + b"\n"
        for r in batch.records
    )


def _arrow_column(values: list[Any]) -> Any:
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pa.array([field_text(v) for v in values], type=pa.string())


def encode_parquet(batch: Batch) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = _columns(batch)
    columns: dict[str, Any] = {
        "action": pa.array([r.action for r in batch.records], type=pa.string()),
        "profile_id": pa.array([r.profile_id for r in batch.records], type=pa.string()),
    }
    for f in fields:
        columns[_column_name(f)] = _arrow_column([r.fields.get(f) for r in batch.records])
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()


ENCODERS = {"csv": encode_csv, "jsonl": encode_jsonl, "parquet": encode_parquet}


class FilesDestination:
    def __init__(self, config: FilesConfig, context: DestinationContext) -> None:
        self.folder = resolve_folder(config.folder, context)
        self.format: FileFormat = config.format

    def path_of(self, batch_id: str) -> Path:
        return self.folder / f"{file_stem(batch_id)}.{self.format}"

    def deliver(self, batch: Batch) -> None:
        path = self.path_of(batch.id)
        data = ENCODERS[self.format](batch)
        try:
            write_atomically(path, data)
        except OSError as exc:
            raise delivery_error(exc, path) from None

    def close(self) -> None:
        pass


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a file this destination wrote (for tests and the demo)."""
    if path.suffix == ".jsonl":
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


FILES = register(
    DestinationType(
        kind="files",
        config_model=FilesConfig,
        factory=FilesDestination,
        description="Write each batch as one CSV, JSON lines or Parquet file named by its batch id (atomic).",
    )
)

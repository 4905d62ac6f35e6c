"""Shared CLI plumbing: settings from flags, output as tables or JSON, errors as friendly messages."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from refinery.client import Client, connect
from refinery.errors import RefineryError
from refinery.settings import Settings, load_settings

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")
C = TypeVar("C")

DataDirOption = typer.Option(None, "--data-dir", "-d", help="Data folder (default ./refinery-data, or REFINERY_DATA_DIR).")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


def settings_from(data_dir: Path | None, **overrides: Any) -> Settings:
    return load_settings(data_dir=data_dir, **overrides)


def _default(o: Any) -> Any:
    if isinstance(o, (datetime, date)):
        return o.isoformat()
    if isinstance(o, Decimal):
        return float(o)
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    return str(o)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=_default, indent=2, ensure_ascii=False) + "\n")


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None, title: str | None = None) -> None:
    columns = columns or (list(rows[0].keys()) if rows else [])
    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(_default(r.get(c)) if not isinstance(r.get(c), (str, int, float, bool)) else r.get(c)) for c in columns))
    console.print(table)


def fail(e: RefineryError) -> None:
    err_console.print(f"[bold red]Error:[/] {e.message}")
    caret = e.details.get("caret") or getattr(e, "caret", None)
    if isinstance(caret, str) and caret:  # a rule's line with a caret under the fault (segments)
        err_console.print(caret, markup=False, highlight=False, soft_wrap=True)
    if e.fix:
        err_console.print(f"[yellow]Fix:[/] {e.fix}")
    raise typer.Exit(2)


@contextmanager
def connected(connect_fn: Callable[[Settings], AbstractContextManager[C]], data_dir: Path | None) -> Iterator[C]:
    """A client from `connect_fn` (in process, or the running server's admin API); errors printed with their fix."""
    try:
        with connect_fn(settings_from(data_dir)) as c:
            yield c
    except RefineryError as e:
        fail(e)


@contextmanager
def client(data_dir: Path | None) -> Iterator[Client]:
    with connected(connect, data_dir) as c:
        yield c


def run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RefineryError as e:
        fail(e)
        raise  # unreachable

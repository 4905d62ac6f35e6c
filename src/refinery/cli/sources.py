"""`refinery sources`: the producers of events and their write keys."""

from __future__ import annotations

from pathlib import Path

import typer

from refinery.cli.common import DataDirOption, JsonOption, client, console, print_json, print_table

app = typer.Typer(
    help=(
        "Create and manage sources: each producer of events (a website, an app, a CRM export) has its "
        "own write key, tracking-plan mode and rate limit.\n\n"
        "Start with: refinery sources create web"
    ),
    no_args_is_help=True,
)


@app.command("create")
def create(
    name: str = typer.Argument(..., help="Lower-case name, e.g. 'web', 'ios', 'crm'."),
    kind: str = typer.Option("collector", help="'collector' (gets a write key for the SDKs) or 'import' (batch files)."),
    write_key: str = typer.Option(None, help="Use this write key instead of generating one (e.g. when moving from Segment)."),
    unplanned: str = typer.Option(None, "--unplanned", help="'accept' or 'quarantine' events without a tracking plan."),
    rate_limit: float = typer.Option(None, help="Events per second allowed for this source (default: server setting)."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Create a source and print its write key (shown once; only its hash is stored).

    Point an SDK at Refinery with it, e.g. analytics-python:
      analytics.write_key = KEY; analytics.host = "http://127.0.0.1:8088"

    Examples:
      refinery sources create web
      refinery sources create ios --unplanned quarantine --rate-limit 500
      refinery sources create crm --kind import
      refinery sources create web --write-key "$SEGMENT_WRITE_KEY" --json
    """
    with client(data_dir) as c:
        src = c.create_source(name=name, kind=kind, write_key=write_key, unplanned_events=unplanned, rate_limit_per_second=rate_limit)
    if as_json:
        print_json(src)
        return
    console.print(f"Created source [bold]{src['name']}[/] ({src['kind']}).")
    if src.get("write_key"):
        console.print(f"Write key: [bold green]{src['write_key']}[/]  (store it now; it is not shown again)")


@app.command("list")
def list_(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """List sources with their state, key prefix, plan mode and rate limit (keys are never shown).

    Examples:
      refinery sources list
      refinery sources list --json
    """
    with client(data_dir) as c:
        rows = c.sources()
    if as_json:
        print_json(rows)
    else:
        print_table(rows, ["name", "kind", "enabled", "write_key_prefix", "unplanned_events", "rate_limit_per_second", "created_at"])


def _set(name: str, data_dir: Path | None, as_json: bool, **fields: object) -> None:
    with client(data_dir) as c:
        src = c.update_source(name, **fields)
    if as_json:
        print_json(src)
    else:
        console.print(f"Source [bold]{name}[/]: " + ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None))


@app.command("disable")
def disable(name: str = typer.Argument(..., help="The source to disable."), data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Refuse events for a source (its SDKs get 403 until it is enabled again).

    Example:
      refinery sources disable web
    """
    _set(name, data_dir, as_json, enabled=False)


@app.command("enable")
def enable(name: str = typer.Argument(..., help="The source to enable."), data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Accept events for a source again.

    Example:
      refinery sources enable web
    """
    _set(name, data_dir, as_json, enabled=True)


@app.command("set")
def set_(
    name: str = typer.Argument(..., help="The source to change."),
    unplanned: str = typer.Option(None, "--unplanned", help="'accept' or 'quarantine' track events without a tracking plan."),
    rate_limit: float = typer.Option(None, help="Events per second (0 disables the limit)."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Change a source's tracking-plan mode or rate limit.

    With --unplanned quarantine, track events with no plan file are quarantined as
    unplanned_event (replay them after adding a plan or switching back to accept).

    Examples:
      refinery sources set web --unplanned quarantine
      refinery sources set web --rate-limit 0
    """
    if unplanned is not None and unplanned not in ("accept", "quarantine"):
        raise typer.BadParameter(f"{unplanned!r} is not a mode; use 'accept' or 'quarantine'.", param_hint="--unplanned")
    if unplanned is None and rate_limit is None:
        raise typer.BadParameter("Nothing to change: pass --unplanned and/or --rate-limit.")
    _set(name, data_dir, as_json, unplanned_events=unplanned, rate_limit_per_second=rate_limit)

"""`refinery events`: the failed zone, and replaying it after a fix."""

from __future__ import annotations

from pathlib import Path

import typer

from refinery.cli.common import DataDirOption, JsonOption, client, console, print_json, print_table

app = typer.Typer(help="Inspect quarantined events and replay them after fixing a plan or mapping.", no_args_is_help=True)


@app.command("failed")
def failed(
    source: str = typer.Option(None, help="Only this source."),
    reason: str = typer.Option(None, help="Only this reason code, e.g. plan_violation."),
    all_: bool = typer.Option(False, "--all", help="Include events already replayed."),
    limit: int = typer.Option(50, help="Most rows to show."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """List failed events, newest first, with the reason and the field at fault."""
    with client(data_dir) as c:
        rows = c.failed(source=source, reason=reason, pending_only=not all_, limit=limit)
    if as_json:
        print_json(rows)
    else:
        print_table(rows, ["failure_id", "source", "stage", "reason", "field", "message", "file", "row_number", "replay_status"])


@app.command("replay")
def replay(
    source: str = typer.Option(None, help="Only this source."),
    reason: str = typer.Option(None, help="Only this reason code."),
    limit: int = typer.Option(None, help="Most events to replay."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Re-run pending failed events through plans and cleaning (after you fixed the cause).

    Events that now pass are loaded once (never duplicated); those that fail again stay in the
    failed zone with their new reason.
    """
    with client(data_dir) as c:
        result = c.replay(source=source, reason=reason, limit=limit)
    if as_json:
        print_json(result)
        return
    console.print(
        f"Replayed {result['considered']}: [green]{result['loaded']} loaded[/], {result['duplicate']} already clean, "
        f"[red]{result['failed_again']} failed again[/]."
    )
    for code, n in sorted(result.get("reasons", {}).items()):
        console.print(f"  {code}: {n}")

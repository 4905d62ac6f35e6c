"""`refinery events`: the failed zone, and replaying it after a fix."""

from __future__ import annotations

from pathlib import Path

import typer

from refinery.cli.common import DataDirOption, JsonOption, client, console, print_json, print_table

app = typer.Typer(
    help=(
        "Inspect quarantined events and replay them after fixing a plan, a source setting or a mapping.\n\n"
        "Typical loop: refinery events failed -> fix the cause -> refinery events replay."
    ),
    no_args_is_help=True,
)


@app.command("failed")
def failed(
    source: str = typer.Option(None, help="Only this source."),
    reason: str = typer.Option(None, help="Only this reason code, e.g. plan_violation, invalid_timestamp, unplanned_event."),
    all_: bool = typer.Option(False, "--all", help="Include events already replayed (loaded or duplicate)."),
    limit: int = typer.Option(50, help="Most rows to show."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """List failed events, newest first, with the reason, the field at fault (a JSON pointer) and the fix.

    Examples:
      refinery events failed
      refinery events failed --source web --reason plan_violation
      refinery events failed --all --json | jq '.[0].message'
    """
    with client(data_dir) as c:
        rows = c.failed(source=source, reason=reason, pending_only=not all_, limit=limit)
    if as_json:
        print_json(rows)
    elif not rows:
        console.print("No failed events" + (" pending replay." if not all_ else "."))
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
    """Re-run pending failed events through plans and cleaning, after you fixed the cause.

    Each event that now passes is loaded once (never twice, however often you replay); one
    whose messageId is already clean is marked duplicate; one that fails again stays in the
    failed zone with its new reason and a higher replay_count. Talks to the running server
    if there is one.

    Examples:
      refinery events replay
      refinery events replay --reason plan_violation --source web
      refinery events replay --limit 1000 --json
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
        console.print(f"  {code}: {n}  (see: refinery events failed --reason {code})")
    if result.get("not_replayable"):
        console.print(f"{result['not_replayable']} failed rows kept no payload or messageId and cannot be replayed.")

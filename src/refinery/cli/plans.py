"""`refinery plans`: the tracking plans folder, listed and checked (no server needed)."""

from __future__ import annotations

from pathlib import Path

import typer

from refinery.cli.common import (
    DataDirOption,
    JsonOption,
    console,
    print_json,
    print_table,
    run,
    settings_from,
)
from refinery.errors import ConfigurationError
from refinery.ingest.plans import TrackingPlans

app = typer.Typer(
    help=(
        "Tracking plans: one JSON Schema per event name, in <data_dir>/tracking-plans/<event>.json.\n\n"
        "The running server re-reads the folder within a second of a change; events that break a plan "
        "are quarantined with the JSON pointer of the bad value. See docs/tracking-plans.md."
    ),
    no_args_is_help=True,
)


def _plans(data_dir: Path | None) -> TrackingPlans:
    settings = run(lambda: settings_from(data_dir))
    return TrackingPlans(settings.plans_dir, default_mode=settings.unplanned_events)


@app.command("list")
def list_(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """List plan files with the event each governs and whether it loads.

    Status: ok; stale (broken now, the last good version is in force in a running server);
    invalid (never loaded: its events are quarantined as plan_invalid).

    Examples:
      refinery plans list
      refinery plans list --json | jq '.[] | select(.status != "ok")'
    """
    plans = _plans(data_dir)
    rows = [f.to_dict() for f in plans.files()]
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print(f"No plans in {plans.folder}. Add one, e.g. {plans.folder}/Order Completed.json")
        return
    print_table(rows, ["event", "status", "file", "error"], title=f"Tracking plans in {plans.folder}")


@app.command("check")
def check(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Check every plan file is valid JSON Schema; exit 1 naming the first broken one.

    Run it in CI before deploying plan changes.

    Examples:
      refinery plans check
      refinery plans check --data-dir /var/lib/refinery --json
    """
    plans = _plans(data_dir)
    try:
        events = sorted(plans.load_strict())
    except ConfigurationError as e:
        if as_json:
            print_json({"ok": False, "error": e.message, "fix": e.fix})
        else:
            console.print(f"[bold red]Error:[/] {e.message}\n[yellow]Fix:[/] {e.fix}")
        raise typer.Exit(1) from e
    if as_json:
        print_json({"ok": True, "events": events})
    else:
        console.print(f"[green]{len(events)} plan(s) valid[/]: {', '.join(events) or 'none'}")

"""`refinery retention`: delete what is past its time-to-live, see past runs, set a source's own days."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from refinery.cli.common import DataDirOption, JsonOption, client, console, print_json, print_table
from refinery.governance.retention import ZONES

app = typer.Typer(
    help=(
        "Retention: each zone (" + ", ".join(ZONES) + ") is kept for a number of days (settings "
        "retention_*_days, or a source's own) and deleted after. `refinery serve` runs it on a schedule; "
        "run it by hand with `refinery retention run` (try --dry-run first). The audit log is never deleted. "
        "See docs/retention.md."
    ),
    no_args_is_help=True,
)


def _counts(report: dict[str, Any]) -> str:
    return ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in report["counts"].items())


@app.command("run")
def run_(
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be deleted; delete nothing, record nothing."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Delete everything older than its zone's (or its source's) time-to-live, in small transactions.

    Examples:
      refinery retention run --dry-run
      refinery retention run --json
    """
    with client(data_dir) as c:
        report = c.retention_run(dry_run)
    if as_json:
        print_json(report)
        return
    if report["dry_run"]:
        console.print(f"Dry run (as of {report['as_of']}): would delete {_counts(report)}. Nothing was changed.")
    else:
        console.print(f"Retention run {report['run_id']}: deleted {_counts(report)}.")


@app.command("runs")
def runs(limit: int = typer.Option(20, help="How many runs, newest first."), data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """List past retention runs with what each deleted.

    Example:
      refinery retention runs --limit 5
    """
    with client(data_dir) as c:
        found = c.retention_runs(limit)
    if as_json:
        print_json(found)
        return
    print_table([{"run": r["run_id"], "started": r["started_at"], "trigger": r["trigger"], "actor": r["actor"], "status": r["status"],
                  "deleted": ", ".join(f"{k} {v}" for k, v in r["counts"].items() if v) or "nothing"} for r in found],
                columns=["run", "started", "trigger", "actor", "status", "deleted"], title="Retention runs")


@app.command("policy")
def policy(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Show the days each zone is kept (0: forever), and the sources that keep theirs differently.

    Examples:
      refinery retention policy
      refinery retention policy --json
    """
    with client(data_dir) as c:
        body = c.retention_policy()
    if as_json:
        print_json(body)
        return
    rows = [{"source": "(default)", **{z: body["defaults"][z] for z in ZONES}}]
    rows += [{"source": s, **{z: zones.get(z, "") for z in ZONES}} for s, zones in body["overrides"].items()]
    print_table(rows, columns=["source", *ZONES], title="Days kept per zone (0: forever)")


@app.command("set")
def set_(
    source: str = typer.Argument(..., help="A source name, e.g. web."),
    zone: str = typer.Argument(..., help=f"One of: {', '.join(ZONES)}."),
    days: int = typer.Argument(None, help="Days to keep; 0 keeps forever. Leave out with --clear."),
    clear: bool = typer.Option(False, "--clear", help="Remove the source's own days: the setting applies again."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Give one source its own time-to-live for a zone.

    Examples:
      refinery retention set crm events 730
      refinery retention set web raw 7
      refinery retention set web raw --clear
    """
    if days is None and not clear:
        raise typer.BadParameter("give DAYS, or --clear to remove the override", param_hint="DAYS")
    with client(data_dir) as c:
        body = c.set_retention(source, zone, None if clear else days)
    if as_json:
        print_json(body)
    else:
        console.print(f"{source} {zone}: {'setting default' if clear else f'{days} days'} "
                      f"(now {body['overrides'].get(source, {}).get(zone, body['defaults'].get(zone))} days).")

"""`refinery syncs`: send a segment's members to a destination, and see what was delivered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from refinery.activation.client import connect
from refinery.cli.common import DataDirOption, JsonOption, connected, console, print_json, print_table

app = typer.Typer(
    help=(
        "Syncs: a segment to a destination, with a field mapping, a mode and a schedule.\n\n"
        "Modes: diff (who entered and who left since the last run), mirror (diff, plus members whose mapped fields "
        "changed), full (every member each run). Schedules: realtime (follows segment_entered/segment_exited), an "
        "interval in minutes, or manual. Each destination has its own outbox; failed batches are retried with backoff "
        "and end in dead letters you can replay. Only profiles whose consent for the destination's purpose is granted, "
        "and who are not erased or suppressed, are sent."
    ),
    no_args_is_help=True,
)


def _client(data_dir: Path | None) -> Any:
    return connected(connect, data_dir)


def _mapping(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        target, sep, source = item.partition("=")
        if not sep or not target or not source:
            raise typer.BadParameter(f"{item!r} is not FIELD=SOURCE", param_hint="--map")
        out[target] = source
    return out


MapOption = typer.Option(None, "--map", help="FIELD=SOURCE: an output field and the trait, computed trait or profile_id it takes (repeat).")


def _run_line(r: dict[str, Any]) -> str:
    return (f"{r['run_id']} {r['status']}: planned {r['planned']} in {r['batches']} batches; sent {r['sent']} "
            f"(+{r['added']} -{r['removed']}), failed {r['failed']}, skipped for consent {r['skipped_consent']}, "
            f"suppressed {r['skipped_suppressed']}")


@app.command("create")
def create(
    name: str = typer.Argument(..., help="Lower-case letters, digits, '_' or '-'."),
    segment: str = typer.Option(..., "--segment", help="The segment whose members are sent."),
    destination: str = typer.Option(..., "--destination", help="Where they are sent."),
    mapping: list[str] = MapOption,
    mode: str = typer.Option("diff", "--mode", help="full, diff or mirror."),
    schedule: str = typer.Option("manual", "--schedule", help="realtime, manual, or an interval in minutes (15)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Most records per batch (default activation_batch_size)."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Connect a segment to a destination. Every mapping source must be a known trait (did-you-mean otherwise).

    Examples:
      refinery syncs create vip-crm --segment vip --destination crm --map id=profile_id --map email=email --schedule realtime
      refinery syncs create buyers-files --segment buyers --destination exports --map id=profile_id --mode full --schedule 60 --json
    """
    with _client(data_dir) as c:
        s = c.create_sync(name, segment, destination, _mapping(mapping) or {}, mode, schedule, batch_size)
    if as_json:
        print_json(s)
    else:
        console.print(f"Sync [bold]{escape(name)}[/]: {escape(segment)} -> {escape(destination)} ({mode}, {escape(s['schedule_text'])}).")


@app.command("update")
def update(
    name: str = typer.Argument(...),
    mapping: list[str] = MapOption,
    mode: str = typer.Option(None, "--mode"),
    schedule: str = typer.Option(None, "--schedule"),
    batch_size: int = typer.Option(None, "--batch-size"),
    enable: bool = typer.Option(None, "--enable/--disable", help="A disabled sync is not planned by its schedule."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Change a sync's mapping (all of it), mode, schedule, batch size, or pause it.

    Example:
      refinery syncs update vip-crm --mode mirror --map id=profile_id --map email=email --map plan=plan
    """
    with _client(data_dir) as c:
        s = c.update_sync(name, mapping=_mapping(mapping), mode=mode, schedule=schedule, batch_size=batch_size, enabled=enable)
    if as_json:
        print_json(s)
    else:
        console.print(f"Sync [bold]{escape(name)}[/] updated ({s['mode']}, {escape(s['schedule_text'])}).")


@app.command("delete")
def delete(name: str = typer.Argument(...), yes: bool = typer.Option(False, "--yes", help="Do not ask."),
           data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Delete a sync: undelivered batches are cancelled; the destination keeps what it has.

    Example:
      refinery syncs delete vip-crm --yes
    """
    if not yes and not as_json:
        typer.confirm(f"Delete sync {name!r}? Its undelivered batches are cancelled.", abort=True)
    with _client(data_dir) as c:
        result = c.delete_sync(name)
    if as_json:
        print_json(result)
    else:
        console.print(f"Sync [bold]{escape(name)}[/] deleted ({result['batches_cancelled']} batches cancelled).")


@app.command("list")
def list_(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """List syncs and how many profiles each destination holds.

    Example:
      refinery syncs list --json
    """
    with _client(data_dir) as c:
        found = c.syncs()
    if as_json:
        print_json(found)
        return
    print_table([{"name": s["name"], "segment": s["segment"], "destination": s["destination"], "mode": s["mode"],
                  "schedule": s["schedule_text"], "enabled": s["enabled"], "held": s["held"], "last planned": s["last_planned_at"]}
                 for s in found], columns=["name", "segment", "destination", "mode", "schedule", "enabled", "held", "last planned"],
                title="Syncs")


@app.command("show")
def show(name: str = typer.Argument(...), data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """One sync: its mapping, schedule, what its destination holds, and its last run.

    Example:
      refinery syncs show vip-crm
    """
    with _client(data_dir) as c:
        s = c.sync(name)
    if as_json:
        print_json(s)
        return
    console.print(f"[bold]{escape(s['name'])}[/]: {escape(s['segment'])} -> {escape(s['destination'])} ({s['mode']}, "
                  f"{escape(s['schedule_text'])}, {'enabled' if s['enabled'] else 'disabled'}); the destination holds {s['held']}.")
    for target, source in sorted(s["mapping"].items()):
        console.print(f"  {escape(target)} <- {escape(source)}")
    if s.get("last_run"):
        console.print("Last run " + _run_line(s["last_run"]))


@app.command("run")
def run(
    name: str = typer.Argument(...),
    wait: float = typer.Option(30.0, "--wait", help="With a server running: seconds to wait for the delivery."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Plan a sync now and deliver it (by the server's worker, or here when no server runs).

    Example:
      refinery syncs run vip-crm
    """
    with _client(data_dir) as c:
        result = c.run_sync(name, wait)
    if as_json:
        print_json(result)
        return
    r = result.get("run")
    console.print(_run_line(r) if r else "Nothing to do.")
    if r and r["status"] in ("planned", "delivering"):
        console.print("[dim]Still delivering; see `refinery syncs runs`.[/]")
    if r and r["failed"]:
        raise typer.Exit(1)


@app.command("runs")
def runs(sync: str = typer.Argument(None, help="One sync; default all."), limit: int = typer.Option(20, help="How many runs."),
         data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Past runs: planned, sent, added, removed, failed, skipped for consent or suppression, with errors.

    Example:
      refinery syncs runs vip-crm --json
    """
    with _client(data_dir) as c:
        found = c.runs(sync, limit)
    if as_json:
        print_json(found)
        return
    cols = ["run_id", "sync", "trigger", "status", "planned", "sent", "added", "removed", "failed", "skipped_consent",
            "skipped_suppressed", "started_at"]
    print_table([{k: r.get(k) for k in cols} for r in found], columns=cols, title="Sync runs")
    for r in found:
        for e in r["errors"]:
            console.print(f"[red]{r['run_id']} {escape(e['batch_id'])}[/]: {escape(e['kind'])}: {escape(e['message'])}")


@app.command("dead-letters")
def dead_letters(sync: str = typer.Option(None, "--sync"), destination: str = typer.Option(None, "--destination"),
                 all_: bool = typer.Option(False, "--all", help="Include dead letters replayed already."),
                 limit: int = typer.Option(100), data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Batches that failed for good (a terminal error, or out of attempts), waiting for a replay.

    Example:
      refinery syncs dead-letters --sync vip-crm
    """
    with _client(data_dir) as c:
        found = c.dead_letters(sync, destination, all_, limit)
    if as_json:
        print_json(found)
        return
    cols = ["batch_id", "sync", "destination", "records", "reason", "attempts", "dead_at", "replayed_at", "error"]
    print_table([{k: r.get(k) for k in cols} for r in found], columns=cols, title="Dead letters")


@app.command("replay")
def replay(batch_ids: list[str] = typer.Argument(None, help="Batch ids from `refinery syncs dead-letters`."),
           sync: str = typer.Option(None, "--sync", help="Replay every dead letter of this sync."),
           data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Put dead letters back in their outbox (same batch ids, so receivers still apply each once).

    Examples:
      refinery syncs replay b_3f2a..._000004
      refinery syncs replay --sync vip-crm
    """
    with _client(data_dir) as c:
        result = c.replay(batch_ids or None, sync)
    if as_json:
        print_json(result)
    else:
        console.print(f"{len(result['replayed'])} batches back in the outbox.")

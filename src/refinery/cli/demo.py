"""`refinery demo`: a synthetic world sent through the real collector, with a summary of the zones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from refinery.cli.common import DataDirOption, JsonOption, console, print_json, run, settings_from
from refinery.demo.run import DEFAULT_PEOPLE, DEFAULT_SEED, DemoSummary, Reporter, run_demo


class _RichReporter(Reporter):
    def __init__(self, progress: Progress, quiet: bool):
        self.progress = progress
        self.quiet = quiet
        self.task: Any = None

    def stage(self, text: str) -> None:
        if not self.quiet:
            self.progress.console.print(f"[bold cyan]•[/] {escape(text)}")

    def sending(self, total: int) -> None:
        self.task = self.progress.add_task("Sending events", total=max(total, 1), completed=0 if total else 1)

    def sent(self, n: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)


def demo(
    people: int = typer.Option(DEFAULT_PEOPLE, "--people", "-n", min=2, help="How many people the world holds."),
    seed: int = typer.Option(DEFAULT_SEED, "--seed", help="Seed of the world: the same seed gives the same world."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Generate a synthetic world and send it through the real server.

    People browse anonymously on several devices and later log in; families share a device; some change their email; they buy things and consent to some purposes but not others. Their events go to the collector with the official Segment Python SDK, and a messy CRM export goes through the importer. The ground truth (which identifiers belong to whom) lands in <data dir>/demo/.

    Re-running on the same data dir sends only what is missing. See docs/demo.md.
    """
    settings = run(lambda: settings_from(data_dir))

    def with_progress() -> DemoSummary:
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=as_json, transient=False,
        ) as progress:
            return run_demo(settings, people=people, seed=seed, reporter=_RichReporter(progress, as_json))

    result = run(with_progress).to_dict()  # errors print after the progress bar has stopped
    if as_json:
        print_json(result)
        return
    _print_summary(result)


def _print_summary(s: dict[str, Any]) -> None:
    ev, crm, gt, zones = s["events"], s["crm"], s["ground_truth"], s["zones"]
    if s["rerun"]:
        console.print(
            f"[yellow]Re-run:[/] this data dir already held the world (seed {s['seed']}); "
            f"{ev['already_stored']} events were already stored and skipped, {ev['sent']} sent now."
        )
    table = Table(title=f"Refinery demo: seed {s['seed']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("People generated", str(s["people"]))
    table.add_row("Events in the world", f"{ev['generated']} ({ev['sent']} sent now with segment-analytics-python)")
    table.add_row("Clean events (web + app)", f"{ev['clean']} (expected {ev['expected_clean']})")
    table.add_row("Quarantined (web + app)", f"{ev['quarantined']} (expected {sum(ev['expected_quarantined'].values())})")
    table.add_row(
        "CRM rows",
        f"{crm['rows']} in the export: {crm['rows_loaded']} loaded, {crm['rows_duplicate']} duplicates, "
        f"{crm['rows_failed']} failed; {crm['identify_events']} identify events in the clean zone",
    )
    table.add_row("Server", f"{s['server']['url']} ({'started and stopped by the demo' if s['server']['started_by_demo'] else 'already running'})")
    console.print(table)

    failed = Table(title="Quarantined, by reason", title_justify="left")
    for col in ("source", "stage", "reason", "count"):
        failed.add_column(col)
    for f in zones["failed_events"]:
        failed.add_row(f["source"], f["stage"], f["reason"], str(f["count"]))
    if zones["failed_events"]:
        console.print(failed)

    console.print(
        Panel(
            f"[bold]{escape(gt['file'])}[/]\n"
            f"{gt['persons']} people, {gt['identifiers']} identifiers (anonymous ids, user ids, emails, phones, CRM ids, "
            f"device ids), {gt['shared_devices']} shared devices, {gt['people_who_changed_email']} email changes.\n"
            f"Per event: {escape(gt['event_truth'])}",
            title="Ground truth", title_align="left",
        )
    )
    if s.get("identity"):
        _print_identity(s["identity"])
    if s.get("segments"):
        _print_segments(s["segments"])
    if s.get("activation"):
        _print_activation(s["activation"])
    if s.get("privacy"):
        _print_privacy(s["privacy"])
    console.print("[bold]Try next:[/]")
    for cmd in s["next_commands"]:
        console.print(f"  {escape(cmd)}", soft_wrap=True)


def _print_identity(i: dict[str, Any]) -> None:
    det = i["accuracy"]["deterministic"]
    merges = ", ".join(f"{n} {r}" for r, n in i["refusals"].items()) or "none"
    links = ", ".join(f"{n} {m}" for m, n in i["probabilistic_links"].items()) or "none yet"
    lines = [
        f"{i['identifiers']} identifiers resolved into [bold]{i['profiles']} profiles[/]; "
        f"{i['events_attributed']} events attributed ({i['events_unattributed']} carry only blocked or shared identifiers).",
        f"Refused merges and identifiers, by rule: {merges}.",
        f"Probabilistic links (kept apart from profiles): {links}.",
        f"Against the ground truth, deterministic graph: precision [bold]{det['precision']:.4f}[/], recall {det['recall']:.4f} of what "
        f"the data makes knowable ({det['recall_of_all_pairs']:.4f} of all pairs), {det['profiles_with_two_persons']} profiles mixing two people.",
    ]
    prob = i["accuracy"].get("with_probabilistic_links")
    if prob:
        lines.append(
            f"With probabilistic links at {prob['threshold']}: precision [bold]{prob['precision']:.4f}[/], "
            f"recall {prob['recall_of_all_pairs']:.4f} of all pairs ({prob['links_used']} links used)."
        )
    consent = i.get("consent")
    if consent:
        lines.append(
            f"Consent: {consent['receipts']} receipts read from the events' choices per purpose; "
            f"{consent['conflicts_open']} profile purposes where a person's devices disagree (the denial wins)."
        )
    lines.append(f"Rules: {escape(i['rules_file'])}")
    console.print(Panel("\n".join(lines), title="Identity", title_align="left"))


def _print_privacy(p: dict[str, Any]) -> None:
    ex, er, after = p["export"], p["erasure"], p["after_erasure"]
    held = ", ".join(f"{n} {store}" for store, n in ex["stores"].items() if n) or "nothing"
    consent = ", ".join(f"{purpose} {state}" for purpose, state in ex["consent"].items()) or "no choices recorded"
    receipt = er["receipt"]
    erased = ", ".join(f"{n} {store}" for store, n in (receipt.get("stores") or {}).items() if n) or "nothing"
    lines = [
        f"Export {ex['request_id']} ({ex['status']}): {held}.",
        f"  Their consent: {consent}.  Document: {escape(ex['file'])} (owner-only)",
        f"Erasure {er['request_id']} ({er['status']}, due {er.get('due_at') or '-'}): removed {erased}; "
        f"{receipt.get('keys_destroyed', 0)} keys destroyed, {receipt.get('suppression_entries', 0)} "
        "identifiers on the suppression list.",
        f"An event sent for the erased person afterwards: {after['suppressed']} of {after['sent']} suppressed (not stored).",
    ]
    console.print(Panel("\n".join(lines), title="Privacy", title_align="left"))


def _print_activation(a: dict[str, Any]) -> None:
    wh, fl = a["webhook"], a["files"]

    def run_line(run: dict[str, Any] | None) -> str:
        if not run:
            return "nothing to send"
        return (f"run {run['run_id']} {run['status']}: {run.get('sent', 0)} sent ({run.get('added', 0)} added, "
                f"{run.get('removed', 0)} removed), {run.get('skipped_consent', 0)} skipped for consent, "
                f"{run.get('failed', 0)} failed")

    lines = [
        f"Segment [bold]{escape(a['segment'])}[/] ({a['members']} members), destinations for purpose {a['purpose']}:",
        f"Webhook {escape(wh['url'])}: {run_line(wh['run'])}.",
        f"  The receiver verified the signatures and holds [bold]{wh['received']}[/] members ({wh['with_email']} with an email) "
        f"from {wh['batches']} batches, {wh['duplicates']} repeats ignored; {wh['not_sent']} members not sent "
        f"(no marketing consent), {wh['outside_segment']} outside the segment.",
        f"Files {escape(fl['folder'])}: {run_line(fl['run'])}; {len(fl['files'])} files.",
    ]
    console.print(Panel("\n".join(lines), title="Activation", title_align="left"))


def _print_segments(seg: dict[str, Any]) -> None:
    lines = [f"[bold]{escape(name)}[/] ({seg['sizes'].get(name, 0)} members): {escape(rule)}" for name, rule in seg["rules"].items()]
    for name, error in seg.get("failed", {}).items():
        lines.append(f"[red]{escape(name)} failed:[/] {escape(str(error))}")
    x = seg.get("explanation")
    if x:
        lines.append(f"Why {x['profile_id']} is {'in' if x['member'] else 'not in'} {escape(x['segment'])}:")
        for c in x["conditions"]:
            mark = "[green]held[/]" if c["held"] else "[red]did not hold[/]"
            value = f" (value: {escape(str(c['value']))})" if c.get("value") is not None else ""
            lines.append(f"  {c['id']} {escape(c['text'])}: {mark}{value}")
    console.print(Panel("\n".join(lines), title="Segments", title_align="left"))

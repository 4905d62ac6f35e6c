"""`refinery segments`: define audiences in the rule language, preview them, keep their membership and history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from refinery.cli.common import DataDirOption, JsonOption, client, console, print_json, print_table

app = typer.Typer(
    help=(
        "Segments: audiences written as rules (docs/segments.md), e.g.\n\n"
        "  performed 'Order Completed' at least 2 times in last 90 days\n\n"
        "Membership is stored with its history (who entered and left, when) and recomputed by "
        "`refinery serve` every segments_interval_minutes, or by hand with `refinery segments run`. "
        "Give a RULE as text, or @FILE to read it from a file."
    ),
    no_args_is_help=True,
)
traits = typer.Typer(help="Computed traits: aggregates materialised on profiles (lifetime_value = sum(total) of 'Order Completed'), usable in rules.",
                     no_args_is_help=True)
app.add_typer(traits, name="traits")

AsOfOption = typer.Option(None, "--as-of", help="A past moment: 2026-01-31 or 2026-01-31T12:00:00Z (UTC unless it says otherwise).")


def _rule(text: str) -> str:
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise typer.BadParameter(f"{path} is not a file", param_hint="RULE")
        return path.read_text("utf-8")
    return text


def _run_summary(report: dict[str, Any]) -> str:
    parts = [f"{r['segment']}: {r['status']}" + (f", {r['members']} members (+{r['entered']} -{r['exited']})" if r["status"] == "completed" else "")
             + (f" - {r['error']}" if r.get("error") else "") for r in report["runs"]]
    if report["skipped"]:
        parts.append(f"unchanged, skipped: {', '.join(report['skipped'])}")
    return "; ".join(parts) or "no segments"


@app.command("create")
def create(
    name: str = typer.Argument(..., help="Lower-case letters, digits, '_' or '-'."),
    rule: str = typer.Argument(..., help="The rule, or @FILE."),
    description: str = typer.Option(None, "--description", help="What the audience is for."),
    no_run: bool = typer.Option(False, "--no-run", help="Save only; compute the membership at the next run."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Save a new segment and compute its members.

    Examples:
      refinery segments create buyers "performed 'Order Completed' at least 2 times"
      refinery segments create pricing "count(event = 'page_view' and url contains 'pricing') > 3 in last 7 days" --json
      refinery segments create vip @vip.rule --description "High spenders"
    """
    with client(data_dir) as c:
        seg = c.create_segment(name, _rule(rule), description, run=not no_run)
    if as_json:
        print_json(seg)
        return
    console.print(f"Segment [bold]{escape(name)}[/] saved (version {seg['version']}).")
    if seg.get("run"):
        console.print(_run_summary(seg["run"]))


@app.command("update")
def update(
    name: str = typer.Argument(...),
    rule: str = typer.Option(None, "--rule", help="A new rule, or @FILE (a new version is saved)."),
    description: str = typer.Option(None, "--description"),
    no_run: bool = typer.Option(False, "--no-run", help="Save only; recompute at the next run."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Change a segment's rule or description (a new version; the old ones stay for as-of reads).

    Example:
      refinery segments update buyers --rule "performed 'Order Completed' at least 3 times"
    """
    with client(data_dir) as c:
        seg = c.update_segment(name, _rule(rule) if rule is not None else None, description, run=not no_run)
    if as_json:
        print_json(seg)
        return
    console.print(f"Segment [bold]{escape(name)}[/] is at version {seg['version']}.")
    if seg.get("run"):
        console.print(_run_summary(seg["run"]))


@app.command("delete")
def delete(name: str = typer.Argument(...), yes: bool = typer.Option(False, "--yes", help="Do not ask."),
           data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Delete a segment: its members leave now (segment_exited events); its versions and history stay.

    Example:
      refinery segments delete buyers --yes
    """
    if not yes and not as_json:
        typer.confirm(f"Delete segment {name!r}? Its members leave it now.", abort=True)
    with client(data_dir) as c:
        result = c.delete_segment(name)
    if as_json:
        print_json(result)
    else:
        console.print(f"Segment [bold]{escape(name)}[/] deleted; {result['exited']} members left it.")


@app.command("list")
def list_(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """List segments with their current number of members.

    Example:
      refinery segments list --json
    """
    with client(data_dir) as c:
        found = c.segments()
    if as_json:
        print_json(found)
        return
    print_table([{"name": s["name"], "members": s["members"], "version": s["version"], "policy": s["identity_policy"].get("mode"),
                  "updated": s["updated_at"], "rule": s["rule"]} for s in found],
                columns=["name", "members", "version", "policy", "updated", "rule"], title="Segments")


@app.command("show")
def show(name: str = typer.Argument(...), data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """One segment: its rule, versions, members now and the last run.

    Example:
      refinery segments show buyers
    """
    with client(data_dir) as c:
        seg = c.segment(name)
    if as_json:
        print_json(seg)
        return
    console.print(f"[bold]{escape(seg['name'])}[/] (version {seg['version']}, {seg['members']} members)")
    console.print(escape(seg["rule"]))
    if seg.get("description"):
        console.print(f"[dim]{escape(seg['description'])}[/]")
    last = seg.get("last_run")
    if last:
        console.print(f"Last run {last['run_id']} as of {last['as_of']}: {last['status']}, +{last['entered']} -{last['exited']}.")


@app.command("preview")
def preview(
    rule: str = typer.Argument(..., help="The rule, or @FILE."),
    sample: int = typer.Option(20, help="How many member profile ids to show."),
    as_of: str = AsOfOption,
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Count a rule's members, show a sample and the SQL it compiles to, without saving anything.

    Examples:
      refinery segments preview "performed 'Order Completed' where total > 100"
      refinery segments preview "plan = 'pro' and not performed 'Login' in last 30 days" --json
    """
    with client(data_dir) as c:
        result = c.preview_segment(_rule(rule), sample, as_of)
    if as_json:
        print_json(result)
        return
    console.print(f"[bold]{result['count']}[/] profiles (as of {result['as_of']}; "
                  f"compiled in {result['timings_ms']['compile']} ms, ran in {result['timings_ms']['run']} ms).")
    if result["sample"]:
        console.print("Sample: " + ", ".join(result["sample"]))
    console.print("[dim]" + escape(result["sql"]) + "[/]")


@app.command("run")
def run(
    name: str = typer.Argument(None, help="One segment; default every segment."),
    as_of: str = AsOfOption,
    force: bool = typer.Option(False, "--force", help="Recompute even when nothing the rule reads has changed."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Recompute membership now (or as of a moment after the last run), recording who entered and left.

    Segments whose inputs did not change since their last run are skipped.

    Examples:
      refinery segments run
      refinery segments run buyers --force --json
    """
    with client(data_dir) as c:
        report = c.run_segments(name, as_of, force)
    if as_json:
        print_json(report)
    else:
        console.print(_run_summary(report))
    if report["failed"]:
        raise typer.Exit(1)


@app.command("members")
def members(
    name: str = typer.Argument(...),
    as_of: str = AsOfOption,
    evaluated: bool = typer.Option(False, "--evaluated", help="Evaluate the rule in force at --as-of over the events received by then, "
                                   "instead of reading the recorded history."),
    limit: int = typer.Option(1000, help="Most profile ids to print."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """The profiles in a segment now, or at a past moment (recorded history, or --evaluated).

    Examples:
      refinery segments members buyers
      refinery segments members buyers --as-of 2026-01-31
      refinery segments members buyers --as-of 2026-01-31 --evaluated --json
    """
    with client(data_dir) as c:
        body = c.segment_members(name, as_of, "evaluated" if evaluated else "history", limit)
    if as_json:
        print_json(body)
        return
    ids = [m if isinstance(m, str) else m["profile_id"] for m in body["members"]]
    for pid in ids:
        typer.echo(pid)
    more = f" (showing {len(ids)})" if len(ids) < body["count"] else ""
    console.print(f"[dim]{body['count']} members{more}, {body['source']}{', as of ' + body['as_of'] if body['as_of'] else ''}.[/]",
                  highlight=False)


@app.command("history")
def history(name: str = typer.Argument(...), limit: int = typer.Option(20, help="How many runs."),
            data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """A segment's versions and its runs (who entered and left in each).

    Example:
      refinery segments history buyers
    """
    with client(data_dir) as c:
        body = c.segment_history(name, limit)
    if as_json:
        print_json(body)
        return
    print_table([{"version": v["version"], "saved": v["created_at"], "by": v["created_by"], "rule": v["rule"]} for v in body["versions"]],
                title=f"Versions of {name}")
    print_table([{k: r.get(k) for k in ("run_id", "as_of", "trigger", "status", "members", "entered", "exited", "version")} for r in body["runs"]],
                columns=["run_id", "as_of", "trigger", "status", "members", "entered", "exited", "version"], title="Runs")


@app.command("explain")
def explain(
    name: str = typer.Argument(...),
    profile: str = typer.Argument(..., help="A profile id (prof_...) or an identifier as type:value."),
    as_of: str = AsOfOption,
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Why a profile is in a segment or not: each condition, whether it held, and the value that decided it.

    Examples:
      refinery segments explain buyers prof_3f2a...
      refinery segments explain buyers email:jane@example.com --as-of 2026-01-31
    """
    with client(data_dir) as c:
        body = c.explain_segment(name, profile, as_of)
    if as_json:
        print_json(body)
        return
    verdict = "[green]is a member[/]" if body["member"] else "[red]is not a member[/]"
    console.print(f"{body['profile_id']} {verdict} of {escape(name)} (version {body['version']}, as of {body['as_of']}).")
    print_table([{"condition": c["text"], "kind": c["kind"], "held": c["held"], "value": c["value"]} for c in body["conditions"]],
                columns=["condition", "kind", "held", "value"])


@traits.command("list")
def traits_list(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """List computed traits and when they were last computed.

    Example:
      refinery segments traits list --json
    """
    with client(data_dir) as c:
        found = c.computed_traits()
    if as_json:
        print_json(found)
        return
    print_table([{k: t.get(k) for k in ("name", "expression", "version", "computed_at", "profiles")} for t in found], title="Computed traits")


@traits.command("create")
def traits_create(
    name: str = typer.Argument(..., help="The trait's name, as rules use it."),
    expression: str = typer.Argument(..., help="e.g. \"sum(total) of 'Order Completed'\""),
    description: str = typer.Option(None, "--description"),
    no_compute: bool = typer.Option(False, "--no-compute", help="Save only."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Define (or redefine) a computed trait and materialise its values.

    Example:
      refinery segments traits create lifetime_value "sum(total) of 'Order Completed'"
    """
    with client(data_dir) as c:
        trait = c.define_computed_trait(name, expression, description)
        if not no_compute:
            trait["computed"] = c.compute_trait(name)
    if as_json:
        print_json(trait)
    else:
        done = trait.get("computed")
        console.print(f"Computed trait [bold]{escape(name)}[/] saved (version {trait['version']})"
                      + (f"; {done['profiles']} profiles have a value." if done else "."))


@traits.command("compute")
def traits_compute(name: str = typer.Argument(...), data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Recompute one computed trait's values for every profile.

    Example:
      refinery segments traits compute lifetime_value
    """
    with client(data_dir) as c:
        done = c.compute_trait(name)
    if as_json:
        print_json(done)
    else:
        console.print(f"{escape(name)}: {done['profiles']} profiles have a value.")


@traits.command("delete")
def traits_delete(name: str = typer.Argument(...), data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Delete a computed trait and its values (refused while a segment's rule names it).

    Example:
      refinery segments traits delete lifetime_value
    """
    with client(data_dir) as c:
        done = c.delete_computed_trait(name)
    if as_json:
        print_json(done)
    else:
        console.print(f"{escape(name)} deleted ({done['values_deleted']} values).")

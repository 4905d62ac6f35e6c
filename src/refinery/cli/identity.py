"""`refinery identity`: resolve identifiers into profiles, and show the rules in force."""

from __future__ import annotations

from pathlib import Path

import typer

from refinery.cli.common import DataDirOption, JsonOption, console, print_json, run, settings_from

app = typer.Typer(
    help=(
        "Identity resolution: turn the identifiers in the clean zone (user ids, anonymous ids, emails, phones, "
        "device ids, CRM ids, ...) into profiles, with merge protection.\n\n"
        "Results are tables you can query: identities, identity_edges, identity_blocked, profile_merges."
    ),
    no_args_is_help=True,
)


@app.command("resolve")
def resolve_(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Resolve every identifier in the clean zone into profiles (a full, deterministic run).

    Re-running on the same data changes nothing; profile ids survive new data. Runs on the data dir
    directly: stop `refinery serve` on it first.

    Examples:
      refinery identity resolve
      refinery identity resolve --json
      refinery query "SELECT reason, count(*) FROM identity_blocked GROUP BY 1"
    """
    from refinery.identity import resolve, rules_from_settings
    from refinery.runtime import Runtime

    settings = run(lambda: settings_from(data_dir))
    rules = run(lambda: rules_from_settings(settings))
    rt = run(lambda: Runtime.open(settings))
    try:
        report = run(lambda: rt.writer.call(lambda e: resolve(e, rules)))
    finally:
        rt.close()
    if as_json:
        print_json(report.to_dict())
        return
    console.print(
        f"[green]Resolved[/] {report.identifiers} identifiers ({report.blocked_identifiers} blocked) over {report.edges} edges "
        f"into {report.profiles} profiles in {report.seconds:.2f}s: {report.merges} merges, {report.unmerges} undone, "
        f"{report.blocked} refusals."
    )
    for reason, n in sorted(report.blocked_by_reason.items()):
        console.print(f"  {reason}: {n}")
    if report.blocked:
        console.print('See them with: refinery query "SELECT * FROM identity_blocked ORDER BY reason"')


@app.command("rules")
def rules_(data_dir: Path = DataDirOption) -> None:
    """Print the identity rules in force (settings plus the rules file), as JSON.

    Example:
      refinery identity rules
    """
    from refinery.identity import rules_from_settings

    settings = run(lambda: settings_from(data_dir))
    print_json({"file": str(settings.identity_rules_path) if settings.identity_rules_path.exists() else None,
                **run(lambda: rules_from_settings(settings)).to_dict()})

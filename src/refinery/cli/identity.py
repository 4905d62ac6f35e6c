"""`refinery identity`: resolve identifiers into profiles, and show the rules in force."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from refinery.cli.common import (
    DataDirOption,
    JsonOption,
    client,
    console,
    print_json,
    print_table,
    run,
    settings_from,
)

app = typer.Typer(
    help=(
        "Identity resolution: turn the identifiers in the clean zone (user ids, anonymous ids, emails, phones, "
        "device ids, CRM ids, ...) into profiles, with merge protection.\n\n"
        "Results are tables you can query: identities, identity_edges, identity_blocked, profile_merges, "
        "identity_overrides.\n\nUndo with remove-identifier, remove-edge and split (each revocable); try rule "
        "changes first with plan."
    ),
    no_args_is_help=True,
)


@app.command("resolve")
def resolve_(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Resolve every identifier in the clean zone into profiles, then rebuild the profiles.

    A full, deterministic run: re-running on the same data changes nothing, and profile ids
    survive new data. Works with `refinery serve` running on the data dir (through its admin API)
    and without it (in process).

    Examples:
      refinery identity resolve
      refinery identity resolve --json
      refinery query "SELECT reason, count(*) FROM identity_blocked GROUP BY 1"
    """
    with client(data_dir) as c:
        result = c.resolve_identities()
    if as_json:
        print_json(result)
        return
    _print_resolution(result)


def _print_resolution(result: dict[str, Any]) -> None:
    report, built = result["identity"], result.get("profiles") or {}
    console.print(
        f"[green]Resolved[/] {report['identifiers']} identifiers ({report['blocked_identifiers']} blocked) over {report['edges']} "
        f"edges into {report['profiles']} profiles in {report['seconds']:.2f}s: {report['merges']} merges, "
        f"{report['unmerges']} undone, {report['blocked']} refusals."
    )
    for reason, n in sorted(report["blocked_by_reason"].items()):
        console.print(f"  {escape(str(reason))}: {n}")
    if built:
        console.print(f"Profiles rebuilt: {built['profiles']} profiles, {built['events_attributed']} events attributed, "
                      f"{built['events_unattributed']} without a linked identifier.")
    if report["blocked"]:
        console.print('See them with: refinery query "SELECT * FROM identity_blocked ORDER BY reason"')


def _print_override(result: dict[str, Any], as_json: bool, verb: str) -> None:
    if as_json:
        print_json(result)
        return
    o = result["override"]
    idents = ", ".join(f"{i['type']}:{i['value']}" for i in o["identifiers"])
    console.print(f"[green]{verb}[/] override {escape(o['override_id'])} ({o['kind']}: {escape(idents)}) by {escape(o['actor'])}.")
    _print_resolution(result["resolution"])
    console.print(f"Undo with: refinery identity revoke {o['override_id']}" if verb == "Recorded" else "")


ReasonOption = typer.Option(None, "--reason", "-r", help="A note kept with the override (why you did it).")


@app.command("remove-identifier")
def remove_identifier(
    identifier: str = typer.Argument(..., help="type:value, e.g. anonymous_id:5f1c... or email:jane@example.com."),
    reason: str = ReasonOption,
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Remove an identifier from identity resolution: it is blocked (`removed_by_user`), links
    nobody, and its events and traits move to the profiles of their other identifiers. Resolution
    and the profile build run at once. Revocable.

    Example:
      refinery identity remove-identifier anonymous_id:shared-tablet --reason "shop floor tablet"
    """
    with client(data_dir) as c:
        result = c.create_override("remove_identifier", [identifier], None, reason)
    _print_override(result, as_json, "Recorded")


@app.command("remove-edge")
def remove_edge(
    a: str = typer.Argument(..., help="One end, as type:value."),
    b: str = typer.Argument(..., help="The other end, as type:value."),
    reason: str = ReasonOption,
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Stop using the edge between two identifiers (`removed_by_user`), whatever events say; they stay
    in one profile only if other edges join them. Resolution and the profile build run at once.

    Example:
      refinery identity remove-edge anonymous_id:abc user_id:u-17 --reason "wrong login on a demo laptop"
    """
    with client(data_dir) as c:
        result = c.create_override("remove_edge", [a, b], None, reason)
    _print_override(result, as_json, "Recorded")


@app.command("split")
def split(
    identifiers: list[str] = typer.Argument(..., help="The identifiers to take out of their profile, as type:value."),
    profile: str = typer.Option(None, "--profile", help="The profile to split (default: the identifiers' profile)."),
    reason: str = ReasonOption,
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Split a profile: the given identifiers are separated from the rest of it by not using any
    edge between the two sides (`split_by_user`). The separated side becomes a profile of its own
    (or several); events and traits follow. New evidence through a third identifier can join them
    again, by the rules. Revocable.

    Example:
      refinery identity split email:dad@home.io anonymous_id:dads-phone --reason "two people under one login"
    """
    with client(data_dir) as c:
        result = c.create_override("split", identifiers, profile, reason)
    _print_override(result, as_json, "Recorded")


@app.command("overrides")
def overrides_(
    include_revoked: bool = typer.Option(False, "--all", help="Include revoked overrides."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """List the removals and splits in force (with --all, revoked ones too).

    Example:
      refinery identity overrides --all --json
    """
    with client(data_dir) as c:
        rows = c.overrides(include_revoked)
    if as_json:
        print_json(rows)
        return
    print_table(
        [{"override_id": o["override_id"], "kind": o["kind"],
          "identifiers": ", ".join(f"{i['type']}:{i['value']}" for i in o["identifiers"]),
          "profile": o["profile_id"], "reason": o["reason"], "actor": o["actor"], "created_at": o["created_at"],
          "revoked_at": o["revoked_at"]} for o in rows],
        columns=["override_id", "kind", "identifiers", "profile", "reason", "actor", "created_at", "revoked_at"], title="Identity overrides",
    )


@app.command("revoke")
def revoke(
    override_id: str = typer.Argument(..., help="The override id (ovr_...), from `refinery identity overrides`."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Revoke an override: resolution applies it no more, and what it undid comes back.

    Example:
      refinery identity revoke ovr_3f2a1c...
    """
    with client(data_dir) as c:
        result = c.revoke_override(override_id)
    _print_override(result, as_json, "Revoked")


@app.command("plan")
def plan_(
    rules_file: Path = typer.Option(None, "--rules", help="The changed rules file (YAML or JSON); default: the rules in force."),
    examples: int = typer.Option(5, help="How many merges and splits to show."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Dry run: resolve history with the rules in force and with the changed rules (temporary tables
    only, nothing is written) and show which profiles would merge or split, before you apply them.

    Examples:
      refinery identity plan --rules new-identity-rules.yaml
      refinery identity plan --rules new-identity-rules.yaml --examples 20 --json
    """
    raw = run(lambda: _read_rules(rules_file)) if rules_file else None
    with client(data_dir) as c:
        result = c.identity_plan(raw, examples)
    if as_json:
        print_json(result)
        return
    p = result["profiles"]
    console.print(f"Profiles: {p['current']} now, {p['proposed']} with the new rules: "
                  f"[bold]{result['merges']}[/] would merge, [bold]{result['splits']}[/] would split, "
                  f"{result['identifiers_changing_status']} identifiers change status.")
    for label, key in (("newly blocked", "newly_blocked"), ("no longer blocked", "unblocked")):
        for reason, n in result[key].items():
            console.print(f"  {label}: {n} ({escape(reason)})")
    for m in result["merge_examples"]:
        console.print(f"[bold]merge[/] into {escape(m['profile_id'])} ({m['identifiers']} identifiers):")
        for part in m["from_profiles"]:
            console.print(f"    {escape(part['profile_id'])}: " + escape(", ".join(f"{i['type']}:{i['value']}" for i in part["identifiers"])))
    for sp in result["split_examples"]:
        console.print(f"[bold]split[/] of {escape(sp['profile_id'])} ({sp['identifiers']} identifiers) into:")
        for part in sp["into_profiles"]:
            console.print(f"    {escape(part['profile_id'])}: " + escape(", ".join(f"{i['type']}:{i['value']}" for i in part["identifiers"])))
    if result["stored_differs"]:
        console.print(f"[yellow]Note:[/] {result['stored_differs']} identifiers resolve differently from the stored tables even with "
                      "the rules in force (data arrived since the last `refinery identity resolve`).")
    console.print("Nothing was written. To apply: put the rules in the rules file, then run `refinery identity resolve`.")


def _read_rules(path: Path) -> Any:
    """The rules document in `path`, parsed (checked by the resolver that receives it)."""
    import json

    import yaml

    from refinery.identity.errors import IdentityRulesError

    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise IdentityRulesError(f"Cannot read the rules file {path}: {e.strerror}.", fix="Check the path given to --rules.") from e
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise IdentityRulesError(f"{path} is not valid YAML/JSON: {e}", fix="Fix the syntax; see docs/identity.md.") from e


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

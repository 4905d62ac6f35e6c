"""`refinery profiles`: look people up by any identifier, read their timeline, explain them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.tree import Tree

from refinery.cli.common import DataDirOption, JsonOption, client, console, print_json, print_table

app = typer.Typer(
    help=(
        "Profiles: the people identity resolution made from your identifiers, with merged traits and "
        "their event timeline.\n\nRun `refinery identity resolve` after new data to refresh them."
    ),
    no_args_is_help=True,
)

ProfileArg = typer.Argument(..., help="A profile id (prof_...) or an identifier as type:value, e.g. email:jane@example.com.")


def _fetch(c: Any, ref: str) -> dict[str, Any]:
    result: dict[str, Any] = c.profile(ref) if ref.startswith("prof_") else c.profile_lookup(ref)
    return result


@app.command("show")
def show(ref: str = ProfileArg, data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Show one profile: identifiers, merged traits (and where each came from), activity.

    Examples:
      refinery profiles show user_id:u-1042
      refinery profiles show email:Jane.Doe@Example.com     (normalised as identity resolution does)
      refinery profiles show prof_3f2a... --json
    """
    with client(data_dir) as c:
        p = _fetch(c, ref)
    if as_json:
        print_json(p)
        return
    if p.get("merged_into"):
        console.print(f"[yellow]{escape(p['requested_id'])} was merged into {escape(p['merged_into'])}[/]")
    console.print(f"[bold]{escape(p['profile_id'])}[/]  {p['event_count']} events from {', '.join(p['sources']) or '-'}, "
                  f"first seen {p['first_seen']}, last seen {p['last_seen']}")
    print_table([{"type": k, "values": ", ".join(v)} for k, v in sorted(p["identifiers"].items())], title="Identifiers")
    print_table(
        [{"trait": k, "value": v, "from": f"{p['trait_sources'][k]['source']} at {p['trait_sources'][k]['at']} ({p['trait_sources'][k]['policy']})"}
         for k, v in sorted(p["traits"].items())],
        columns=["trait", "value", "from"], title="Traits",
    )


@app.command("events")
def events(
    ref: str = ProfileArg,
    limit: int = typer.Option(50, help="How many events, newest first."),
    before: str = typer.Option(None, help="Only events before this ISO time (to page back)."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """The profile's event timeline, newest first, with the identifier that placed each event.

    Example:
      refinery profiles events user_id:u-1042 --limit 20
    """
    with client(data_dir) as c:
        p = _fetch(c, ref)
        rows = c.profile_events(p["profile_id"], limit, before)
    if as_json:
        print_json(rows)
        return
    print_table(rows, columns=["timestamp", "type", "event", "source", "matched_by", "message_id"], title=f"Events of {p['profile_id']}")


def _ident(i: dict[str, Any]) -> str:
    return escape(f"{i['type']}:{i['value']}")


@app.command("explain")
def explain(
    identifier: str = typer.Argument(..., help="An identifier as type:value, e.g. anonymous_id:5f1c..."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Explain a profile: which events linked its identifiers (the chain of evidence), the merges it
    absorbed, and what was kept apart from it and by which rule.

    Examples:
      refinery profiles explain email:jane@example.com
      refinery profiles explain anonymous_id:kiosk-7 --json
    """
    with client(data_dir) as c:
        x = c.explain(identifier)
    if as_json:
        print_json(x)
        return
    asked = x["identifier"]
    if not x.get("profile_id"):
        console.print(f"[yellow]{_ident(asked)} belongs to no profile: {asked['status']} ({asked['reason']})[/]")
        for r in x.get("refusals", []):
            console.print(f"  refused: {r['reason']} (message {r['message_id']}, {r['source']}, {r['event_time']})")
        return
    tree = Tree(f"[bold]{_ident(asked)}[/] is in profile [bold]{escape(x['profile_id'])}[/] with {len(x['identifiers'])} identifiers")
    nodes = {(asked["type"], asked["value"]): tree}
    for step in x["chain"]:
        parent = nodes.get((step["joined_to"]["type"], step["joined_to"]["value"]), tree)
        nodes[(step["identifier"]["type"], step["identifier"]["value"])] = parent.add(
            f"{_ident(step['identifier'])}  [dim]by {step['rule']} in message {escape(step['message_id'])} "
            f"({escape(step['source'])}, {step['event_time']}; {step['events']} events)[/]"
        )
    console.print(tree)
    if x["merges"]:
        console.print("[bold]Merges[/]")
        for m in x["merges"]:
            undone = f" [yellow](undone {m['undone_at']})[/]" if m["undone_at"] else ""
            console.print(f"  {escape(m['merged_profile_id'])} -> {escape(m['surviving_profile_id'])} at {m['merged_at']}{undone}")
    if x["refusals"]:
        console.print("[bold]Kept apart[/]")
        for r in x["refusals"]:
            other = f" and {_ident(r['other'])}" if r["other"] else ""
            apart = f" (profiles {', '.join(r['profiles_kept_apart'])})" if r["profiles_kept_apart"] else ""
            console.print(f"  {r['reason']}: {_ident(r['identifier'])}{other}{apart}, message {escape(str(r['message_id']))}")
    if x["probabilistic_links"]:
        console.print("[bold]Probabilistic links[/] (not merged; used only by policies that accept them)")
        for lk in x["probabilistic_links"]:
            console.print(f"  {lk['score']:.3f} {lk['method']}: {_ident(lk['a'])} ~ {_ident(lk['b'])}")


@app.command("persons")
def persons(
    threshold: float = typer.Option(0.99, help="Lowest link score accepted (match probability)."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Group profiles into persons by probabilistic links at or above a threshold (profiles never change).

    Links come from `POST /api/identity/match` (Splink person records, device signals). A link that
    would join two different user ids is refused and listed.

    Examples:
      refinery profiles persons --threshold 0.99
      refinery profiles persons --threshold 0.5 --json
    """
    with client(data_dir) as c:
        result = c.persons("probabilistic", threshold)
    if as_json:
        print_json(result)
        return
    console.print(
        f"{result['profiles']} profiles are {result['persons']} persons at threshold {threshold} "
        f"({result['links_used']} links used, {len(result['refused'])} refused by merge protection)."
    )
    rows = [{"person": k, "profiles": ", ".join(v)} for k, v in sorted(result["joined"].items())]
    if rows:
        print_table(rows, title="Profiles joined by links")
    for r in result["refused"]:
        console.print(f"  refused {r['method']} link {r['link_id'][:12]} ({r['score']:.3f}): {r['reason']} between {', '.join(r['profiles'])}")

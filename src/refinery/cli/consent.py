"""`refinery consent`: what a person agreed to, per purpose, with the receipts; record a choice; run the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from refinery.cli.common import DataDirOption, JsonOption, client, console, print_json, print_table
from refinery.governance.purposes import PURPOSES

app = typer.Typer(
    help=(
        "Consent per person and purpose (" + ", ".join(PURPOSES) + "): granted, denied or unknown, with the "
        "receipts that decided it.\n\nRun `refinery consent sync` after new events (and after `refinery identity "
        "resolve`) to read choices from them. See docs/consent.md."
    ),
    no_args_is_help=True,
)

IdentifierArg = typer.Argument(..., help="An identifier as type:value, e.g. email:jane@example.com or anonymous_id:5f1c...")


def _show(body: dict[str, Any]) -> None:
    where = f"profile {body['profile_id']}" if body.get("profile_id") else f"identifier (no profile: {body.get('identity_status') or 'not seen in events'})"
    console.print(f"[bold]{escape(body['identifier'])}[/]  {escape(where)}")
    print_table(
        [{"purpose": p, "state": s["state"], "since": s.get("at") or "-", "by": s.get("subject") or "-",
          "source": f"{s.get('origin') or '-'}/{s.get('source') or '-'}", "conflict": "yes" if s.get("conflict") else ""}
         for p, s in body["consent"].items()],
        columns=["purpose", "state", "since", "by", "source", "conflict"], title="Consent",
    )
    for c in body.get("conflicts", []):
        console.print(f"[yellow]{c['purpose']}: denied by {', '.join(d['subject'] for d in c['denied'])}; "
                      f"granted by {', '.join(g['subject'] for g in c['granted'])} - the denial wins[/]")
    print_table(
        [{"at": r["chosen_at"], "subject": r.get("subject", ""), "purpose": r["purpose"], "state": r["state"],
          "origin": r["origin"], "source": r["source"], "message/request": r.get("message_id") or r.get("request_id") or ""}
         for r in body["receipts"][:50]],
        columns=["at", "subject", "purpose", "state", "origin", "source", "message/request"], title="Receipts (newest first)",
    )


@app.command("show")
def show(identifier: str = IdentifierArg, limit: int = typer.Option(1000, help="Most receipts to fetch."),
         data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Show an identifier's consent (its profile's, when it has one) per purpose, with the receipts.

    Examples:
      refinery consent show email:jane@example.com
      refinery consent show anonymous_id:5f1c... --json
    """
    with client(data_dir) as c:
        body = c.consent(identifier, limit)
    if as_json:
        print_json(body)
    else:
        _show(body)


@app.command("set")
def set_(
    identifier: str = IdentifierArg,
    grant: list[str] = typer.Option([], "--grant", "-g", help=f"A purpose the person grants (repeat): {', '.join(PURPOSES)}."),
    deny: list[str] = typer.Option([], "--deny", help="A purpose the person denies (repeat)."),
    tcf: str = typer.Option(None, "--tcf", help="An IAB TCF v2 TC string the person's CMP produced."),
    data_dir: Path = DataDirOption, as_json: bool = JsonOption,
) -> None:
    """Record a choice (as a receipt from the API, by you).

    Examples:
      refinery consent set user_id:u-1042 --grant marketing --deny advertising
      refinery consent set anonymous_id:5f1c... --tcf CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA
    """
    purposes: dict[str, str] = {p: "granted" for p in grant}
    for p in deny:
        purposes[p] = "denied"  # both --grant and --deny: the denial
    with client(data_dir) as c:
        body = c.set_consent(identifier, purposes or None, tcf)
    if as_json:
        print_json(body)
        return
    console.print(f"Recorded {', '.join(f'{p} {s}' for p, s in sorted(body['choices'].items()))} (request {body['request_id']})")
    _show(body)


@app.command("sync")
def sync(full: bool = typer.Option(False, help="Re-read every event, not only those loaded since the last run."),
         data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Read consent from new events (categoryPreferences, TC strings) into the receipts; record conflicts.

    `refinery identity resolve` runs this too; run it alone after new events when profiles need no rebuild.

    Examples:
      refinery consent sync
      refinery consent sync --full --json
    """
    with client(data_dir) as c:
        report = c.sync_consent(full)
    if as_json:
        print_json(report)
        return
    console.print(f"{report['events']} events of {report['subjects']} identifiers read; {report['log_rows']} new receipts; "
                  f"{report['conflicts_open']} open conflicts ({report['conflicts_new']} new, {report['conflicts_resolved']} resolved).")
    if report["tcf_refused"]:
        print_table([{"reason": k, "strings": v} for k, v in report["tcf_refused"].items()], title="TC strings refused")
    if report["unknown_categories"]:
        print_table([{"category": k, "events": v} for k, v in report["unknown_categories"].items()],
                    title="Categories mapped to no purpose (setting consent_categories)")

"""`refinery privacy`: data subject requests - export everything held about a person, erase them
everywhere (with a receipt), and list the requests with their status and deadline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from refinery.cli.common import (
    DataDirOption,
    JsonOption,
    client,
    console,
    err_console,
    print_json,
    print_table,
)

app = typer.Typer(
    help=(
        "Data subject requests: `export` writes one JSON document of everything held about a person (every zone, "
        "the identity graph, consent, the vault's values in clear); `erase` forgets them everywhere, destroys their "
        "keys, keeps their identifiers on the suppression list so they cannot come back, and prints a receipt.\n\n"
        "See docs/privacy-requests.md."
    ),
    no_args_is_help=True,
)

IdentifierArg = typer.Argument(..., help="The person, as type:value: email:jane@example.com, user_id:u-1042, phone:+442079460958, anonymous_id:5f1c...")


def _receipt(body: dict[str, Any]) -> None:
    receipt = body.get("receipt") or {}
    colour = {"completed": "green", "rejected": "yellow", "failed": "red"}.get(body["status"], "white")
    console.print(f"[bold]{body['request_id']}[/]  {body['kind']}  [{colour}]{body['status']}[/]  due {body['due_at']}")
    if body.get("error"):
        console.print(escape(body["error"]))
    subject = receipt.get("subject") or {}
    if subject:
        console.print(f"{subject.get('profiles', 0)} profiles, {subject.get('identifiers', 0)} identifiers, "
                      f"{subject.get('events', 0)} events, {subject.get('keys', 0)} keys")
    stores = receipt.get("stores") or {}
    if stores:
        print_table([{"store": k, "rows": v} for k, v in stores.items()], ["store", "rows"], title="Per store")
    if body["kind"] == "erase" and body["status"] == "completed":
        console.print(f"Keys destroyed: {receipt.get('keys_destroyed', 0)}; suppression entries added: "
                      f"{receipt.get('suppression_entries_added', 0)}; destinations asked: "
                      f"{', '.join(receipt.get('destinations_asked') or []) or 'none'}")


@app.command("export")
def export(
    identifier: str = IdentifierArg,
    out: Path = typer.Option(None, "--out", "-o", help="Write the document here (mode 0600) instead of standard output.", dir_okay=False),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Export everything held about a person as one JSON document (it holds their personal data in clear).

    Examples:
      refinery privacy export email:jane@example.com --out jane.json
      refinery privacy export user_id:u-1042 --json > u-1042.json
    """
    with client(data_dir) as c:
        body = c.privacy_request("export", identifier)
    document = body.pop("document", None)
    if out is not None:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2, ensure_ascii=False)
        if as_json:
            print_json({**body, "document_file": str(out)})
        else:
            _receipt(body)
            console.print(f"Document written to {escape(str(out))}")
        return
    print_json(document if not as_json else {**body, "document": document})


@app.command("erase")
def erase(
    identifier: str = IdentifierArg,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Erase a person everywhere: zones, identity graph, profiles, consent, vault; destroy their keys;
    suppress their identifiers so new events, replays and re-imports cannot bring them back.

    This cannot be undone. The receipt (counts, no personal values) is kept with the request.

    Examples:
      refinery privacy erase email:jane@example.com
      refinery privacy erase user_id:u-1042 --yes --json
    """
    if not yes and not typer.confirm(f"Erase everything held about {identifier}? This cannot be undone", err=True):
        err_console.print("Nothing was erased.")
        raise typer.Exit(1)
    with client(data_dir) as c:
        body = c.privacy_request("erase", identifier)
    if as_json:
        print_json(body)
    else:
        _receipt(body)


@app.command("requests")
def list_(
    status: str = typer.Option(None, help="Only this status: received, in_progress, completed, failed, rejected."),
    limit: int = typer.Option(100, help="Most requests to show, newest first."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """List subject requests, newest first, with their status and due date.

    Examples:
      refinery privacy requests
      refinery privacy requests --status in_progress --json
    """
    with client(data_dir) as c:
        rows = c.privacy_requests(status, limit)
    if as_json:
        print_json(rows)
        return
    print_table([{"request": r["request_id"], "kind": r["kind"], "status": r["status"], "type": r.get("identifier_type") or "any",
                  "received": r["received_at"], "due": r["due_at"], "overdue": "yes" if r.get("overdue") else "",
                  "by": r["actor"]} for r in rows],
                ["request", "kind", "status", "type", "received", "due", "overdue", "by"], title="Subject requests")


@app.command("show")
def show(
    request_id: str = typer.Argument(..., help="A request id (dsr_...), from `refinery privacy requests`."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Show one request with its receipt (and, for an export, its document with --json).

    Examples:
      refinery privacy show dsr_3f2a...
      refinery privacy show dsr_3f2a... --json
    """
    with client(data_dir) as c:
        body = c.privacy_request_get(request_id)
    if as_json:
        print_json(body)
    else:
        body.pop("document", None)
        _receipt(body)


@app.command("compact")
def compact_(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Rewrite the database file so erased values leave its free blocks too (run with the server stopped).

    DuckDB keeps deleted rows' bytes in free blocks until they are reused; after an erasure, this
    makes the file itself free of them.

    Examples:
      refinery privacy compact
      refinery privacy compact --data-dir /var/lib/refinery --json
    """
    from refinery.cli.common import run, settings_from
    from refinery.privacy.compact import compact

    result = run(lambda: compact(settings_from(data_dir)))
    if as_json:
        print_json(result)
    else:
        console.print(f"Compacted: {result['bytes_before']:,} -> {result['bytes_after']:,} bytes.")

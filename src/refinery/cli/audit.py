"""`refinery audit`: read the hash-chained audit log and verify that no row was edited, deleted or moved."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from refinery.cli.common import DataDirOption, JsonOption, console, err_console, print_json, print_table
from refinery.cli.tokens import governance

app = typer.Typer(
    help=(
        "The audit log: every configuration change and every read of personal data, with who did it. "
        "Rows are hash-chained; `refinery audit verify` names any row that was edited, deleted or moved."
    ),
    no_args_is_help=True,
)


@app.command("list")
def list_(
    limit: int = typer.Option(50, help="How many rows (the newest, unless --after is given)."),
    after: int = typer.Option(None, help="Rows after this sequence number, oldest first."),
    action: str = typer.Option(None, help="Only this action or family, e.g. 'tokens' or 'profiles.read'."),
    actor: str = typer.Option(None, help="Only this actor (token id or name)."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """List audit rows in sequence order.

    Examples:
      refinery audit list
      refinery audit list --action profiles --limit 200
      refinery audit list --after 1200 --json
    """
    with governance(data_dir) as c:
        rows = c.audit_entries(limit, after, action, actor)
    if as_json:
        print_json(rows)
        return
    table = [{**r, "details": json.dumps(r["details"], sort_keys=True), "actor": f"{r['actor_name']} ({r['actor_id']})"} for r in rows]
    print_table(table, ["seq", "at", "actor", "action", "object", "details"])


@app.command("verify")
def verify(
    expect: str = typer.Option(None, "--expect", help="A head noted earlier (SEQ:HASH, as printed here); it must still be in the chain."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Check the hash chain; exit 1 and name each row that was edited, deleted or moved.

    Note the printed head somewhere else (a ticket, a log): `--expect` then also proves the log
    was not rewritten as a whole up to that point.

    Examples:
      refinery audit verify
      refinery audit verify --expect 1200:9f86d081884c7d65...
    """
    with governance(data_dir) as c:
        result = c.audit_verify(expect)
    if as_json:
        print_json(result)
    else:
        head = result["head"]
        if result["ok"]:
            console.print(f"[green]Audit log intact[/]: {result['rows']} rows. Head: {head['seq']}:{head['hash']}")
        else:
            for p in result["problems"]:
                err_console.print(f"[red]Row {p['seq']}[/] ({p['kind']}): {p['message']}")
            if result["expected_head_found"] is False:
                err_console.print(f"[red]The expected head {expect} is not in the chain[/]: the log was rewritten or cut before it.")
            err_console.print(f"[bold red]Audit log broken[/]: {len(result['problems'])} problem(s) in {result['rows']} rows.")
    if not result["ok"]:
        raise typer.Exit(1)

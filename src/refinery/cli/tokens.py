"""`refinery tokens`: API tokens with roles, optional source scopes and expiry (admin only)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from refinery.cli.common import (
    DataDirOption,
    JsonOption,
    connected,
    console,
    print_json,
    print_table,
)
from refinery.governance.client import GovernanceClient, connect

app = typer.Typer(
    help=(
        "API tokens for the admin API (/api/*). Each token has a role (admin, privacy_officer, marketer, "
        "analyst), may be limited to some sources, and expires. Only its hash is stored.\n\n"
        "The bootstrap admin token in <data_dir>/admin.token keeps working beside them. "
        "Roles and their permissions: docs/governance.md."
    ),
    no_args_is_help=True,
)


@contextmanager
def governance(data_dir: Path | None) -> Iterator[GovernanceClient]:
    """The store in-process, or a running server's admin API (with the bootstrap admin token)."""
    with connected(connect, data_dir) as c:
        yield c


@app.command("create")
def create(
    name: str = typer.Argument(..., help="A name to recognise the token by, e.g. 'jane-analyst'."),
    role: str = typer.Option(..., "--role", "-r", help="admin, privacy_officer, marketer or analyst."),
    sources: str = typer.Option(None, "--sources", help="Comma-separated sources the token is limited to (default: every source)."),
    expires: str = typer.Option(None, "--expires", help="Lifetime: 30d, 12h, 2w, or 'never' (default: the token_default_expiry setting, 90d)."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Create a token and print it (shown once; only its hash is stored).

    Examples:
      refinery tokens create jane --role analyst
      refinery tokens create web-team --role marketer --sources web,app --expires 30d
      refinery tokens create dpo --role privacy_officer --expires never --json
    """
    scope = [s.strip() for s in sources.split(",")] if sources is not None else None
    with governance(data_dir) as c:
        token = c.create_token(name, role, scope, expires)
    if as_json:
        print_json(token)
        return
    limited = f", sources {', '.join(token['sources'])}" if token["sources"] is not None else ", every source"
    until = f", expires {token['expires_at']}" if token["expires_at"] else ", never expires"
    console.print(f"Created token [bold]{token['name']}[/] ({token['token_id']}): role {token['role']}{limited}{until}.")
    console.print(f"Token: [bold green]{token['token']}[/]  (store it now; it is not shown again)")


@app.command("list")
def list_(
    all_: bool = typer.Option(False, "--all", help="Include revoked and expired tokens."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """List tokens: id, name, prefix (to recognise one), role, sources, state, expiry. Never the tokens.

    Examples:
      refinery tokens list
      refinery tokens list --all --json
    """
    with governance(data_dir) as c:
        rows = c.tokens(all_)
    if as_json:
        print_json(rows)
        return
    for r in rows:
        r["sources"] = ", ".join(r["sources"]) if r["sources"] is not None else "(all)"
    print_table(rows, ["token_id", "name", "token_prefix", "role", "sources", "state", "expires_at", "created_by"])


@app.command("revoke")
def revoke(
    ref: str = typer.Argument(..., help="The token's id, name, or the prefix shown in `tokens list`."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Revoke a token: it stops working at once (the row stays, for the audit trail).

    Example:
      refinery tokens revoke jane
    """
    with governance(data_dir) as c:
        token = c.revoke_token(ref)
    if as_json:
        print_json(token)
    else:
        console.print(f"Revoked token [bold]{token['name']}[/] ({token['token_id']}).")

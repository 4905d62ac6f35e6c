"""`refinery destinations`: where segments go (webhooks, files, ad-platform audiences, Redis, PostgreSQL, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from refinery.activation.client import ActivationClient, connect
from refinery.cli.common import DataDirOption, JsonOption, connected, console, print_json, print_table

app = typer.Typer(
    help=(
        "Destinations: where syncs deliver segment membership. Each has a kind (see `refinery destinations kinds`), "
        "the consent purpose it serves (advertising, marketing, personalisation or analytics: only profiles whose "
        "consent for it is granted are sent) and a configuration. Secret fields are stored encrypted and shown as ***."
    ),
    no_args_is_help=True,
)


def _client(data_dir: Path | None) -> Any:
    return connected(connect, data_dir)


def _config(config: str | None, sets: list[str] | None) -> dict[str, Any]:
    """--config JSON (or @FILE) and --set key=value pairs (a value that parses as JSON is taken as JSON)."""
    out: dict[str, Any] = {}
    if config:
        text = Path(config[1:]).read_text("utf-8") if config.startswith("@") else config
        try:
            loaded = json.loads(text)
        except ValueError as e:
            raise typer.BadParameter(f"not JSON: {e}", param_hint="--config") from None
        if not isinstance(loaded, dict):
            raise typer.BadParameter("give a JSON object", param_hint="--config")
        out.update(loaded)
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint="--set")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


ConfigOption = typer.Option(None, "--config", help="The configuration as a JSON object, or @FILE.")
SetOption = typer.Option(None, "--set", help="One configuration field as key=value (repeat).")


@app.command("kinds")
def kinds(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """The destination kinds this installation knows (built-ins and plug-ins), with their fields.

    Example:
      refinery destinations kinds
    """
    c: ActivationClient
    with _client(data_dir) as c:
        found = c.kinds()
    if as_json:
        print_json(found)
        return
    print_table([{"kind": k["kind"], "fields": ", ".join(k["fields"]), "secret": ", ".join(k["secret_fields"]),
                  "description": k["description"]} for k in found], title="Destination kinds")


@app.command("list")
def list_(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """List destinations with their outboxes (batches pending, being delivered, dead).

    Example:
      refinery destinations list --json
    """
    with _client(data_dir) as c:
        found = c.destinations()
    if as_json:
        print_json(found)
        return
    print_table([{"name": d["name"], "kind": d["kind"], "purpose": d["purpose"], "enabled": d["enabled"],
                  "pending": d["outbox"].get("pending", 0) + d["outbox"].get("delivering", 0), "dead": d["outbox"].get("dead", 0)}
                 for d in found], columns=["name", "kind", "purpose", "enabled", "pending", "dead"], title="Destinations")


@app.command("show")
def show(name: str = typer.Argument(...), data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """One destination: kind, purpose, configuration (secrets as ***), its syncs and outbox.

    Example:
      refinery destinations show crm
    """
    with _client(data_dir) as c:
        d = c.destination(name)
    if as_json:
        print_json(d)
        return
    console.print(f"[bold]{escape(d['name'])}[/] ({escape(d['kind'])}, purpose {d['purpose']}, {'enabled' if d['enabled'] else 'disabled'})")
    for k, v in sorted(d["config"].items()):
        console.print(f"  {escape(k)} = {escape(json.dumps(v))}")
    console.print(f"Syncs: {', '.join(d['syncs']) or 'none'}; outbox: {d['outbox'] or 'empty'}")


@app.command("create")
def create(
    name: str = typer.Argument(..., help="Lower-case letters, digits, '_' or '-'."),
    kind: str = typer.Option(..., "--kind", help="A kind from `refinery destinations kinds`, e.g. webhook."),
    purpose: str = typer.Option(..., "--purpose", help="advertising, marketing, personalisation or analytics."),
    config: str = ConfigOption,
    sets: list[str] = SetOption,
    description: str = typer.Option(None, "--description"),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Save a destination; its configuration is checked by its kind first.

    Examples:
      refinery destinations create crm --kind webhook --purpose marketing --set url=https://crm.example.com/hook --set secret=...
      refinery destinations create exports --kind files --purpose analytics --config '{"folder": "/srv/exports", "format": "parquet"}' --json
    """
    with _client(data_dir) as c:
        d = c.create_destination(name, kind, purpose, _config(config, sets), description)
    if as_json:
        print_json(d)
    else:
        console.print(f"Destination [bold]{escape(name)}[/] saved ({escape(kind)}, purpose {purpose})"
                      + (f"; secrets sealed: {', '.join(d['secret_fields'])}." if d["secret_fields"] else "."))


@app.command("update")
def update(
    name: str = typer.Argument(...),
    config: str = ConfigOption,
    sets: list[str] = SetOption,
    purpose: str = typer.Option(None, "--purpose"),
    description: str = typer.Option(None, "--description"),
    enable: bool = typer.Option(None, "--enable/--disable", help="A disabled destination keeps its outbox until enabled again."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Change a destination. A new --config replaces the configuration (secret fields left out keep their values).

    Example:
      refinery destinations update crm --set timeout_seconds=5 --config @crm.json
    """
    new_config = _config(config, sets) if (config or sets) else None
    with _client(data_dir) as c:
        d = c.update_destination(name, config=new_config, purpose=purpose, description=description, enabled=enable)
    if as_json:
        print_json(d)
    else:
        console.print(f"Destination [bold]{escape(name)}[/] updated.")


@app.command("delete")
def delete(name: str = typer.Argument(...), yes: bool = typer.Option(False, "--yes", help="Do not ask."),
           data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Delete a destination (refused while a sync uses it); its outbox and dead letters go with it.

    Example:
      refinery destinations delete crm --yes
    """
    if not yes and not as_json:
        typer.confirm(f"Delete destination {name!r} and its undelivered batches?", abort=True)
    with _client(data_dir) as c:
        result = c.delete_destination(name)
    if as_json:
        print_json(result)
    else:
        console.print(f"Destination [bold]{escape(name)}[/] deleted ({result['pending_batches_dropped']} undelivered batches dropped).")

"""`refinery features`: named, versioned features and point-in-time training sets (docs/features.md)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from refinery.cli.common import DataDirOption, JsonOption, connected, console, print_json, print_table
from refinery.features.client import FeaturesClient, connect

app = typer.Typer(
    help=(
        "Features: values per profile for machine learning, each an aggregate in the segment language, e.g.\n\n"
        "  count of 'Order Completed' in last 90 days\n\n"
        "or a checked SQL SELECT of profile_id, value over the events as of $as_of. Every change is a new version. "
        "`training-set` gives each row's features as they were at the row's time (no leakage). "
        "Give a definition as text, or @FILE."
    ),
    no_args_is_help=True,
)


def _client(data_dir: Path | None) -> Any:
    return connected(connect, data_dir)


def _text(text: str) -> str:
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise typer.BadParameter(f"{path} is not a file", param_hint="DEFINITION")
        return path.read_text("utf-8")
    return text


SqlOption = typer.Option(False, "--sql", help="The definition is a SELECT of profile_id, value (see docs/features.md#sql-features).")
WindowOption = typer.Option(None, "--window", help="e.g. '90 days' (an expression without a window of its own).")
TtlOption = typer.Option(None, "--ttl", help="How long a materialised value may be served, e.g. '1 day'.")
OwnerOption = typer.Option(None, "--owner", help="Who answers for the feature (default: you).")
DescriptionOption = typer.Option(None, "--description")


def _summary(f: dict[str, Any]) -> str:
    changed = "" if f.get("changed", True) else " (unchanged: no new version)"
    return f"Feature [bold]{escape(f['name'])}[/] version {f['version']} ({f['kind']}, {f.get('value_type') or 'unknown'}){changed}."


@app.command("create")
def create(
    name: str = typer.Argument(..., help="Letters, digits and '_', e.g. orders_90d."),
    definition: str = typer.Argument(..., help="The expression or SELECT, or @FILE."),
    sql: bool = SqlOption, window: str = WindowOption, ttl: str = TtlOption, owner: str = OwnerOption,
    description: str = DescriptionOption, data_dir: Path = DataDirOption, as_json: bool = JsonOption,
) -> None:
    """Define a feature (compiled first: a bad one is refused with the place and the fix).

    Examples:
      refinery features create orders_90d "count of 'Order Completed'" --window "90 days"
      refinery features create lifetime_value "sum(total) of 'Order Completed'" --ttl "1 day" --json
      refinery features create active_days --sql @active_days.sql
    """
    with _client(data_dir) as c:
        f = c.define(name, _text(definition), create=True, kind="sql" if sql else "expression", window=window, ttl=ttl,
                     owner=owner, description=description)
    if as_json:
        print_json(f)
        return
    console.print(_summary(f))


@app.command("update")
def update(
    name: str = typer.Argument(...), definition: str = typer.Argument(..., help="The new expression or SELECT, or @FILE."),
    sql: bool = SqlOption, window: str = WindowOption, ttl: str = TtlOption, owner: str = OwnerOption,
    description: str = DescriptionOption, data_dir: Path = DataDirOption, as_json: bool = JsonOption,
) -> None:
    """Save a new version of a feature (the old ones stay: NAME@VERSION).

    Example:
      refinery features update orders_90d "count of 'Order Completed' where total > 0" --window "90 days"
    """
    with _client(data_dir) as c:
        f = c.define(name, _text(definition), create=False, kind="sql" if sql else "expression", window=window, ttl=ttl,
                     owner=owner, description=description)
    if as_json:
        print_json(f)
        return
    console.print(_summary(f))


@app.command("list")
def list_(data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Every live feature with its version in force.

    Example:
      refinery features list --json
    """
    with _client(data_dir) as c:
        rows = c.features()
    if as_json:
        print_json(rows)
        return
    print_table(rows, ["name", "version", "kind", "value_type", "window", "ttl_seconds", "owner", "definition"], title="features")


@app.command("show")
def show(name: str = typer.Argument(...), data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """A feature and every version of it.

    Example:
      refinery features show orders_90d
    """
    with _client(data_dir) as c:
        f = c.feature(name)
    if as_json:
        print_json(f)
        return
    console.print(_summary(f))
    print_table(f["versions"], ["version", "kind", "window", "ttl_seconds", "owner", "created_by", "created_at", "definition"], title="versions")


@app.command("delete")
def delete(name: str = typer.Argument(...), data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """Delete a feature (its versions stay, so past training sets can be rebuilt with NAME@VERSION).

    Example:
      refinery features delete orders_90d
    """
    with _client(data_dir) as c:
        result = c.delete(name)
    if as_json:
        print_json(result)
        return
    console.print(f"Feature [bold]{escape(name)}[/] deleted (version {result['version']} was in force).")


def _rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text("utf-8")
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    loaded = json.loads(text)
    if not isinstance(loaded, list):
        raise typer.BadParameter("give a JSON array of objects, JSON lines or CSV", param_hint="ROWS")
    return loaded


@app.command("training-set")
def training_set(
    rows: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV, JSON lines or a JSON array: profile_id, timestamp, label."),
    feature: list[str] = typer.Option(..., "--feature", "-f", help="A feature (NAME or NAME@VERSION); repeat."),
    label: str = typer.Option("label", "--label", help="The label's column."),
    retrieval: bool = typer.Option(False, "--retrieval", help="Plain retrieval: labels optional, one class allowed."),
    drop_unknown: bool = typer.Option(False, "--drop-unknown", help="Drop rows of profiles the store does not know (reported) instead of refusing."),
    out: Path = typer.Option(None, "--out", "-o", help="Write CSV here instead of printing."),
    data_dir: Path = DataDirOption, as_json: bool = JsonOption,
) -> None:
    """Each row's features as they were at the row's timestamp: only events that had happened and been
    received by then count.

    Example:
      refinery features training-set labels.csv -f orders_90d -f lifetime_value@2 --label churned -o train.csv
    """
    client: FeaturesClient
    with _client(data_dir) as client:
        result = client.training_set(_rows(rows), feature, label, "retrieval" if retrieval else "training",
                                     "drop" if drop_unknown else "refuse")
    report = {k: v for k, v in result.items() if k not in ("columns", "rows")}
    if as_json:
        print_json(result)
        return
    if out is not None:
        with out.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(result["columns"])
            w.writerows(result["rows"])
        console.print(f"{len(result['rows'])} rows written to {escape(str(out))}. {json.dumps(report)}")
        return
    print_table([dict(zip(result["columns"], r, strict=True)) for r in result["rows"]], result["columns"], title="training set")
    console.print(json.dumps(report))


@app.command("materialize")
def materialize(
    names: list[str] = typer.Argument(None, help="Features to materialise (default: all)."),
    full: bool = typer.Option(False, "--full", help="Recompute every profile, even when an incremental run would do."),
    data_dir: Path = DataDirOption, as_json: bool = JsonOption,
) -> None:
    """Fill the online store with each feature's latest value per profile (the training sets' own SQL, as of now).

    Only the profiles whose events arrived since the last run are recomputed when that gives the
    same values as a full run (no feature moves with time by itself, identities only grew); the
    result says which it was and why. `refinery serve` also runs this on a schedule.

    Examples:
      refinery features materialize
      refinery features materialize spend orders_90d --json
      refinery features materialize --full
    """
    with _client(data_dir) as c:
        result = c.materialize(list(names or []), full)
    if as_json:
        print_json(result)
        return
    console.print(f"{result['mode'].capitalize()} materialisation into the {result['store']} store: {len(result['features'])} feature(s), "
                  f"{result['profiles']:,} profile(s), {result['values']:,} value(s) in {result['seconds']} s ({escape(result['reason'])}).")
    for name, problem in result.get("errors", {}).items():
        console.print(f"[yellow]{escape(name)}[/]: {escape(problem)}")


@app.command("get")
def get(profile_id: str = typer.Argument(..., help="A profile id (a merged one answers with its survivor's)."),
        data_dir: Path = DataDirOption, as_json: bool = JsonOption) -> None:
    """A profile's served features from the online store (stale ones, older than their TTL, have no value).

    Examples:
      refinery features get p_3f2a... --json
    """
    with _client(data_dir) as c:
        result = c.profile_features(profile_id)
    if as_json:
        print_json(result)
        return
    rows = [{"feature": k, **v} for k, v in result["features"].items()]
    title = f"features of {result['profile_id_now']}" + (f" (asked: {result['profile_id']})" if result["profile_id"] != result["profile_id_now"] else "")
    print_table(rows, ["feature", "version", "value", "status", "as_of", "expires_at"], title=title)

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


def _moment(text: str | None, option: str) -> Any:
    from datetime import UTC, datetime

    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time such as 2026-01-31T12:00:00Z", param_hint=option) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@app.command("export-feast")
def export_feast(
    folder: Path = typer.Argument(..., file_okay=False, help="A new or empty folder for the Feast repository."),
    feature: list[str] = typer.Option(None, "--feature", "-f", help="A feature to export (NAME or NAME@VERSION); repeat. Default: all."),
    project: str = typer.Option("refinery", "--project", help="The Feast project's name (letters, digits, '_')."),
    since: str = typer.Option(None, "--since", help="First moment of the exported history (default: when the first event was known)."),
    as_of: str = typer.Option(None, "--as-of", help="Last moment of the exported history (default: now)."),
    replace: bool = typer.Option(False, "--replace", help="Replace an earlier export in FOLDER."),
    data_dir: Path = DataDirOption, as_json: bool = JsonOption,
) -> None:
    """Write a Feast feature repository: feature_store.yaml (file offline store, SQLite online store in
    FOLDER/data), refinery_features.py (the profile entity, a FileSource and FeatureView per TTL) and
    Parquet of every profile's values at each moment one changed, computed by Refinery's offline store,
    so Feast's point-in-time retrieval gives the values `training-set` gives. Expression features only.
    Runs on the store itself: stop `refinery serve` first.

    Examples:
      refinery features export-feast ./feast_repo
      refinery features export-feast ./feast_repo -f orders_90d -f spend --since 2026-01-01 --replace
      cd feast_repo && feast apply && feast materialize 2026-01-01T00:00:00 $(date -u +%Y-%m-%dT%H:%M:%S)
    """
    from refinery.api.server import running_server
    from refinery.cli.common import fail, settings_from
    from refinery.errors import RefineryError
    from refinery.features.errors import FeatureError
    from refinery.features.feast import export_audited
    from refinery.features.online import close_store
    from refinery.governance.principal import local_principal
    from refinery.runtime import Runtime

    settings = settings_from(data_dir)
    try:
        if running_server(settings) is not None:
            raise FeatureError("refinery serve holds this store, and the export reads it in this process.",
                               fix="Stop the server, export, and start it again (or call refinery.features.feast.export_feast "
                                   "in Python within the serving process).")
        rt = Runtime.open(settings)
        try:
            result = export_audited(rt, local_principal(), folder, list(feature or []) or None, project=project,
                                    since=_moment(since, "--since"), as_of=_moment(as_of, "--as-of"), replace=replace)
        finally:
            close_store(rt.engine)
            rt.close()
    except RefineryError as e:
        fail(e)
        return
    if as_json:
        print_json(result.to_dict())
        return
    console.print(f"Feast repository written to [bold]{escape(str(folder))}[/]: {len(result.features)} feature(s), "
                  f"{result.profiles:,} profile(s), from {result.since} to {result.as_of}, in {result.seconds} s.")
    print_table([{"view": v.name, "ttl_seconds": v.ttl_seconds, "features": ", ".join(v.features), "rows": v.rows, "path": v.path}
                 for v in result.views], ["view", "ttl_seconds", "features", "rows", "path"], title="feature views")
    console.print(f"Next: cd {escape(str(folder))} && feast apply && feast materialize {result.since} {result.as_of}")

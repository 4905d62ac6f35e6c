"""The `refinery` command: a thin layer over the library (see `refinery --help`)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from refinery.cli import (
    audit,
    consent,
    context,
    destinations,
    events,
    features,
    identity,
    lineage,
    plans,
    privacy,
    profiles,
    retention,
    segments,
    sources,
    syncs,
    tokens,
)
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
        "Refinery: collect events from the SDKs you already use, import CRM exports, and keep every event "
        "either clean or quarantined with a reason.\n\n"
        "Start with `refinery demo`, then `refinery serve` and point a Segment SDK at it."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(sources.app, name="sources")
app.add_typer(events.app, name="events")
app.add_typer(plans.app, name="plans")
app.add_typer(identity.app, name="identity")
app.add_typer(profiles.app, name="profiles")
app.add_typer(tokens.app, name="tokens")
app.add_typer(audit.app, name="audit")
app.add_typer(consent.app, name="consent")
app.add_typer(retention.app, name="retention")
app.command("lineage")(lineage.show)
app.add_typer(privacy.app, name="privacy")
app.add_typer(segments.app, name="segments")
app.add_typer(destinations.app, name="destinations")
app.add_typer(syncs.app, name="syncs")
app.add_typer(features.app, name="features")
app.command("context")(context.show)


@app.command()
def serve(
    host: str = typer.Option(None, help="Address to bind (default 127.0.0.1, or REFINERY_HOST)."),
    port: int = typer.Option(None, help="Port (default 8088, or REFINERY_PORT; 0 picks a free one)."),
    data_dir: Path = DataDirOption,
) -> None:
    """Run the collector (Segment HTTP API at /v1/*), the admin API (/api/*), /health and /metrics.

    Examples:
      refinery serve
      refinery serve --port 9000 --data-dir /var/lib/refinery
      REFINERY_HOST=0.0.0.0 refinery serve
    """
    from refinery.api.server import serve as run_server

    settings = run(lambda: settings_from(data_dir, host=host, port=port))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(lambda: run_server(settings, on_ready=lambda url: console.print(f"Refinery listening on [bold]{url}[/] (data: {settings.data_dir})")))


@app.command()
def query(
    sql: str = typer.Argument(..., help="One read-only SELECT over the zones, e.g. \"SELECT type, count(*) FROM events GROUP BY 1\"."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
    limit: int = typer.Option(10_000, help="Most rows to return."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Run read-only SQL over the zones: events, raw_events, failed_events, sources, imports.

    Anything that writes, reads files or the environment is refused. Output as a table, CSV or JSON.

    Examples:
      refinery query "SELECT type, count(*) AS n FROM events GROUP BY 1 ORDER BY n DESC"
      refinery query "SELECT reason, count(*) FROM failed_events GROUP BY 1" --format csv > reasons.csv
      refinery query "SELECT * FROM events ORDER BY timestamp DESC LIMIT 5" --json
      refinery query "DESCRIBE events"
    """
    with client(data_dir) as c:
        result = c.query(sql, limit)
    cols, rows = result["columns"], result["rows"]
    if as_json or fmt == "json":
        print_json([dict(zip(cols, r, strict=True)) for r in rows])
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        w.writerows(rows)
        typer.echo(buf.getvalue(), nl=False)
    elif fmt == "table":
        print_table([dict(zip(cols, r, strict=True)) for r in rows], cols)
        if result.get("truncated"):
            console.print(f"[yellow]Showing the first {limit} rows; raise --limit for more.[/]")
    else:
        raise typer.BadParameter("use table, csv or json", param_hint="--format")


@app.command()
def catalog(
    source: str = typer.Option(None, help="Only this source."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Show which events arrive, per source, with counts, first/last seen, property and trait types.

    A property's (or trait's) type is its most common JSON type; --json lists every type seen with counts.

    Examples:
      refinery catalog
      refinery catalog --source web --json
    """
    with client(data_dir) as c:
        cat = c.catalog(source)
    if as_json:
        print_json(cat)
        return
    rows = [
        {
            "source": e["source"], "type": e["type"], "event": e["event"], "count": e["count"],
            "first_seen": e["first_seen"], "last_seen": e["last_seen"],
            "properties": ", ".join(f"{k}:{v['type']}" for k, v in sorted(e["properties"].items())),
            "traits": ", ".join(f"{k}:{v['type']}" for k, v in sorted(e["traits"].items())),
        }
        for e in cat["events"]
    ]
    print_table(rows, title="Event catalog")


@app.command("import")
def import_(
    path: Path = typer.Argument(..., help="A CSV, JSON lines (.jsonl/.ndjson) or Parquet file.", exists=True, dir_okay=False),
    source: str = typer.Option(..., "--source", "-s", help="Source name for these rows (created as an import source if new)."),
    mapping: Path = typer.Option(..., "--mapping", "-m", help="Mapping file (YAML or JSON): see docs/import.md.", exists=True, dir_okay=False),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Import a CRM export or event file through a mapping; bad rows go to the failed zone.

    Re-importing the same file adds nothing: message ids come from the source and each row's key.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from refinery.ingest.mapping import load_mapping_file

    spec = run(lambda: load_mapping_file(mapping))
    with client(data_dir) as c, Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[rows]} rows"), TimeElapsedColumn(),
        console=console, disable=as_json, transient=False,
    ) as progress:
        task = progress.add_task(f"Importing {escape(path.name)}", total=None, rows=0)

        def on_progress(job: dict[str, Any]) -> None:
            progress.update(task, rows=job.get("rows_read", 0), total=job.get("rows_total"), completed=job.get("rows_read", 0))

        job = c.import_file(path, source, spec, on_progress)
    if as_json:
        print_json(job)
        return
    colour = "green" if job["status"] == "completed" else "red"
    console.print(
        f"[{colour}]{job['status']}[/]: {job['rows_read']} rows read, {job['rows_loaded']} loaded, "
        f"{job['rows_duplicate']} already imported, {job['rows_failed']} failed"
        + (f", {job['rows_suppressed']} of erased people left out (suppression list)." if job.get("rows_suppressed") else ".")
    )
    if job.get("error"):
        console.print(f"[red]{escape(job['error'])}[/]")
    if job["rows_failed"]:
        console.print(f"See them with: refinery events failed --source {source}")


@app.command()
def version() -> None:
    """Print the Refinery version.

    Example:
      refinery version
    """
    from refinery import __version__

    typer.echo(__version__)


def main() -> None:
    import importlib

    try:  # registered last: it pulls in the world generator
        demo = importlib.import_module("refinery.cli.demo")
    except ModuleNotFoundError as e:
        if e.name != "refinery.cli.demo":
            raise
    else:
        app.command(name="demo")(demo.demo)
    app()



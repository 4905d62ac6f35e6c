"""`refinery lineage TABLE|PROFILE`: the job runs behind a table, or where a profile's data came from.

One command (registered with `app.command` in cli/main.py), not a sub-app: a Typer group would take
its options only before the target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from refinery.cli.common import DataDirOption, JsonOption, client, console, print_json, print_table


def _runs(runs: list[dict[str, Any]], title: str, table: str | None = None) -> None:
    rows = []
    for r in runs:
        row = {"started": r["started_at"], "job": r["job"], "state": r["state"], "run": r["run_id"]}
        if table:
            row["role"] = ", ".join(w for w, names in (("read", r["inputs"]), ("wrote", r["outputs"])) if table in names)
            row["rows"] = r["counts"].get(table)
        row["ids"] = ", ".join(f"{k}={v}" for k, v in r["details"].items() if k.endswith("_id"))
        row["error"] = r["error"] or ""
        rows.append(row)
    print_table(rows, title=title)


def show(
    target: str = typer.Argument(..., help="A table (events, profiles, identities...), a profile id (prof_...) or an identifier (type:value)."),
    limit: int = typer.Option(50, help="Most runs (for a table) or messages (for a profile) to list."),
    data_dir: Path = DataDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Show lineage: for a table, the job runs that read or wrote it, newest first; for a profile, the
    resolution runs that produced it and its events' sources, message ids and import files.

    Every batch job (import, identity resolution, overrides, the incremental follower, matching, consent
    records and syncs, retention) emits OpenLineage run events to <data_dir>/lineage/events.jsonl (and to
    lineage_url when set). See docs/lineage.md.

    Examples:
      refinery lineage profiles
      refinery lineage identity_overrides       # each override's run, with its override_id
      refinery lineage prof_3f2a... --json
      refinery lineage user_id:u-123
    """
    with client(data_dir) as c:
        trail = c.lineage(target, limit)
    if as_json:
        print_json(trail)
        return
    if trail["kind"] == "table":
        _runs(trail["runs"], f"Runs that read or wrote {trail['table']} ({trail['total_runs']} in all, newest first)", trail["table"])
        return
    console.print(f"Profile {trail['profile_id']}: {trail['total_events']} events, built at {trail['updated_at']}.")
    _runs(trail["produced_by"] or trail["resolution_runs"][:1],
          "Produced by" if trail["produced_by"] else "Latest resolution run (none found spanning the profile's build time)")
    print_table([{"source": s["source"], "events": s["events"], "raw messages": s["raw_messages"], "import": s["import_id"] or "",
                  "file": s["stored_path"] or "", "last received": s["last_received"]} for s in trail["sources"]],
                title="Where its events came from")
    print_table([{k: m[k] for k in ("source", "message_id", "raw_id", "import_id", "received_at")} for m in trail["messages"]],
                title=f"Messages (newest {len(trail['messages'])})")

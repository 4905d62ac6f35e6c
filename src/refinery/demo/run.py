"""`refinery demo`, end to end: generate the world, write its files, send it through the real
server, import the CRM export, resolve identities into profiles, and summarise what landed in each
zone and how resolution scores against the world's ground truth.

Re-runnable on the same data dir: the first run records the world's seed, size and clock in
`<data_dir>/demo/world.json`, so a second run regenerates the identical world, skips events the
raw zone already holds, and re-imports the same CSV (which the importer absorbs as duplicates).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from refinery.api.auth import admin_token
from refinery.client import Client, RemoteClient
from refinery.demo import activation as demo_activation
from refinery.demo import crm, groundtruth
from refinery.demo import identity as demo_identity
from refinery.demo import privacy as demo_privacy
from refinery.demo.send import send_events
from refinery.demo.server import demo_server
from refinery.demo.world import APP_SOURCE, CLEAN, CRM_SOURCE, WEB_SOURCE, World, generate
from refinery.errors import ConfigurationError, RefineryError
from refinery.segments.demo import define_demo_segments
from refinery.settings import Settings

DEFAULT_PEOPLE = 200
DEFAULT_SEED = 7
COLLECTOR_SOURCES = (WEB_SOURCE, APP_SOURCE)
ALL_SOURCES = (*COLLECTOR_SOURCES, CRM_SOURCE)

#: How the CRM export's columns become identify calls (docs/import.md); also written next to the CSV.
CRM_MAPPING: dict[str, Any] = {
    "type": "identify",
    "user_id": "customer_id",
    "crm_id": {"column": "customer_id", "name": "crm_id"},
    "email": "email",
    "phone": "phone",
    "timestamp": {"column": "updated_at", "format": "iso"},
    "traits": {
        "firstName": "first_name",
        "lastName": "last_name",
        "city": "city",
        "country": "country",
        "webUserId": "web_user_id",
        "marketingOptIn": {"column": "marketing_opt_in", "type": "string"},
        "lifetimeValue": {"column": "lifetime_value", "type": "double"},
    },
    "row_key": ["customer_id"],
}


class Reporter:
    """What the demo tells its caller while it works; the CLI draws these with rich."""

    def stage(self, text: str) -> None: ...
    def sending(self, total: int) -> None: ...
    def sent(self, n: int) -> None: ...


@dataclass
class DemoPaths:
    folder: Path

    @property
    def manifest(self) -> Path:
        return self.folder / "world.json"

    @property
    def ground_truth(self) -> Path:
        return self.folder / "ground_truth.json"

    @property
    def event_truth(self) -> Path:
        return self.folder / "event_truth.csv"

    @property
    def crm_csv(self) -> Path:
        return self.folder / "crm_export.csv"

    @property
    def crm_mapping(self) -> Path:
        return self.folder / "crm_mapping.json"

    @property
    def server_log(self) -> Path:
        return self.folder / "server.log"


@dataclass
class DemoSummary:
    data_dir: str
    seed: int
    people: int
    rerun: bool
    server: dict[str, Any]
    events: dict[str, Any]
    zones: dict[str, Any]
    crm: dict[str, Any]
    ground_truth: dict[str, Any]
    identity: dict[str, Any] = field(default_factory=dict)
    segments: dict[str, Any] = field(default_factory=dict)
    activation: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    next_commands: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir, "seed": self.seed, "people": self.people, "rerun": self.rerun, "server": self.server,
            "events": self.events, "zones": self.zones, "crm": self.crm, "ground_truth": self.ground_truth,
            "identity": self.identity, "segments": self.segments, "activation": self.activation, "privacy": self.privacy,
            "next_commands": self.next_commands,
        }


def run_demo(settings: Settings, *, people: int = DEFAULT_PEOPLE, seed: int = DEFAULT_SEED, reporter: Reporter | None = None) -> DemoSummary:
    """Generate, send, import and summarise (see the module docstring)."""
    report = reporter or Reporter()
    paths = DemoPaths(settings.data_dir / "demo")
    paths.folder.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(paths, seed, people)
    rerun = manifest is not None
    now = datetime.fromisoformat(manifest["now"]) if manifest else datetime.now(UTC)

    report.stage(f"Generating a world of {people} people (seed {seed})")
    world = generate(people, seed, now)
    _write_files(world, paths)
    rules_written = demo_identity.ensure_rules_file(settings.identity_rules_path)

    report.stage("Starting the Refinery server" if _no_server(settings) else "Using the running Refinery server")
    with demo_server(settings, paths.server_log) as server, RemoteClient(server.url, admin_token(settings)) as api:
        keys = _ensure_sources(api, paths, manifest, world)
        present = _present_message_ids(api, len(world.events))
        to_send = [e for e in world.events if e.message_id not in present]
        sent = 0
        if to_send:
            skipped = f" ({len(present)} already stored)" if present else ""
            report.stage(f"Sending {len(to_send)} events{skipped} with segment-analytics-python to {server.url}")
            report.sending(len(to_send))
            sent = send_events(server.url, keys, to_send, report.sent)
        else:
            report.stage(f"All {len(world.events)} events are already stored; nothing to send")

        report.stage(f"Importing the CRM export ({len(world.crm_rows)} rows) through the importer")
        job = api.import_file(paths.crm_csv, CRM_SOURCE, CRM_MAPPING, None)
        if job.get("status") != "completed":
            raise RefineryError(
                f"The CRM import {job.get('import_id')} ended {job.get('status')!r}: {job.get('error') or 'no error given'}.",
                fix=f"Inspect it with: refinery query \"SELECT * FROM imports\" --data-dir {settings.data_dir}",  # noqa: S608 - advice text
            )
        zones = _zone_counts(api)

        report.stage("Resolving identities into profiles" + (f" (rules written to {settings.identity_rules_path})" if rules_written else ""))
        resolution = api.resolve_identities()
        report.stage("Matching CRM person records with Splink, and device signals (probabilistic links, kept apart)")
        matching = api.match_identities()
        persons = api.persons("probabilistic", settings.matching_person_threshold)
        truth = groundtruth.build(world)
        identity = demo_identity.summarise(api, truth, resolution, persons)
        identity["matching"] = matching
        identity["rules_file"] = str(settings.identity_rules_path)
        example = _explain_example(api) or _sample_user(world)
        report.stage("Segments: defining a few audiences, computing their members and explaining one")
        segments = define_demo_segments(api)
        report.stage(f"Activation: delivering the {demo_activation.SEGMENT!r} segment to a webhook receiver on loopback and to files")
        activation = demo_activation.run(api, server.url, admin_token(settings), paths.folder)
        report.stage("Privacy: exporting one person's data, erasing another with a receipt, then sending an event for the erased person")
        privacy = demo_privacy.run(api, world, paths.folder, server.url, keys[WEB_SOURCE])
        zones = _zone_counts(api)
    summary = _summary(settings, world, paths, server.url, server.started_by_demo, rerun, sent, len(present), job, zones, example,
                       demo_privacy.erased_person(paths.folder))
    summary.identity = identity
    summary.segments = segments
    summary.privacy = privacy
    summary.activation = activation
    return summary


# --- files ------------------------------------------------------------------------------------

def _read_manifest(paths: DemoPaths, seed: int, people: int) -> dict[str, Any] | None:
    if not paths.manifest.exists():
        return None
    try:
        manifest: dict[str, Any] = json.loads(paths.manifest.read_text("utf-8"))
        earlier = (int(manifest["seed"]), int(manifest["people"]))
        datetime.fromisoformat(manifest["now"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigurationError(
            f"{paths.manifest} is not a demo manifest ({e}).", fix="Delete the demo folder's world.json, or use another --data-dir."
        ) from e
    if earlier != (seed, people):
        raise ConfigurationError(
            f"This data dir already holds the demo world with seed {earlier[0]} and {earlier[1]} people, not seed {seed} and {people}.",
            fix=f"Re-run with --seed {earlier[0]} --people {earlier[1]}, or use another --data-dir for a different world.",
            field="people",
        )
    return manifest


def _write_manifest(paths: DemoPaths, world: World, keys: dict[str, str]) -> None:
    """Seed, size, clock and the demo sources' write keys (owner-only: the keys let anyone send)."""
    body = {"seed": world.seed, "people": world.size, "now": world.now.isoformat(), "write_keys": keys}
    tmp = paths.manifest.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2)
    tmp.replace(paths.manifest)


def _write_files(world: World, paths: DemoPaths) -> None:
    paths.ground_truth.write_text(json.dumps(groundtruth.build(world), indent=1, ensure_ascii=False), "utf-8")
    with open(paths.event_truth, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(groundtruth.EVENT_TRUTH_COLUMNS)
        w.writerows(groundtruth.event_truth(world))
    with open(paths.crm_csv, "w", newline="", encoding="utf-8") as f:
        rows = csv.DictWriter(f, fieldnames=crm.COLUMNS)
        rows.writeheader()
        rows.writerows(r.values for r in world.crm_rows)
    paths.crm_mapping.write_text(json.dumps(CRM_MAPPING, indent=2), "utf-8")


# --- through the server -----------------------------------------------------------------------

def _no_server(settings: Settings) -> bool:
    from refinery.api.server import running_server

    return running_server(settings) is None


def _ensure_sources(api: Client, paths: DemoPaths, manifest: dict[str, Any] | None, world: World) -> dict[str, str]:
    """Create the demo's sources if missing; return the collector sources' write keys."""
    known = {s["name"]: s for s in api.sources()}
    keys: dict[str, str] = dict((manifest or {}).get("write_keys") or {})
    for name in COLLECTOR_SOURCES:
        if name in known and name not in keys:
            raise ConfigurationError(
                f"Source {name!r} already exists on this data dir, but the demo does not know its write key ({paths.manifest} is missing).",
                fix="Run the demo on a fresh --data-dir.",
            )
        if name not in known:
            # Accept events without a tracking plan even when the server's default quarantines them.
            keys[name] = api.create_source(name=name, kind="collector", unplanned_events="accept")["write_key"]
            _write_manifest(paths, world, keys)
    if CRM_SOURCE not in known:
        api.create_source(name=CRM_SOURCE, kind="import")
    _write_manifest(paths, world, keys)
    return {name: keys[name] for name in COLLECTOR_SOURCES}


def _sources_sql(column: str = "source") -> str:
    # Constant source names of the demo, not user text.
    return f"{column} IN ({', '.join(repr(s) for s in ALL_SOURCES)})"


def _present_message_ids(api: Client, expected: int) -> set[str]:
    """Message ids of the demo's collector sources already in the raw zone (sent by an earlier run)."""
    sources = ", ".join(repr(s) for s in COLLECTOR_SOURCES)
    result = api.query(f"SELECT DISTINCT message_id FROM raw_events WHERE source IN ({sources})", expected + 1000)  # noqa: S608
    return {row[0] for row in result["rows"]}


def _zone_counts(api: Client) -> dict[str, Any]:
    events = api.query(f"SELECT source, type, count(*) FROM events WHERE {_sources_sql()} GROUP BY 1, 2 ORDER BY 1, 2", None)  # noqa: S608
    failed = api.query(
        f"SELECT source, stage, reason, count(*) FROM failed_events WHERE {_sources_sql()} GROUP BY 1, 2, 3 ORDER BY 1, 3", None  # noqa: S608
    )
    raw = api.query(f"SELECT source, count(*) FROM raw_events WHERE {_sources_sql()} GROUP BY 1 ORDER BY 1", None)  # noqa: S608
    by_source: dict[str, dict[str, int]] = {}
    for source, call, n in events["rows"]:
        by_source.setdefault(source, {})[call] = int(n)
    return {
        "events": by_source,
        "raw_events": {source: int(n) for source, n in raw["rows"]},
        "failed_events": [{"source": s, "stage": st, "reason": r, "count": int(n)} for s, st, r, n in failed["rows"]],
    }


def _explain_example(api: Client) -> str | None:
    """A user id whose profile was kept apart from another one (a shared device), to show `explain`."""
    rows = api.query(
        "SELECT i.value FROM identity_blocked b JOIN identities i ON i.profile_id = b.profile_a AND i.identifier_type = 'user_id' "
        "WHERE b.kind = 'merge' ORDER BY b.event_time, i.value LIMIT 1", None,
    )["rows"]
    return str(rows[0][0]) if rows else None


def _sample_user(world: World) -> str:
    """A user id the world's ground truth shows on a shared device, else any user id (for `explain`)."""
    shared = {d.key for d in world.devices.values() if d.shared}
    for e in world.events:
        if e.device_key in shared and e.message.get("userId"):
            return str(e.message["userId"])
    return next(str(p.user_id) for p in world.people if p.user_id)


def _email_changes(world: World) -> int:
    """People whose identify calls carry more than one email (what identity resolution must follow)."""
    emails: dict[str, set[str]] = {}
    for e in world.events:
        email = (e.message.get("traits") or {}).get("email")
        if email:
            emails.setdefault(e.person_id, set()).add(email)
    return sum(1 for seen in emails.values() if len(seen) > 1)


def _summary(
    settings: Settings, world: World, paths: DemoPaths, url: str, started: bool, rerun: bool,
    sent: int, present: int, job: dict[str, Any], zones: dict[str, Any], explain_user: str, erased: str | None = None,
) -> DemoSummary:
    # An erased person's events are gone, and stay out when the demo sends them again.
    expected = world.expected_counts(exclude_person=erased)
    clean = sum(n for source in COLLECTOR_SOURCES for n in zones["events"].get(source, {}).values())
    truth = groundtruth.build(world)
    data_dir = str(settings.data_dir)
    d = shlex.quote(data_dir)
    return DemoSummary(
        data_dir=data_dir,
        seed=world.seed,
        people=world.size,
        rerun=rerun,
        server={"url": url, "started_by_demo": started},
        events={
            "generated": len(world.events),
            "sent": sent,
            "already_stored": present,
            "expected_clean": expected.get(CLEAN, 0),
            "expected_quarantined": {k: v for k, v in expected.items() if k != CLEAN},
            "clean": clean,
            "quarantined": sum(f["count"] for f in zones["failed_events"] if f["source"] in COLLECTOR_SOURCES),
        },
        zones=zones,
        crm={
            "file": str(paths.crm_csv),
            "mapping": str(paths.crm_mapping),
            "rows": len(world.crm_rows),
            "import_id": job.get("import_id"),
            "status": job.get("status"),
            "rows_read": job.get("rows_read"),
            "rows_loaded": job.get("rows_loaded"),
            "rows_duplicate": job.get("rows_duplicate"),
            "rows_failed": job.get("rows_failed"),
            "identify_events": zones["events"].get(CRM_SOURCE, {}).get("identify", 0),
        },
        ground_truth={
            "file": str(paths.ground_truth),
            "event_truth": str(paths.event_truth),
            "persons": len(truth["persons"]),
            "identifiers": len(truth["identifiers"]),
            "shared_devices": len(truth["shared_devices"]),
            "people_who_changed_email": _email_changes(world),
        },
        next_commands=[
            # Commands for the user to type (advice text, never executed here).
            f'refinery query --data-dir {d} "SELECT event, count(*) AS n FROM events WHERE type = \'track\' GROUP BY 1 ORDER BY n DESC"',  # noqa: S608
            f"refinery catalog --data-dir {d}",
            f"refinery events failed --data-dir {d}",
            f'refinery query --data-dir {d} "SELECT user_id, traits ->> \'$.email\' AS email FROM events WHERE source = \'{CRM_SOURCE}\' LIMIT 10"',  # noqa: S608
            f'refinery query --data-dir {d} "SELECT profile_id, event_count, identifiers FROM profiles ORDER BY event_count DESC LIMIT 5"',  # noqa: S608
            f'refinery query --data-dir {d} "SELECT reason, identifier_type, value, profile_a, profile_b FROM identity_blocked WHERE kind = \'merge\' LIMIT 10"',  # noqa: S608
            f"refinery profiles explain --data-dir {d} user_id:{shlex.quote(explain_user)}",
            f"refinery segments list --data-dir {d}",
            f"refinery segments preview --data-dir {d} \"performed 'Order Completed' where total > 100 in last 30 days\"",
        ],
    )

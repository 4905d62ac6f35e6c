"""One typed settings table, layered: defaults, then a `refinery.toml` file, then `REFINERY_*`
environment variables, then command-line flags (passed as overrides).

Every field has a description; `tests/test_settings.py` checks that each one is documented in
`docs/configuration.md`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from refinery.errors import ConfigurationError
from refinery.privacy.tokens import DEFAULT_PROPERTY_FIELDS, DEFAULT_TRAIT_FIELDS, PiiPolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFINERY_", extra="forbid", validate_default=True)

    data_dir: Path = Field(Path("./refinery-data"), description="Folder holding the database, the raw zone files and server state.")
    engine: Literal["duckdb", "spark"] = Field("duckdb", description="Engine that runs the batch jobs (segments, computed traits, training sets, identity components): `duckdb` (the embedded store) or `spark` (Apache Spark over the Parquet lake at `lake_path`; the `[spark]` extra). See docs/deploy.md#spark.")
    duckdb_memory_limit: str = Field("2GB", description="DuckDB memory limit for batch work (e.g. `2GB`): a CLI command's own process, and jobs such as identity resolution while they run inside the server (docs/decisions/0012-memory-policy.md).")
    duckdb_steady_memory_limit: str = Field("256MB", description="DuckDB memory limit for long-running and streaming work: `refinery serve` between batch jobs, and every import; keeps RSS flat (DuckDB evicts to `<database>.tmp`).")
    duckdb_threads: int = Field(2, ge=1, description="Threads DuckDB may use.")

    host: str = Field("127.0.0.1", description="Address `refinery serve` binds to.")
    port: int = Field(8088, ge=0, le=65535, description="Port `refinery serve` listens on (0 picks a free one).")
    admin_token: str | None = Field(None, description="Bearer token for `/api/*`. When unset, one is generated into `<data_dir>/admin.token` (mode 0600).")

    max_event_bytes: int = Field(32 * 1024, description="Largest single event accepted (Segment: 32 KB).")
    max_batch_bytes: int = Field(500 * 1024, description="Largest request body accepted, after decompression (Segment: 500 KB).")
    max_batch_events: int = Field(2500, description="Most events in one batch (Segment: 2,500).")
    max_json_depth: int = Field(64, description="Deepest nesting of objects and arrays accepted in an event.")
    dedup_window_days: int = Field(7, ge=1, description="How long message ids are remembered per source, so SDK retries never double-count.")
    max_future_skew_seconds: int = Field(24 * 3600, description="Events whose corrected timestamp is further than this in the future are quarantined.")
    min_event_time: str = Field("2000-01-01T00:00:00Z", description="Events with an earlier corrected timestamp are quarantined as implausible.")
    rate_limit_per_second: float = Field(10_000.0, description="Default per-source limit on events per second (token bucket); 0 disables it.")
    rate_limit_burst: float = Field(50_000.0, description="Default per-source burst of events allowed above the steady rate.")

    commit_max_events: int = Field(20_000, description="Most events the writer groups into one commit.")
    commit_max_wait_ms: float = Field(2.0, description="When the writer was idle and work arrives, how long it waits for more to join the commit; work that queued while a commit ran is committed at once.")

    tracking_plans_dir: Path | None = Field(None, description="Folder of tracking plans (`<event name>.json` JSON Schemas). Default: `<data_dir>/tracking-plans`.")
    unplanned_events: Literal["accept", "quarantine"] = Field("accept", description="Default for sources: accept events without a plan, or quarantine them.")

    log_level: str = Field("INFO", description="Log level for the server and CLI.")

    identity_rules_file: Path | None = Field(None, description="Identity rules file (YAML or JSON): type priorities and limits, declared identifiers, blocked values. Default: `<data_dir>/identity-rules.yaml` when it exists.")
    identity_phone_region: str = Field("US", min_length=2, max_length=2, description="Region (ISO 3166 code) for phone numbers written without a country code, when the event's traits carry no `country`.")
    identity_hub_max_user_ids: int = Field(10, ge=1, description="An identifier seen with more distinct user ids than this is a shared identifier (kiosk, bot, shared inbox) and links nobody.")
    identity_max_value_length: int = Field(256, ge=8, description="Identifier values longer than this (after normalisation) are blocked as `too_long`.")
    identity_max_merges_per_profile: int = Field(1000, ge=1, description="Most merges one profile may absorb: a profile that would hold more than this many identifiers plus one is not merged.")

    matching_person_threshold: float = Field(0.99, gt=0.0, le=1.0, description="Person-record links (Splink) below this match probability are not stored.")
    matching_seed: int = Field(42, description="Seed of the random sample person-record matching estimates u from; the same seed and records give the same model.")
    matching_u_max_pairs: int = Field(2_000_000, ge=1000, description="Record pairs sampled to estimate u (how often fields agree by chance) in person-record matching.")
    matching_device_window_seconds: int = Field(1800, ge=1, description="Device signals: two devices active on one IP and user agent within this many seconds of each other count as together.")
    matching_device_max_per_ip: int = Field(5, ge=2, description="Device signals: an IP seen with more distinct devices than this on one day (office, NAT) links nothing.")
    matching_device_score_cap: float = Field(0.6, gt=0.0, le=0.6, description="Highest score a device-signal link can have (they are weak evidence).")

    trait_policy: Literal["latest", "first", "source_priority"] = Field("latest", description="How a profile's traits are merged from its identify calls: `latest` (the newest value wins, an explicit null clears the trait), `first` (the first value ever set wins), or `source_priority` (the value from the source listed first in `trait_source_priority` wins, newest first within a source).")
    trait_source_priority: list[str] = Field(default_factory=list, description="Sources in order of trust for the `source_priority` trait policy, e.g. `[\"crm\", \"web\"]`; sources not listed come after, newest value first.")
    trait_policies: dict[str, Literal["latest", "first", "source_priority"]] = Field(default_factory=dict, description="Per-trait policy overriding `trait_policy`, e.g. `{\"first_touch_channel\": \"first\", \"plan\": \"source_priority\"}`.")

    token_default_expiry: str = Field("90d", description="How long an API token lives when `refinery tokens create` is given no `--expires`: a duration such as `30d`, `12h`, `2w`, or `never`.")

    consent_categories: dict[str, str] = Field(default_factory=dict, description="CMP category names (keys of `context.consent.categoryPreferences`, compared case-insensitively) mapped to consent purposes (`analytics`, `personalisation`, `marketing`, `advertising`), e.g. `{\"C0002\": \"analytics\", \"C0004\": \"advertising\"}`; adds to the built-in names.")
    analytics_denied_events: Literal["keep", "minimise"] = Field("minimise", description="What is stored of an event whose person denied analytics (in the event's own consent, or in their recorded choice): `minimise` keeps only its type, name, time, identifiers and consent (no properties, page, device, location, IP or other traits); `keep` stores it as sent and leaves enforcement to the consent service.")
    consent_unknown_allowed: list[str] = Field(default_factory=list, description="Purposes for which a person with no recorded choice counts as allowed (an opt-out regime); default none: unknown consent means no.")

    identity_incremental: bool = Field(False, description="While the server runs, keep identities and profiles up to date as events are committed (`identity/incremental.py`): the same tables a full `refinery identity resolve` would give. Off by default until the per-batch cost is down (docs/benchmarks.md, incremental identity): each batch holds the writer for tens of milliseconds.")

    query_timeout_seconds: float = Field(60.0, gt=0, description="`refinery query` and `POST /api/query`: a query still running after this many seconds is stopped with an error.")

    # retention (governance/retention.py, docs/retention.md): days to keep each zone; 0 keeps forever
    retention_raw_days: int = Field(30, ge=0, description="Days to keep the raw zone (`raw_events`, and imported files under `<data_dir>/raw/imports` no import needs any more), counted from receipt; 0 keeps it forever. Per-source overrides: `refinery retention set`.")
    retention_events_days: int = Field(395, ge=0, description="Days to keep clean events (`events`, and their `event_profiles` rows), counted from receipt; 0 keeps them forever.")
    retention_failed_days: int = Field(90, ge=0, description="Days to keep quarantined events that are still pending (or failed again), counted from when they failed; 0 keeps them forever.")
    retention_failed_resolved_days: int = Field(7, ge=0, description="Days to keep quarantined events a replay loaded (or found already loaded), counted from the replay; 0 keeps them forever.")
    retention_interval_hours: float = Field(24.0, ge=0, description="How often `refinery serve` runs retention (checked hourly, remembered across restarts); 0 turns the scheduled job off.")
    retention_first_check_minutes: float = Field(10.0, ge=0, description="Minutes after `refinery serve` starts before the scheduled retention job first checks whether a run is due (then hourly), so start-up is not slowed by a backlog.")
    retention_batch_rows: int = Field(50_000, ge=100, description="Most rows retention deletes in one writer transaction, so a large backlog never holds the writer for long.")

    # lineage (governance/lineage.py, docs/lineage.md): every batch job's OpenLineage run events
    lineage_file: Path | None = Field(None, description="JSON lines file every batch job appends its OpenLineage run events to (START, then COMPLETE or FAIL); `refinery lineage` reads it. Default: `<data_dir>/lineage/events.jsonl`.")
    lineage_url: str | None = Field(None, description="Base URL of an OpenLineage HTTP endpoint (e.g. Marquez, `http://localhost:5000`) that also receives every run event, at `/api/v1/lineage`; unset sends none. A failing endpoint is logged and never fails a job.")
    lineage_timeout_seconds: float = Field(2.0, gt=0, description="How long one run event may take to reach `lineage_url` before it is given up (logged, the job goes on).")

    # privacy (privacy/, docs/privacy.md): pseudonymisation and the vault
    pseudonymise: bool = Field(True, description="Replace personal fields by keyed tokens (`pii:<kind>:<hex>`) in the clean and curated zones, keeping the values only in the vault, sealed per subject. Off keeps them in clear (raw and failed payloads are sealed either way).")
    pii_trait_fields: list[str] = Field(default_factory=lambda: list(DEFAULT_TRAIT_FIELDS), description="Trait names (in `traits` and `context.traits`) that hold personal data and are replaced by tokens.")
    pii_property_fields: list[str] = Field(default_factory=lambda: list(DEFAULT_PROPERTY_FIELDS), description="Event property names (in `properties`) that hold personal data and are replaced by tokens.")
    ip_handling: Literal["tokenise", "truncate", "keep"] = Field("tokenise", description="What the clean zone keeps of `context.ip`: a token (`tokenise`; equal addresses still match), the address truncated to its /24 (IPv4) or /48 (IPv6) network (`truncate`), or the address (`keep`).")
    master_key_file: Path | None = Field(None, description="File holding the base64 master key (32 bytes) that protects the vault's keys; `REFINERY_MASTER_KEY` (base64) takes precedence. Default: `<data_dir>/keys/master.key`, generated on first start. Keep it, and the key store, out of the data's backups.")
    key_store_file: Path | None = Field(None, description="SQLite file holding each subject's data key, wrapped by the master key; deleting a key is crypto-shredding. Default: `<data_dir>/keys/subject-keys.sqlite`.")

    # k-anonymity (governance/kanon.py, docs/decisions/0017-k-anonymity.md): aggregate reports to roles without pii:read
    min_group_size: int = Field(10, ge=2, description="Aggregate reports served to roles without `pii:read` (the catalog, `POST /api/query` in aggregate mode) leave out every group seen from fewer than this many distinct people, and say how many they left out.")

    # segments (refinery/segments/schedule.py, docs/segments.md): membership recomputed inside `refinery serve`
    segments_interval_minutes: float = Field(15.0, ge=0, description="How often `refinery serve` recomputes segment membership (segments whose inputs did not change are skipped); 0 turns the scheduled job off.")

    # activation (refinery/activation/, docs/activation.md): syncs, outboxes, delivery
    activation_workers: bool = Field(True, description="`refinery serve` runs the syncs' schedules and one delivery worker per destination (each with its own outbox, so a slow destination never holds up another); off, nothing is delivered until `refinery syncs run`.")
    activation_batch_size: int = Field(1000, ge=1, le=100_000, description="Most records in one batch sent to a destination (a sync can set its own, lower).")
    activation_max_attempts: int = Field(8, ge=1, description="Deliveries of one batch before it goes to the dead-letter table (`refinery syncs dead-letters`, replayable).")
    activation_backoff_base_seconds: float = Field(1.0, gt=0, description="First retry delay of a failed batch; each further retry doubles it (full jitter), up to `activation_backoff_max_seconds`; a receiver's `Retry-After` wins.")
    activation_backoff_max_seconds: float = Field(300.0, gt=0, description="Longest delay between two deliveries of one batch (also caps a receiver's `Retry-After`).")
    activation_timeout_seconds: float = Field(10.0, gt=0, description="Timeout of one delivery to a network destination (connect, read and write each).")
    activation_poll_seconds: float = Field(0.5, gt=0, description="How often delivery workers look for due batches and real-time syncs for new `segment_entered`/`segment_exited` events.")
    activation_allowed_networks: list[str] = Field(default_factory=list, description="Addresses (CIDR, e.g. `10.1.0.0/16`, `127.0.0.1/32`) or host names destinations may reach although they are loopback, private, link-local or cloud-metadata addresses, which are refused by default (server-side request forgery), checked after DNS resolution and on every redirect.")

    # features (refinery/features/, docs/features.md): the online store and its materialisation
    features_online_store: Literal["sqlite", "redis"] = Field("sqlite", description="Where the latest feature values per profile are served from: `sqlite` (a file under the data dir, `features_online_file`) or `redis` (`features_redis_url`, for deployments that serve from many processes).")
    features_online_file: Path | None = Field(None, description="The embedded online store's SQLite file. Default: `<data_dir>/features/online.sqlite`.")
    features_redis_url: str | None = Field(None, description="Redis URL of the online store when `features_online_store` is `redis`, e.g. `redis://:PASSWORD@HOST:6379/0`.")
    features_redis_prefix: str = Field("refinery:features:", min_length=1, description="Prefix of every Redis key the online store writes, so several stores can share one Redis.")
    features_materialize_interval_minutes: float = Field(15.0, ge=0, description="How often `refinery serve` materialises the features into the online store (incrementally when it can); 0 turns the scheduled job off.")

    # Scale-out: engine (storage/spark.py, storage/lake.py, docs/deploy.md#spark, decision 0031)
    lake_path: str | None = Field(None, description="The Parquet lake the Spark engine reads and writes: a folder per table of `<batch_id>.parquet` files (a local folder or any path Spark can write, e.g. `s3a://bucket/lake`). Default: `<data_dir>/lake`. `refinery lake export` fills it from the embedded store.")
    spark_master: str = Field("local[2]", description="Spark master URL when `engine` is `spark`: `local[N]` (in this process, N cores), `spark://HOST:7077`, `yarn`, `k8s://...`.")
    spark_shuffle_partitions: int = Field(8, ge=1, description="`spark.sql.shuffle.partitions` of the Spark engine's session (Spark's default of 200 is made for clusters; a few per core suits local mode).")
    spark_conf: dict[str, str] = Field(default_factory=dict, description="Further Spark settings for the session, e.g. `{\"spark.driver.memory\": \"4g\", \"spark.executor.memory\": \"8g\"}` (the engine sets the session time zone to UTC and turns the UI off unless set here).")

    @property
    def master_key_path(self) -> Path:
        return self.master_key_file or (self.data_dir / "keys" / "master.key")

    @property
    def key_store_path(self) -> Path:
        return self.key_store_file or (self.data_dir / "keys" / "subject-keys.sqlite")

    @property
    def pii_policy(self) -> PiiPolicy:
        return PiiPolicy(tuple(self.pii_trait_fields), tuple(self.pii_property_fields), self.ip_handling,
                         self.identity_phone_region, self.pseudonymise)

    @property
    def database_path(self) -> Path:
        return self.data_dir / "refinery.duckdb"

    @property
    def plans_dir(self) -> Path:
        return self.tracking_plans_dir or (self.data_dir / "tracking-plans")

    @property
    def raw_files_dir(self) -> Path:
        return self.data_dir / "raw" / "imports"

    @property
    def identity_rules_path(self) -> Path:
        return self.identity_rules_file or (self.data_dir / "identity-rules.yaml")

    @property
    def lineage_path(self) -> Path:
        return self.lineage_file or (self.data_dir / "lineage" / "events.jsonl")

    @property
    def features_online_path(self) -> Path:
        return self.features_online_file or (self.data_dir / "features" / "online.sqlite")


CONFIG_ENV = "REFINERY_CONFIG"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Defaults < `refinery.toml` (or `config_file`, or `$REFINERY_CONFIG`) < `REFINERY_*` environment < `overrides` (flags).

    The file holds the settings under a `[refinery]` table (or at its top level), with the names
    of docs/configuration.md: `port = 9000`, `data_dir = "/var/lib/refinery"`.
    """
    explicit = config_file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    path = explicit or Path("refinery.toml")
    file_values: dict[str, Any] = {}
    if path.exists():
        try:
            doc = tomllib.loads(path.read_text("utf-8"))
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as e:
            raise ConfigurationError(f"{path} is not valid TOML: {e}.", fix="Correct the file or remove it.") from e
        file_values = doc["refinery"] if isinstance(doc.get("refinery"), dict) else doc
        unknown = sorted(set(file_values) - set(Settings.model_fields))
        if unknown:
            raise ConfigurationError(
                f"{path} sets unknown setting(s): {', '.join(unknown)}.",
                fix="Use the names listed in docs/configuration.md (e.g. port, data_dir).",
                field=unknown[0],
            )
    elif explicit is not None:
        raise ConfigurationError(f"Config file {path} does not exist.", fix=f"Point {CONFIG_ENV} (or --config) at an existing file.")

    # Environment beats the file: drop file keys that the environment sets (names are case-insensitive).
    in_env = {k.upper() for k in os.environ}
    layered = {k: v for k, v in file_values.items() if f"REFINERY_{k.upper()}" not in in_env}
    layered.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**layered)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])} (env REFINERY_{str(err['loc'][0]).upper()}): {err['msg']}" for err in e.errors()
        )
        raise ConfigurationError(f"Invalid settings: {problems}.", fix="See docs/configuration.md for every setting.") from e

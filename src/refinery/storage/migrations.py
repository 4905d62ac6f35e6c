"""The storage version and its migrations.

Each migration is a numbered, described list of DDL statements, applied once, in order, in a
transaction, and recorded in `schema_migrations`. Later issues append migrations; they never edit
an applied one. The DDL is constant text written for the embedded store; no user text reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from refinery.errors import MigrationError, StorageError
from refinery.storage.engine import Engine


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "zones: sources, raw_events, message_ids, events, failed_events, imports",
        (
            "CREATE SEQUENCE failed_event_seq START 1",
            """CREATE TABLE sources (
                name VARCHAR PRIMARY KEY,
                kind VARCHAR NOT NULL,                 -- 'collector' or 'import'
                write_key_hash VARCHAR UNIQUE,         -- sha256 of the write key; the key itself is never stored
                write_key_prefix VARCHAR,              -- first characters, to recognise a key in lists
                enabled BOOLEAN NOT NULL DEFAULT TRUE,
                unplanned_events VARCHAR,              -- NULL: the server default; 'accept' or 'quarantine'
                rate_limit_per_second DOUBLE,          -- NULL: the server default
                created_at TIMESTAMPTZ NOT NULL
            )""",
            # The raw zone: every accepted payload as received. Never updated.
            """CREATE TABLE raw_events (
                raw_id BIGINT NOT NULL,
                request_id VARCHAR NOT NULL,
                source VARCHAR NOT NULL,
                message_id VARCHAR NOT NULL,
                received_at TIMESTAMPTZ NOT NULL,
                payload JSON NOT NULL,                 -- the event object exactly as received
                envelope JSON,                         -- batch-level context/integrations/sentAt merged into it
                import_id VARCHAR,
                row_number BIGINT
            )""",
            # Message ids seen per source within the dedup window; the primary key absorbs retries.
            """CREATE TABLE message_ids (
                source VARCHAR NOT NULL,
                message_id VARCHAR NOT NULL,
                payload_hash UBIGINT NOT NULL,
                first_seen TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (source, message_id)
            )""",
            # The clean zone: one schema for every Segment call type.
            """CREATE TABLE events (
                message_id VARCHAR NOT NULL,
                source VARCHAR NOT NULL,
                type VARCHAR NOT NULL,
                event VARCHAR,
                name VARCHAR,
                user_id VARCHAR,
                anonymous_id VARCHAR,
                group_id VARCHAR,
                previous_id VARCHAR,
                timestamp TIMESTAMPTZ NOT NULL,
                original_timestamp TIMESTAMPTZ,
                sent_at TIMESTAMPTZ,
                received_at TIMESTAMPTZ NOT NULL,
                properties JSON,
                traits JSON,
                context JSON,
                ip VARCHAR,
                user_agent VARCHAR,
                page_url VARCHAR,
                page_path VARCHAR,
                page_referrer VARCHAR,
                device_id VARCHAR,
                advertising_id VARCHAR,
                locale VARCHAR,
                library_name VARCHAR,
                consent JSON,
                raw_id BIGINT,
                import_id VARCHAR,
                loaded_at TIMESTAMPTZ NOT NULL
            )""",
            # The failed zone: quarantined with a reason, replayable.
            """CREATE TABLE failed_events (
                failure_id BIGINT NOT NULL,
                raw_id BIGINT,
                source VARCHAR NOT NULL,
                message_id VARCHAR,
                stage VARCHAR NOT NULL,                -- collect | clean | plan | dedup | import
                reason VARCHAR NOT NULL,               -- a stable code, e.g. missing_identity
                message VARCHAR NOT NULL,              -- names the field and the fix
                field VARCHAR,                         -- JSON pointer of the offending value, when known
                payload JSON,                          -- the payload as understood (after envelope merge)
                received_at TIMESTAMPTZ NOT NULL,
                failed_at TIMESTAMPTZ NOT NULL,
                import_id VARCHAR,
                file VARCHAR,
                row_number BIGINT,
                replayed_at TIMESTAMPTZ,
                replay_status VARCHAR,                 -- NULL (pending) | loaded | duplicate | failed_again
                replay_count INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE imports (
                import_id VARCHAR PRIMARY KEY,
                source VARCHAR NOT NULL,
                path VARCHAR NOT NULL,
                stored_path VARCHAR,
                file_sha256 VARCHAR NOT NULL,
                format VARCHAR NOT NULL,
                mapping JSON NOT NULL,
                status VARCHAR NOT NULL,               -- new | started | completed | failed
                rows_read BIGINT NOT NULL DEFAULT 0,
                rows_loaded BIGINT NOT NULL DEFAULT 0,
                rows_duplicate BIGINT NOT NULL DEFAULT 0,
                rows_failed BIGINT NOT NULL DEFAULT 0,
                error VARCHAR,
                started_at TIMESTAMPTZ NOT NULL,
                finished_at TIMESTAMPTZ
            )""",
        ),
    ),
    Migration(
        2,
        "identity: identities, identity_edges, profile_merges, identity_blocked, identity_links, identity_resolutions",
        (
            # Every identifier seen (normalised), with the profile it resolves to. Rebuilt by
            # `refinery identity resolve`; see docs/identity.md for the statuses.
            """CREATE TABLE identities (
                identifier_type VARCHAR NOT NULL,      -- user_id, email, phone, anonymous_id, crm_id, ...
                value VARCHAR NOT NULL,                -- normalised (emails lower-cased, phones E.164)
                profile_id VARCHAR,                    -- NULL when the value is blocked
                status VARCHAR NOT NULL,               -- linked | shared | ambiguous | detached | blocked
                reason VARCHAR,                        -- why it is not linked (a reason code), else NULL
                first_seen TIMESTAMPTZ NOT NULL,
                last_seen TIMESTAMPTZ NOT NULL,
                event_count BIGINT NOT NULL,
                first_message_id VARCHAR,
                first_source VARCHAR,
                PRIMARY KEY (identifier_type, value)
            )""",
            # One row per pair of identifiers that appeared together, with the evidence of the first
            # event that linked them. status says whether resolution used the edge.
            """CREATE TABLE identity_edges (
                a_type VARCHAR NOT NULL,
                a_value VARCHAR NOT NULL,
                b_type VARCHAR NOT NULL,
                b_value VARCHAR NOT NULL,
                rule VARCHAR NOT NULL,                 -- same_event | alias | import_row
                message_id VARCHAR NOT NULL,           -- the first event that linked them
                source VARCHAR NOT NULL,
                event_time TIMESTAMPTZ NOT NULL,
                last_seen TIMESTAMPTZ NOT NULL,
                event_count BIGINT NOT NULL,
                status VARCHAR NOT NULL,               -- active | blocked
                reason VARCHAR                         -- why it was not used, else NULL
            )""",
            # Append-only history of merges: which profile id survived, which was absorbed, why.
            """CREATE TABLE profile_merges (
                merge_id VARCHAR PRIMARY KEY,
                surviving_profile_id VARCHAR NOT NULL,
                merged_profile_id VARCHAR NOT NULL,
                evidence JSON NOT NULL,                -- the edge that joined them: identifiers, message id, source, time, rule
                merged_at TIMESTAMPTZ NOT NULL,
                resolution_id VARCHAR,
                undone_at TIMESTAMPTZ,
                undone_reason VARCHAR
            )""",
            # What resolution refused to do, with the rule that stopped it.
            """CREATE TABLE identity_blocked (
                kind VARCHAR NOT NULL,                 -- identifier | edge | merge
                reason VARCHAR NOT NULL,               -- blocked_value, too_long, shared_identifier, conflicting_user_id, ...
                identifier_type VARCHAR NOT NULL,
                value VARCHAR NOT NULL,
                other_type VARCHAR,
                other_value VARCHAR,
                profile_a VARCHAR,                     -- for merges: the profiles that were kept apart
                profile_b VARCHAR,
                message_id VARCHAR,
                source VARCHAR,
                event_time TIMESTAMPTZ,
                evidence JSON
            )""",
            # Probabilistic links (Splink person records, device signals), kept apart from edges.
            """CREATE TABLE identity_links (
                link_id VARCHAR PRIMARY KEY,
                a_type VARCHAR NOT NULL,
                a_value VARCHAR NOT NULL,
                b_type VARCHAR NOT NULL,
                b_value VARCHAR NOT NULL,
                score DOUBLE NOT NULL,                 -- match probability, 0..1
                method VARCHAR NOT NULL,
                model_version VARCHAR,
                evidence JSON,
                created_at TIMESTAMPTZ NOT NULL,
                removed_at TIMESTAMPTZ
            )""",
            """CREATE TABLE identity_resolutions (
                resolution_id VARCHAR PRIMARY KEY,
                mode VARCHAR NOT NULL,                 -- full
                rules JSON NOT NULL,
                started_at TIMESTAMPTZ NOT NULL,
                finished_at TIMESTAMPTZ,
                identifiers BIGINT,
                edges BIGINT,
                profiles BIGINT,
                merges BIGINT,
                unmerges BIGINT,
                blocked BIGINT,
                iterations INTEGER
            )""",
        ),
    ),
    Migration(
        3,
        "profiles: event_profiles, profiles",
        (
            # Which profile each clean event belongs to: the profile of its highest-priority linked
            # identifier. Rebuilt with the profiles after every resolution.
            """CREATE TABLE event_profiles (
                source VARCHAR NOT NULL,
                message_id VARCHAR NOT NULL,
                profile_id VARCHAR NOT NULL,
                identifier_type VARCHAR NOT NULL,      -- the identifier that placed the event
                timestamp TIMESTAMPTZ NOT NULL
            )""",
            # The unified profile: identifiers, traits merged by the trait policy, activity.
            """CREATE TABLE profiles (
                profile_id VARCHAR PRIMARY KEY,
                identifiers JSON NOT NULL,             -- {"user_id": ["u1"], "email": ["a@b.c"], ...}
                traits JSON NOT NULL,                  -- merged by the trait policy
                trait_sources JSON NOT NULL,           -- per trait: source, message_id, time and policy of the winning value
                first_seen TIMESTAMPTZ,
                last_seen TIMESTAMPTZ,
                event_count BIGINT NOT NULL,
                sources JSON NOT NULL,                 -- the sources its events came from
                updated_at TIMESTAMPTZ NOT NULL
            )""",
        ),
    ),
    Migration(
        4,
        "identity: identity_overrides (a user's removals and splits, applied by every resolution)",
        (
            # What a person told resolution to undo. Never deleted: revoking sets revoked_at, and the
            # next resolution no longer applies it. Values are stored as identities holds them.
            """CREATE TABLE identity_overrides (
                override_id VARCHAR PRIMARY KEY,
                kind VARCHAR NOT NULL,                 -- remove_identifier | remove_edge | split
                identifiers JSON NOT NULL,             -- [{"type", "value"}]: the identifier, the edge's two ends, or the side split off
                profile_id VARCHAR,                    -- split: the profile that was split
                other_identifiers JSON,                -- split: the rest of that profile when it was split
                reason VARCHAR,                        -- the user's note
                actor VARCHAR NOT NULL,                -- who asked
                created_at TIMESTAMPTZ NOT NULL,
                revoked_at TIMESTAMPTZ,
                revoked_by VARCHAR
            )""",
        ),
    ),
    Migration(
        5,
        "governance: api_tokens, audit_log, audit_head",
        (
            # API tokens for the admin API. Only a SHA-256 of each token is kept; the prefix lets
            # people recognise a token in lists. Revoked tokens keep their row for the audit trail.
            """CREATE TABLE api_tokens (
                token_id VARCHAR PRIMARY KEY,
                name VARCHAR NOT NULL,                 -- unique among active tokens
                token_hash VARCHAR NOT NULL UNIQUE,    -- sha256 of the token; the token itself is never stored
                token_prefix VARCHAR NOT NULL,
                role VARCHAR NOT NULL,                 -- admin | privacy_officer | marketer | analyst | ...
                sources JSON,                          -- the sources it is limited to; NULL: every source
                created_at TIMESTAMPTZ NOT NULL,
                created_by VARCHAR NOT NULL,           -- the actor's name
                expires_at TIMESTAMPTZ,                -- NULL: never
                revoked_at TIMESTAMPTZ,
                revoked_by VARCHAR
            )""",
            # Append-only, hash-chained: hash = sha256(canonical row incl. prev_hash). Never updated.
            """CREATE TABLE audit_log (
                seq BIGINT NOT NULL,                   -- 1, 2, 3, ... without gaps
                recorded_at TIMESTAMPTZ NOT NULL,
                actor_id VARCHAR NOT NULL,             -- token id, 'admin' (bootstrap) or 'local'; never the token
                actor_name VARCHAR NOT NULL,
                actor_role VARCHAR,
                action VARCHAR NOT NULL,               -- noun.verb, e.g. sources.create, profiles.read
                object VARCHAR,                        -- e.g. source:web, profile:prof_..., token:tok_...
                details JSON NOT NULL,                 -- names and counts, never personal values
                prev_hash VARCHAR NOT NULL,
                hash VARCHAR NOT NULL
            )""",
            # The last row's sequence number and hash, updated with every append: rows deleted from
            # the end of the log are caught by comparing it with the last row.
            "CREATE TABLE audit_head (seq BIGINT NOT NULL, hash VARCHAR NOT NULL)",
        ),
    ),
    Migration(
        6,
        "consent: consent_log (receipts), consent_conflicts, consent_syncs",
        (
            'CREATE SEQUENCE consent_log_seq START 1',
            """CREATE TABLE consent_log (
                log_id BIGINT PRIMARY KEY,
                subject_type VARCHAR NOT NULL,
                subject_value VARCHAR NOT NULL,
                profile_id VARCHAR,
                purpose VARCHAR NOT NULL,
                state VARCHAR NOT NULL,
                origin VARCHAR NOT NULL,
                source VARCHAR NOT NULL,
                message_id VARCHAR,
                request_id VARCHAR,
                actor VARCHAR,
                chosen_at TIMESTAMPTZ NOT NULL,
                recorded_at TIMESTAMPTZ NOT NULL,
                evidence JSON
            )""",
            """CREATE TABLE consent_conflicts (
                conflict_id VARCHAR PRIMARY KEY,
                profile_id VARCHAR NOT NULL,
                purpose VARCHAR NOT NULL,
                denied JSON NOT NULL,
                granted JSON NOT NULL,
                resolution VARCHAR NOT NULL,
                reason VARCHAR NOT NULL,
                detected_at TIMESTAMPTZ NOT NULL,
                resolved_at TIMESTAMPTZ
            )""",
            """CREATE TABLE consent_syncs (
                sync_id VARCHAR PRIMARY KEY,
                started_at TIMESTAMPTZ NOT NULL,
                finished_at TIMESTAMPTZ NOT NULL,
                loaded_since TIMESTAMPTZ,
                loaded_until TIMESTAMPTZ,
                events BIGINT NOT NULL,
                log_rows BIGINT NOT NULL,
                tcf_refused JSON,
                unknown_categories JSON,
                conflicts_open BIGINT NOT NULL
            )""",
        ),
    ),
    Migration(
        7,
        "retention: retention_overrides (per-source time-to-live), retention_runs",
        (
            # A source's own time-to-live for one zone, beating the retention_*_days setting.
            """CREATE TABLE retention_overrides (
                source VARCHAR NOT NULL,
                zone VARCHAR NOT NULL,                 -- raw | events | failed | failed_resolved
                days INTEGER NOT NULL,                 -- 0: keep forever
                set_at TIMESTAMPTZ NOT NULL,
                set_by VARCHAR NOT NULL,               -- the actor's name
                PRIMARY KEY (source, zone)
            )""",
            # One row per retention run (dry runs write nothing): what was deleted, under which policy.
            """CREATE TABLE retention_runs (
                run_id VARCHAR PRIMARY KEY,
                trigger VARCHAR NOT NULL,              -- scheduled | api | cli
                actor VARCHAR NOT NULL,
                started_at TIMESTAMPTZ NOT NULL,
                finished_at TIMESTAMPTZ NOT NULL,
                as_of TIMESTAMPTZ NOT NULL,            -- the moment ages were measured from
                status VARCHAR NOT NULL,               -- completed | failed
                policy JSON NOT NULL,                  -- the days per zone, and per source where overridden
                counts JSON NOT NULL,                  -- rows (and files) deleted per zone
                error VARCHAR
            )""",
        ),
    ),
    Migration(
        8,
        "vault: vault_values (sealed personal values per subject); sealed raw and failed payloads",
        (
            # Each personal value replaced by a token, once per subject key, sealed (AES-GCM) under
            # that subject's data key (kept in the separate key store, never here).
            """CREATE TABLE vault_values (
                token VARCHAR NOT NULL,                -- pii:<kind>:<hex>, as in the clean and curated zones
                key_id VARCHAR NOT NULL,               -- sk_<hex> (a subject) or ek_<hex> (one event)
                kind VARCHAR NOT NULL,                 -- email, phone, name, ip, ...
                sealed BLOB NOT NULL,                  -- nonce || ciphertext || tag
                first_seen TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (token, key_id)
            )""",
            # Raw and quarantined payloads are sealed under the same keys: `payload`/`envelope` stay
            # NULL for sealed rows (older rows keep their clear payload until they expire).
            "ALTER TABLE raw_events ADD COLUMN key_id VARCHAR",
            "ALTER TABLE raw_events ADD COLUMN sealed BLOB",
            "ALTER TABLE raw_events ALTER COLUMN payload DROP NOT NULL",
            "ALTER TABLE failed_events ADD COLUMN key_id VARCHAR",
            "ALTER TABLE failed_events ADD COLUMN sealed BLOB",
        ),
    ),
    Migration(
        9,
        "subject requests: privacy_requests (export and erasure, with receipts), suppression_list",
        (
            # One row per subject request. The person is named only by a keyed hash of the identifier
            # asked for (as on the suppression list), never its value or token.
            """CREATE TABLE privacy_requests (
                request_id VARCHAR PRIMARY KEY,
                kind VARCHAR NOT NULL,                 -- export | erase
                status VARCHAR NOT NULL,               -- received | in_progress | completed | failed | rejected
                identifier_type VARCHAR,               -- the type asked for (NULL: a bare value)
                identifier_hash VARCHAR,               -- sup_<hex>: keyed hash of the type and normal value
                actor VARCHAR NOT NULL,                -- who asked (a token's name)
                received_at TIMESTAMPTZ NOT NULL,
                due_at TIMESTAMPTZ NOT NULL,           -- received_at + the legal deadline
                started_at TIMESTAMPTZ,
                finished_at TIMESTAMPTZ,
                receipt JSON,                          -- counts per store, keys destroyed, suppression entries; no personal values
                error VARCHAR,                         -- why it failed or was rejected (no personal values)
                key_id VARCHAR,                        -- export: the subject key the document is sealed under
                document BLOB                          -- export: the JSON document, sealed; dropped when the person is erased
            )""",
            # Erased identifiers, as keyed hashes: events, replays and imports naming one are dropped.
            """CREATE TABLE suppression_list (
                hash VARCHAR PRIMARY KEY,              -- sup_<hex> = HMAC(suppression key, kind 0x1f normal value)
                kind VARCHAR,                          -- the identifier's type
                request_id VARCHAR,                    -- the erasure that added it
                added_at TIMESTAMPTZ
            )""",
        ),
    ),
    Migration(
        10,
        "segments: definitions and versions, membership history, runs, the entered/exited outbox, computed traits",
        (
            # One row per segment (the rule now in force). Deleting sets deleted_at; the row and its
            # versions stay so past audiences can still be explained and reproduced.
            """CREATE TABLE segments (
                name VARCHAR PRIMARY KEY,
                rule VARCHAR NOT NULL,                 -- the rule text as written
                description VARCHAR,
                identity_policy JSON NOT NULL,         -- as the compiler parsed it: {"mode": "profiles"} or {"mode": "persons", "threshold"}
                version INTEGER NOT NULL,              -- the version in segment_versions now in force
                created_by VARCHAR NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                updated_by VARCHAR NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL,
                deleted_at TIMESTAMPTZ,
                deleted_by VARCHAR
            )""",
            # Every rule ever saved: the version in force at T is the newest created at or before T.
            """CREATE TABLE segment_versions (
                segment VARCHAR NOT NULL,
                version INTEGER NOT NULL,
                rule VARCHAR NOT NULL,
                description VARCHAR,
                identity_policy JSON NOT NULL,
                created_by VARCHAR NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (segment, version)
            )""",
            # Membership with history: one open row (exited_at NULL) while a profile is a member;
            # leaving closes it, coming back opens a new one.
            """CREATE TABLE segment_members (
                segment VARCHAR NOT NULL,
                profile_id VARCHAR NOT NULL,
                entered_at TIMESTAMPTZ NOT NULL,       -- the as-of moment of the run that found it in
                exited_at TIMESTAMPTZ,                 -- the as-of moment of the run that found it out
                entered_run VARCHAR NOT NULL,
                exited_run VARCHAR
            )""",
            # One row per recomputation of one segment (skipped segments are not recorded).
            """CREATE TABLE segment_runs (
                run_id VARCHAR PRIMARY KEY,
                segment VARCHAR NOT NULL,
                version INTEGER,
                as_of TIMESTAMPTZ NOT NULL,
                trigger VARCHAR NOT NULL,              -- cli | api | scheduled | update | delete
                actor VARCHAR NOT NULL,
                started_at TIMESTAMPTZ NOT NULL,
                finished_at TIMESTAMPTZ,
                members BIGINT,
                entered BIGINT,
                exited BIGINT,
                status VARCHAR NOT NULL,               -- completed | failed | superseded
                error VARCHAR,                         -- why it failed (no personal values)
                inputs JSON                            -- the fingerprint of what it read (incremental runs compare it)
            )""",
            "CREATE SEQUENCE segment_event_seq START 1",
            # The outbox activation consumes in event_id order: who entered or left which segment, when.
            """CREATE TABLE segment_events (
                event_id BIGINT NOT NULL,
                kind VARCHAR NOT NULL,                 -- segment_entered | segment_exited
                segment VARCHAR NOT NULL,
                profile_id VARCHAR NOT NULL,
                occurred_at TIMESTAMPTZ NOT NULL,      -- the membership change's moment (the run's as-of)
                run_id VARCHAR NOT NULL,
                version INTEGER,
                recorded_at TIMESTAMPTZ NOT NULL
            )""",
            """CREATE TABLE computed_traits (
                name VARCHAR PRIMARY KEY,
                expression VARCHAR NOT NULL,
                description VARCHAR,
                version INTEGER NOT NULL,
                created_by VARCHAR NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                updated_by VARCHAR NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL,
                deleted_at TIMESTAMPTZ,
                computed_at TIMESTAMPTZ,               -- when the values were last materialised
                profiles BIGINT                        -- how many profiles have a value
            )""",
            """CREATE TABLE computed_trait_values (
                profile_id VARCHAR NOT NULL,
                name VARCHAR NOT NULL,
                value JSON,
                computed_at TIMESTAMPTZ NOT NULL
            )""",
        ),
    ),
    Migration(
        11,
        "activation: destinations and their sealed secrets, syncs, per-sync state, runs, the per-destination outbox, dead letters",
        (
            # A destination: a kind (registered DestinationType), a purpose consent is asked for, and
            # its configuration without secrets (those are sealed in destination_secrets).
            """CREATE TABLE destinations (
                name VARCHAR PRIMARY KEY,
                kind VARCHAR NOT NULL,
                purpose VARCHAR NOT NULL,              -- advertising | marketing | personalisation | analytics
                config JSON NOT NULL,                  -- validated by the kind's model; secret fields left out
                description VARCHAR,
                enabled BOOLEAN NOT NULL DEFAULT TRUE,
                created_by VARCHAR NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                updated_by VARCHAR NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL
            )""",
            # Secret configuration fields (SecretStr), sealed under a key derived from the master key and
            # bound to 'destination:<name>:<field>'; never returned, never logged.
            """CREATE TABLE destination_secrets (
                destination VARCHAR NOT NULL,
                field VARCHAR NOT NULL,
                sealed BLOB NOT NULL,
                PRIMARY KEY (destination, field)
            )""",
            # A sync: a segment to a destination, with a field mapping, a mode and a schedule.
            """CREATE TABLE syncs (
                name VARCHAR PRIMARY KEY,
                segment VARCHAR NOT NULL,
                destination VARCHAR NOT NULL,
                mode VARCHAR NOT NULL,                 -- full | diff | mirror
                mapping JSON NOT NULL,                 -- {output field: trait, computed trait or 'profile_id'}
                schedule VARCHAR NOT NULL,             -- realtime | interval | manual
                interval_minutes INTEGER,              -- schedule 'interval' only
                batch_size INTEGER,                    -- NULL: activation_batch_size
                enabled BOOLEAN NOT NULL DEFAULT TRUE,
                event_cursor BIGINT NOT NULL DEFAULT 0, -- realtime: the last segment_events.event_id planned
                last_planned_at TIMESTAMPTZ,
                created_by VARCHAR NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                updated_by VARCHAR NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL
            )""",
            # What each sync's destination holds (or is about to, once its outbox is delivered): one row
            # per profile sent there and not removed since, with the hash of its mapped fields (mirror).
            """CREATE TABLE sync_state (
                sync VARCHAR NOT NULL,
                profile_id VARCHAR NOT NULL,
                fields_hash UBIGINT,
                since TIMESTAMPTZ NOT NULL
            )""",
            # One row per planning of a sync, with the delivery counts its batches add up to. No personal values.
            """CREATE TABLE sync_runs (
                run_id VARCHAR PRIMARY KEY,
                sync VARCHAR NOT NULL,
                destination VARCHAR NOT NULL,
                segment VARCHAR NOT NULL,
                mode VARCHAR NOT NULL,
                trigger VARCHAR NOT NULL,              -- scheduled | realtime | cli | api | replay
                actor VARCHAR NOT NULL,
                started_at TIMESTAMPTZ NOT NULL,
                planned_at TIMESTAMPTZ,
                finished_at TIMESTAMPTZ,
                status VARCHAR NOT NULL,               -- planned | delivering | completed | completed_with_errors | failed | cancelled
                planned BIGINT NOT NULL DEFAULT 0,     -- records put in the outbox
                batches BIGINT NOT NULL DEFAULT 0,
                sent BIGINT NOT NULL DEFAULT 0,
                added BIGINT NOT NULL DEFAULT 0,
                removed BIGINT NOT NULL DEFAULT 0,
                failed BIGINT NOT NULL DEFAULT 0,
                skipped_consent BIGINT NOT NULL DEFAULT 0,
                skipped_suppressed BIGINT NOT NULL DEFAULT 0,
                superseded BIGINT NOT NULL DEFAULT 0,  -- records a later plan made moot before delivery
                errors JSON                            -- [{batch_id, kind, message}], no personal values
            )""",
            # The outbox: batches per destination (the id is the idempotency key, the same on every
            # attempt), delivered in seq order by that destination's own worker.
            """CREATE TABLE activation_batches (
                batch_id VARCHAR PRIMARY KEY,
                seq BIGINT NOT NULL,                  -- delivery order within the destination
                destination VARCHAR NOT NULL,
                sync VARCHAR NOT NULL,
                segment VARCHAR NOT NULL,
                mode VARCHAR NOT NULL,
                run_id VARCHAR NOT NULL,
                status VARCHAR NOT NULL,               -- pending | delivering | delivered | dead | cancelled
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at TIMESTAMPTZ NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                attempted_at TIMESTAMPTZ,
                delivered_at TIMESTAMPTZ,
                records INTEGER NOT NULL,
                last_error VARCHAR                     -- no personal values
            )""",
            # The outbox's records: profile ids and actions only; fields are read and revealed at delivery.
            """CREATE TABLE activation_records (
                batch_id VARCHAR NOT NULL,
                profile_id VARCHAR NOT NULL,
                action VARCHAR NOT NULL                -- add | remove
            )""",
            # Batches that failed terminally or ran out of attempts; replaying puts the batch back (same id).
            """CREATE TABLE activation_dead_letters (
                batch_id VARCHAR NOT NULL,
                destination VARCHAR NOT NULL,
                sync VARCHAR NOT NULL,
                run_id VARCHAR NOT NULL,
                reason VARCHAR NOT NULL,               -- terminal | attempts_exhausted
                error VARCHAR NOT NULL,                -- no personal values
                attempts INTEGER NOT NULL,
                dead_at TIMESTAMPTZ NOT NULL,
                replayed_at TIMESTAMPTZ,
                replayed_by VARCHAR
            )""",
        ),
    ),
    Migration(
        12,
        "features: definitions (expression or SQL) with every version kept",
        (
            # The live definition of each feature (deleted ones keep their row, deleted_at set).
            """CREATE TABLE features (
                name VARCHAR PRIMARY KEY,
                version INTEGER NOT NULL,              -- the version in feature_versions now in force
                entity VARCHAR NOT NULL,               -- profile
                kind VARCHAR NOT NULL,                 -- expression | sql
                definition VARCHAR NOT NULL,           -- the aggregate expression, or the SELECT
                time_window VARCHAR,                   -- e.g. '90 days' (expression features), or NULL
                ttl_seconds BIGINT,                    -- how long a materialised value may be served
                value_type VARCHAR,                    -- number | string | boolean | timestamp | unknown
                owner VARCHAR NOT NULL,
                description VARCHAR,
                created_by VARCHAR NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                updated_by VARCHAR NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL,
                deleted_at TIMESTAMPTZ
            )""",
            # Every definition ever saved: a training set can name `feature@version`.
            """CREATE TABLE feature_versions (
                name VARCHAR NOT NULL,
                version INTEGER NOT NULL,
                entity VARCHAR NOT NULL,
                kind VARCHAR NOT NULL,
                definition VARCHAR NOT NULL,
                time_window VARCHAR,
                ttl_seconds BIGINT,
                value_type VARCHAR,
                owner VARCHAR NOT NULL,
                description VARCHAR,
                created_by VARCHAR NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (name, version)
            )""",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version


def current_version(engine: Engine) -> int:
    engine.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMPTZ)"
    )
    row = engine.fetch_all("SELECT max(version) FROM schema_migrations")
    return int(row[0][0] or 0)


def _check_sequence(migrations: tuple[Migration, ...]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(
            f"Migration versions must be 1, 2, 3, ... in order; got {versions}.",
            fix="Append new migrations with the next version number; never renumber or remove one.",
        )


def migrate(engine: Engine, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply every pending migration in order, each in its own transaction; return the versions applied.

    A database newer than this code is refused (running old code on it could corrupt it).
    """
    _check_sequence(migrations)
    applied: list[int] = []
    version = current_version(engine)
    newest = migrations[-1].version if migrations else 0
    if version > newest:
        raise MigrationError(
            f"The database is at storage version {version}, newer than this Refinery understands ({newest}).",
            fix="Upgrade Refinery (pip install -U refinery-dmp), or point --data-dir at another folder.",
        )
    for m in migrations:
        if m.version <= version:
            continue
        try:
            with engine.transaction():
                for statement in m.statements:
                    engine.execute(statement)
                engine.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)", [m.version, m.description, datetime.now(UTC)]
                )
        except StorageError as e:
            raise MigrationError(
                f"Migration {m.version} ({m.description}) failed and was rolled back: {e.message}",
                sql=e.sql,
                fix="The database is unchanged at version "
                f"{applied[-1] if applied else version}; report this with the SQL above.",
            ) from e
        applied.append(m.version)
    return applied

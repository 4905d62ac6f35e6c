"""How CLI commands reach the platform: in-process, or through a running server's admin API.

DuckDB allows one writing process per database file. When `refinery serve` is up on the same data
dir, commands go through its HTTP API (with the admin token); otherwise they open the store
themselves. Both clients offer the same methods, so CLI commands never care which one they hold.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from refinery.errors import RefineryError, ServerUnavailable
from refinery.governance import lineage
from refinery.privacy.pii import reveal_in
from refinery.settings import Settings

#: Most tokens one `POST /api/vault/reveal` takes.
REVEAL_MAX = 10_000


class Client(abc.ABC):
    @abc.abstractmethod
    def query(self, sql: str, limit: int | None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def reveal(self, tokens: list[str]) -> dict[str, str]:
        """The values behind tokens (`pii:read`; audited). Tokens of erased people are absent."""
    @abc.abstractmethod
    def catalog(self, source: str | None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def sources(self) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def create_source(self, **fields: Any) -> dict[str, Any]: ...
    @abc.abstractmethod
    def update_source(self, name: str, **fields: Any) -> dict[str, Any]: ...
    @abc.abstractmethod
    def failed(self, **filters: Any) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def replay(self, **filters: Any) -> dict[str, Any]: ...
    @abc.abstractmethod
    def import_file(self, path: Path, source: str, mapping: dict[str, Any], progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def resolve_identities(self) -> dict[str, Any]: ...
    @abc.abstractmethod
    def match_identities(self, source: str | None = None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def persons(self, mode: str, threshold: float) -> dict[str, Any]: ...
    @abc.abstractmethod
    def profile(self, profile_id: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def profile_lookup(self, identifier: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def profile_events(self, profile_id: str, limit: int, before: str | None) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def explain(self, identifier: str) -> dict[str, Any]: ...
    # identity undo and plan (refinery.identity.overrides, refinery.identity.plan)
    @abc.abstractmethod
    def create_override(self, kind: str, identifiers: list[str], profile: str | None, reason: str | None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def overrides(self, include_revoked: bool) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def revoke_override(self, override_id: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def identity_plan(self, rules: dict[str, Any] | None, examples: int) -> dict[str, Any]: ...
    def close(self) -> None:  # noqa: B027 - clients without resources need not close anything
        return None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # consent (refinery.governance.consent)
    @abc.abstractmethod
    def consent(self, identifier: str, limit: int = 1000) -> dict[str, Any]: ...
    @abc.abstractmethod
    def set_consent(self, identifier: str, purposes: dict[str, str] | None, tc_string: str | None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def sync_consent(self, full: bool = False) -> dict[str, Any]: ...

    # retention (refinery.governance.retention)
    @abc.abstractmethod
    def retention_run(self, dry_run: bool = False) -> dict[str, Any]: ...
    @abc.abstractmethod
    def retention_runs(self, limit: int = 50) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def retention_policy(self) -> dict[str, Any]: ...
    @abc.abstractmethod
    def set_retention(self, source: str, zone: str, days: int | None) -> dict[str, Any]: ...

    # lineage (refinery.governance.lineage)
    @abc.abstractmethod
    def lineage(self, target: str, limit: int = 50) -> dict[str, Any]: ...

    # data subject requests (refinery.privacy.requests)
    @abc.abstractmethod
    def privacy_request(self, kind: str, identifier: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def privacy_requests(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def privacy_request_get(self, request_id: str) -> dict[str, Any]: ...

    # segments and computed traits (refinery.segments.lifecycle)
    @abc.abstractmethod
    def segments(self) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def segment(self, name: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def create_segment(self, name: str, rule: str, description: str | None = None, run: bool = True) -> dict[str, Any]: ...
    @abc.abstractmethod
    def update_segment(self, name: str, rule: str | None = None, description: str | None = None, run: bool = True) -> dict[str, Any]: ...
    @abc.abstractmethod
    def delete_segment(self, name: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def preview_segment(self, rule: str, sample: int = 20, as_of: str | None = None, name: str | None = None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def run_segments(self, name: str | None = None, as_of: str | None = None, force: bool = False) -> dict[str, Any]: ...
    @abc.abstractmethod
    def segment_members(self, name: str, as_of: str | None = None, source: str = "history", limit: int = 1000) -> dict[str, Any]: ...
    @abc.abstractmethod
    def segment_history(self, name: str, limit: int = 50) -> dict[str, Any]: ...
    @abc.abstractmethod
    def explain_segment(self, name: str, profile: str, as_of: str | None = None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def computed_traits(self) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def define_computed_trait(self, name: str, expression: str, description: str | None = None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def compute_trait(self, name: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def delete_computed_trait(self, name: str) -> dict[str, Any]: ...


class LocalClient(Client):
    def __init__(self, settings: Settings):
        from refinery.runtime import Runtime

        self.rt = Runtime.open(settings, start_writer=False)

    # Audited as the API does, with the local user as the actor: changes in their transaction,
    # reads of personal data before the answer is returned.
    def _audited(self, e: Any, action: str, obj: str | None, details: dict[str, Any] | None = None) -> None:
        from refinery.governance import audit
        from refinery.governance.principal import local_principal

        audit.record(e, local_principal(), action, obj, details)

    def _audit_read(self, action: str, obj: str | None, details: dict[str, Any] | None = None) -> None:
        self.rt.writer.call(lambda e: self._audited(e, action, obj, details))

    def query(self, sql: str, limit: int | None) -> dict[str, Any]:
        from refinery.governance.objects import queried_tables
        from refinery.storage.query import run_query

        r = run_query(self.rt.engine, sql, limit=limit, timeout=self.rt.settings.query_timeout_seconds)
        self._audit_read("query.run", None, {"tables": queried_tables(sql, self.rt.engine.dialect), "rows": len(r.rows)})
        return {"columns": r.columns, "rows": [list(x) for x in r.rows], "truncated": r.truncated}

    def reveal(self, tokens: list[str]) -> dict[str, str]:
        values = self.rt.vault.reveal(self.rt.engine, tokens)
        self._audit_read("vault.reveal", None, {"tokens": len(tokens), "revealed": len(values)})
        return values

    def catalog(self, source: str | None) -> dict[str, Any]:
        from refinery.ingest import catalog

        return catalog.build(self.rt.engine, source=source)

    def sources(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.rt.sources.list()]

    def create_source(self, **fields: Any) -> dict[str, Any]:
        name = fields.pop("name")

        def create(e: Any) -> Any:
            made = self.rt.sources.create(e, name, **fields)
            self._audited(e, "sources.create", f"source:{name}", {k: v for k, v in fields.items() if k != "write_key"})
            return made

        source, key = self.rt.writer.call(create)
        return {**source.to_dict(), "write_key": key}

    def update_source(self, name: str, **fields: Any) -> dict[str, Any]:
        def change(e: Any) -> None:
            self.rt.sources.get(name)
            if fields.get("enabled") is not None:
                self.rt.sources.set_enabled(e, name, fields["enabled"])
            self.rt.sources.update(
                e, name, unplanned_events=fields.get("unplanned_events"), rate_limit_per_second=fields.get("rate_limit_per_second")
            )
            self._audited(e, "sources.update", f"source:{name}", {k: v for k, v in fields.items() if v is not None})

        self.rt.writer.call(change)
        return self.rt.sources.get(name).to_dict()

    def failed(self, **filters: Any) -> list[dict[str, Any]]:
        from refinery.ingest import replay

        return replay.list_failed(self.rt.engine, **filters)

    def replay(self, **filters: Any) -> dict[str, Any]:
        from refinery.ingest import replay

        return replay.replay(self.rt, **filters).to_dict()

    def import_file(self, path: Path, source: str, mapping: dict[str, Any], progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        from refinery.ingest.importer import run_import

        return run_import(self.rt, path, source=source, mapping=mapping, progress=progress).to_dict()

    def _rules(self) -> Any:
        from refinery.identity import rules_from_settings

        return rules_from_settings(self.rt.settings)

    def resolve_identities(self) -> dict[str, Any]:
        from refinery.governance import audit
        from refinery.profiles.build import Refresh

        refresh = Refresh.from_settings(self.rt.settings)

        def run(e: Any) -> dict[str, Any]:
            result = refresh(e)
            self._audited(e, "identity.resolve", None, audit.counts(result))
            return result

        with lineage.run(self.rt.settings, **lineage.RESOLVE) as lr:  # lineage: emitted outside the writer
            result: dict[str, Any] = self.rt.writer.call(run)
            lr.record_resolution(result)
        return result

    def match_identities(self, source: str | None = None) -> dict[str, Any]:
        from refinery.identity.matching.run import run_matching

        return run_matching(self.rt.engine, self.rt.writer, self.rt.settings, source=source)

    def persons(self, mode: str, threshold: float) -> dict[str, Any]:
        from refinery.profiles.persons import IdentityPolicy, persons, summary

        return summary(persons(self.rt.engine, IdentityPolicy(mode, threshold), self._rules()), IdentityPolicy(mode, threshold))

    def profile(self, profile_id: str) -> dict[str, Any]:
        from refinery.profiles import read

        profile = read.get(self.rt.engine, profile_id)
        self._audit_read("profiles.read", f"profile:{profile['profile_id']}", {"pii": True})
        return reveal_in(self.rt.engine, profile)

    def profile_lookup(self, identifier: str) -> dict[str, Any]:
        from refinery.profiles import read

        profile = read.lookup(self.rt.engine, identifier, self._rules())
        self._audit_read("profiles.read", f"profile:{profile['profile_id']}",
                         {"by": read.parse_identifier(identifier, self._rules())[0] or "any", "pii": True})
        return reveal_in(self.rt.engine, profile)

    def profile_events(self, profile_id: str, limit: int, before: str | None) -> list[dict[str, Any]]:
        from refinery.profiles import read

        rows = read.timeline(self.rt.engine, profile_id, limit=limit, before=before)
        self._audit_read("profiles.events", f"profile:{profile_id}", {"rows": len(rows), "pii": True})
        return reveal_in(self.rt.engine, rows)

    def explain(self, identifier: str) -> dict[str, Any]:
        from refinery.profiles.explain import explain

        result = explain(self.rt.engine, identifier, self._rules())
        self._audit_read("identity.explain", f"profile:{result['profile_id']}" if result.get("profile_id") else None, {"pii": True})
        return reveal_in(self.rt.engine, result)

    def _resolve_after(self, change: Callable[[Any, str], Any], action: str) -> dict[str, Any]:
        """Run `change(engine, actor)` (an override) then resolution + profile build, audited, in one writer transaction."""
        from refinery.governance import audit
        from refinery.governance.principal import local_principal
        from refinery.profiles.build import Refresh

        refresh, actor = Refresh.from_settings(self.rt.settings), local_principal()

        def work(e: Any) -> dict[str, Any]:
            o = change(e, actor.name)
            resolution = refresh(e)
            audit.record(e, actor, action, f"identity_override:{o.override_id}",
                         {"kind": o.kind, "identifier_types": sorted({i["type"] for i in o.identifiers}), **audit.counts(resolution)})
            return {"override": o.to_dict(), "resolution": resolution}

        with lineage.run(self.rt.settings, **lineage.OVERRIDE) as lr:
            result: dict[str, Any] = self.rt.writer.call(work)
            lr.record_override(result, "revoke" if action.endswith("_revoke") else "create")
        return result

    def create_override(self, kind: str, identifiers: list[str], profile: str | None, reason: str | None) -> dict[str, Any]:
        from refinery.identity import overrides

        rules = self._rules()
        return self._resolve_after(
            lambda e, actor: overrides.create(e, rules, kind, identifiers, profile=profile, reason=reason, actor=actor), "identity.override"
        )

    def overrides(self, include_revoked: bool) -> list[dict[str, Any]]:
        from refinery.identity import overrides

        return [o.to_dict() for o in overrides.list_overrides(self.rt.engine, include_revoked=include_revoked)]

    def revoke_override(self, override_id: str) -> dict[str, Any]:
        from refinery.identity import overrides

        return self._resolve_after(lambda e, actor: overrides.revoke(e, override_id, actor=actor), "identity.override_revoke")

    def identity_plan(self, rules: dict[str, Any] | None, examples: int) -> dict[str, Any]:
        from refinery.identity.plan import plan
        from refinery.identity.rules import parse_rules, thresholds_from_settings

        current = self._rules()
        proposed = parse_rules(rules, thresholds_from_settings(self.rt.settings)) if rules is not None else current
        result: dict[str, Any] = self.rt.writer.call(lambda e: plan(e, current, proposed, examples=examples))
        return result

    def close(self) -> None:
        self.rt.close()

    def consent(self, identifier: str, limit: int = 1000) -> dict[str, Any]:
        from refinery.governance.consent import ConsentService

        return ConsentService(self.rt.engine).for_identifier(identifier, self._rules(), limit=limit)

    def set_consent(self, identifier: str, purposes: dict[str, str] | None, tc_string: str | None) -> dict[str, Any]:
        from refinery.governance import audit
        from refinery.governance.consent import record_request
        from refinery.governance.principal import local_principal

        rules, actor = self._rules(), local_principal()

        def write(e: Any) -> dict[str, Any]:
            done = record_request(e, rules, identifier, purposes, tc_string, actor=actor.name)
            audit.record(e, actor, "consent.record", f"consent:{done.request_id}",
                         {"identifier_type": done.subject_type, "choices": done.choices, "tcf": tc_string is not None})
            return done.to_dict()

        with lineage.run(self.rt.settings, **lineage.CONSENT_RECORD) as lr:  # as POST /api/consent records it
            recorded: dict[str, Any] = self.rt.writer.call(write)
            lr.note(request_id=recorded["request_id"], identifier_type=recorded["subject_type"],
                    purposes=sorted(recorded["choices"]), tcf=tc_string is not None)
            lr.count("consent_log", len(recorded["log_ids"]))
        return {**recorded, **self.consent(identifier)}

    def sync_consent(self, full: bool = False) -> dict[str, Any]:
        from refinery.governance.consent_sync import run_audited
        from refinery.governance.principal import local_principal

        return run_audited(self.rt.settings, self.rt.writer, local_principal(), full=full)

    # retention: runs and overrides audited as the local user
    def retention_run(self, dry_run: bool = False) -> dict[str, Any]:
        from refinery.governance import retention
        from refinery.governance.principal import local_principal

        return retention.run(self.rt.engine, self.rt.writer, self.rt.settings, local_principal(), trigger="cli", dry_run=dry_run).to_dict()

    def retention_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        from refinery.governance import retention

        return retention.runs(self.rt.engine, limit=limit)

    def retention_policy(self) -> dict[str, Any]:
        from refinery.governance import retention

        return retention.Policy.load(self.rt.engine, self.rt.settings).to_dict()

    def set_retention(self, source: str, zone: str, days: int | None) -> dict[str, Any]:
        from refinery.governance import audit, retention
        from refinery.governance.principal import local_principal

        actor, known = local_principal(), [s.name for s in self.rt.sources.list()]

        def change(e: Any) -> None:
            retention.set_override(e, source, zone, days, actor=actor.name, known_sources=known)
            audit.record(e, actor, "retention.set", f"source:{source}", {"zone": zone, "days": days})

        self.rt.writer.call(change)
        return self.retention_policy()

    def lineage(self, target: str, limit: int = 50) -> dict[str, Any]:
        from refinery.profiles import read

        result = lineage.trail(self.rt.settings, self.rt.engine, target, limit=limit)
        if result["kind"] == "profile":  # audited as the API does: by identifier type, never the value
            by = "profile_id" if target.startswith("prof_") else read.parse_identifier(target, self._rules())[0] or "any"
            self._audit_read("lineage.read", f"profile:{result['profile_id']}", {"by": by, "events": result["total_events"]})
        return result


    # data subject requests, audited as the API does (by request id and identifier type)
    def privacy_request(self, kind: str, identifier: str) -> dict[str, Any]:
        from refinery.governance.principal import local_principal
        from refinery.privacy import requests

        if kind == "export":
            return requests.export(self.rt, identifier, local_principal())
        if kind == "erase":
            return requests.erase(self.rt, identifier, local_principal())
        raise requests.RequestError(f"Unknown request kind {kind!r}.", fix="Use export or erase.", field="kind")

    def privacy_requests(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        from refinery.privacy import requests

        rows = requests.list_requests(self.rt.engine, limit=limit, status=status)
        self._audit_read("privacy.requests_read", None, {"rows": len(rows)})
        return rows

    def privacy_request_get(self, request_id: str) -> dict[str, Any]:
        from refinery.privacy import requests

        body = requests.get(self.rt, request_id, with_document=True)
        self._audit_read("privacy.request_read", f"privacy_request:{request_id}", {"document": body.get("document") is not None})
        return body

    # segments: the API's operations (refinery.segments.lifecycle) as the local user
    def segments(self) -> list[dict[str, Any]]:
        from refinery.segments import lifecycle

        return lifecycle.list_segments(self.rt.engine)

    def segment(self, name: str) -> dict[str, Any]:
        from refinery.segments import lifecycle

        return lifecycle.show(self.rt.engine, name)

    def create_segment(self, name: str, rule: str, description: str | None = None, run: bool = True) -> dict[str, Any]:
        from refinery.governance.principal import local_principal
        from refinery.segments import lifecycle

        return lifecycle.create(self.rt.engine, self.rt.writer, local_principal(), name, rule, description, run=run, trigger="cli", rules=self._rules(),
                                settings=self.rt.settings)

    def update_segment(self, name: str, rule: str | None = None, description: str | None = None, run: bool = True) -> dict[str, Any]:
        from refinery.governance.principal import local_principal
        from refinery.segments import lifecycle

        return lifecycle.update(self.rt.engine, self.rt.writer, local_principal(), name, rule, description, run=run, rules=self._rules(),
                                settings=self.rt.settings)

    def delete_segment(self, name: str) -> dict[str, Any]:
        from refinery.governance.principal import local_principal
        from refinery.segments import lifecycle

        return lifecycle.delete(self.rt.writer, local_principal(), name, settings=self.rt.settings)

    def preview_segment(self, rule: str, sample: int = 20, as_of: str | None = None, name: str | None = None) -> dict[str, Any]:
        from refinery.governance.principal import local_principal
        from refinery.segments import lifecycle

        return lifecycle.run_preview(self.rt.engine, self.rt.writer, local_principal(), rule, sample=sample, as_of=as_of, name=name, rules=self._rules(),
                                     settings=self.rt.settings)

    def run_segments(self, name: str | None = None, as_of: str | None = None, force: bool = False) -> dict[str, Any]:
        from refinery.governance.principal import local_principal
        from refinery.segments import lifecycle

        return lifecycle.run(self.rt.engine, self.rt.writer, local_principal(), name, as_of=as_of, force=force, trigger="cli", rules=self._rules(),
                             settings=self.rt.settings)

    def segment_members(self, name: str, as_of: str | None = None, source: str = "history", limit: int = 1000) -> dict[str, Any]:
        from refinery.governance.principal import local_principal
        from refinery.segments import lifecycle

        return lifecycle.read_members(self.rt.engine, self.rt.writer, local_principal(), name, as_of=as_of, source=source, limit=limit, rules=self._rules(),
                                      settings=self.rt.settings)

    def segment_history(self, name: str, limit: int = 50) -> dict[str, Any]:
        from refinery.segments import lifecycle

        return lifecycle.read_history(self.rt.engine, name, limit)

    def explain_segment(self, name: str, profile: str, as_of: str | None = None) -> dict[str, Any]:
        from refinery.governance.principal import local_principal
        from refinery.segments import lifecycle

        return lifecycle.explain_profile(self.rt.engine, self.rt.writer, local_principal(), name, profile, as_of=as_of, rules=self._rules(),
                                         settings=self.rt.settings)

    def computed_traits(self) -> list[dict[str, Any]]:
        from refinery.segments import lifecycle

        return lifecycle.list_traits(self.rt.engine)

    def define_computed_trait(self, name: str, expression: str, description: str | None = None) -> dict[str, Any]:
        from refinery.governance.principal import local_principal
        from refinery.segments import lifecycle

        return lifecycle.define_trait(self.rt.writer, local_principal(), name, expression, description)

    def compute_trait(self, name: str) -> dict[str, Any]:
        from refinery.governance.principal import local_principal
        from refinery.segments import lifecycle

        return lifecycle.compute_trait(self.rt.engine, self.rt.writer, local_principal(), name, settings=self.rt.settings)

    def delete_computed_trait(self, name: str) -> dict[str, Any]:
        from refinery.governance.principal import local_principal
        from refinery.segments import lifecycle

        return lifecycle.delete_trait(self.rt.writer, local_principal(), name)


class RemoteClient(Client):
    def __init__(self, url: str, token: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ServerUnavailable(f"Cannot reach the Refinery server: {e}.", fix="Check that `refinery serve` is running.") from e
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {"message": r.text}
            err = RefineryError(body.get("message") or str(body), fix=body.get("fix"),
                                **({"caret": body["caret"]} if isinstance(body.get("caret"), str) else {}))
            err.http_status = r.status_code
            err.code = body.get("error", "error")
            raise err
        return r.json()

    def query(self, sql: str, limit: int | None) -> dict[str, Any]:
        return self._call("POST", "/api/query", json={"sql": sql, "limit": limit})  

    def reveal(self, tokens: list[str]) -> dict[str, str]:
        values: dict[str, str] = {}
        for i in range(0, len(tokens), REVEAL_MAX):
            values.update(self._call("POST", "/api/vault/reveal", json={"tokens": tokens[i:i + REVEAL_MAX]})["values"])
        return values

    def catalog(self, source: str | None) -> dict[str, Any]:
        return self._call("GET", "/api/catalog", params={"source": source} if source else None)  

    def sources(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/sources")["sources"]  

    def create_source(self, **fields: Any) -> dict[str, Any]:
        return self._call("POST", "/api/sources", json=fields)  

    def update_source(self, name: str, **fields: Any) -> dict[str, Any]:
        return self._call("PATCH", f"/api/sources/{name}", json=fields)  

    def failed(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        if "pending_only" in params:
            params["pending"] = params.pop("pending_only")
        return self._call("GET", "/api/events/failed", params=params)["failed"]  

    def replay(self, **filters: Any) -> dict[str, Any]:
        return self._call("POST", "/api/events/replay", json=filters)  

    def import_file(self, path: Path, source: str, mapping: dict[str, Any], progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        import time

        job: dict[str, Any] = self._call("POST", "/api/imports", json={"path": str(path.resolve()), "source": source, "mapping": mapping})
        while job["status"] in ("new", "started"):
            if progress:
                progress(job)
            time.sleep(0.25)
            job = self._call("GET", f"/api/imports/{job['import_id']}")
        if progress:
            progress(job)
        return job  

    def resolve_identities(self) -> dict[str, Any]:
        return self._call("POST", "/api/identity/resolve")  

    def match_identities(self, source: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/api/identity/match", params={"source": source} if source else None)  

    def persons(self, mode: str, threshold: float) -> dict[str, Any]:
        return self._call("GET", "/api/persons", params={"mode": mode, "threshold": threshold})  

    def profile(self, profile_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/profiles/{profile_id}")  

    def profile_lookup(self, identifier: str) -> dict[str, Any]:
        return self._call("GET", "/api/profiles", params={"identifier": identifier})  

    def profile_events(self, profile_id: str, limit: int, before: str | None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, **({"before": before} if before else {})}
        return self._call("GET", f"/api/profiles/{profile_id}/events", params=params)["events"]  

    def explain(self, identifier: str) -> dict[str, Any]:
        return self._call("GET", "/api/identity/explain", params={"identifier": identifier})  

    def create_override(self, kind: str, identifiers: list[str], profile: str | None, reason: str | None) -> dict[str, Any]:
        body = {"kind": kind, "identifiers": identifiers, "profile": profile, "reason": reason}
        result: dict[str, Any] = self._call("POST", "/api/identity/overrides", json=body)
        return result

    def overrides(self, include_revoked: bool) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/api/identity/overrides", params={"all": include_revoked})["overrides"]
        return result

    def revoke_override(self, override_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/api/identity/overrides/{override_id}/revoke")
        return result

    def identity_plan(self, rules: dict[str, Any] | None, examples: int) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/api/identity/plan", json={"rules": rules, "examples": examples})
        return result

    def close(self) -> None:
        self.http.close()

    def consent(self, identifier: str, limit: int = 1000) -> dict[str, Any]:
        return self._call("GET", "/api/consent", params={"identifier": identifier, "limit": limit})

    def set_consent(self, identifier: str, purposes: dict[str, str] | None, tc_string: str | None) -> dict[str, Any]:
        body = {"identifier": identifier, "purposes": purposes, "tcString": tc_string}
        return self._call("POST", "/api/consent", json=body)

    def sync_consent(self, full: bool = False) -> dict[str, Any]:
        return self._call("POST", "/api/consent/sync", params={"full": full})

    def retention_run(self, dry_run: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/api/retention/run", params={"dry_run": dry_run})
        return result

    def retention_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/api/retention/runs", params={"limit": limit})["runs"]
        return result

    def retention_policy(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/api/retention/policy")
        return result

    def set_retention(self, source: str, zone: str, days: int | None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PUT", f"/api/retention/sources/{source}", json={"zone": zone, "days": days})
        return result

    def lineage(self, target: str, limit: int = 50) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/api/lineage", params={"target": target, "limit": limit})
        return result

    def privacy_request(self, kind: str, identifier: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/api/privacy/requests", json={"kind": kind, "identifier": identifier})
        return result

    def privacy_requests(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
        result: list[dict[str, Any]] = self._call("GET", "/api/privacy/requests", params=params)["requests"]
        return result

    def privacy_request_get(self, request_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/privacy/requests/{request_id}")
        return result

    # segments
    def segments(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/api/segments")["segments"]
        return result

    def segment(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/segments/{_seg(name)}")
        return result

    def create_segment(self, name: str, rule: str, description: str | None = None, run: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/api/segments", json={"name": name, "rule": rule, "description": description, "run": run})
        return result

    def update_segment(self, name: str, rule: str | None = None, description: str | None = None, run: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PATCH", f"/api/segments/{_seg(name)}", json={"rule": rule, "description": description, "run": run})
        return result

    def delete_segment(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/api/segments/{_seg(name)}")
        return result

    def preview_segment(self, rule: str, sample: int = 20, as_of: str | None = None, name: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/api/segments/preview", json={"rule": rule, "sample": sample, "as_of": as_of, "name": name})
        return result

    def run_segments(self, name: str | None = None, as_of: str | None = None, force: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/api/segments/run", json={"name": name, "as_of": as_of, "force": force})
        return result

    def segment_members(self, name: str, as_of: str | None = None, source: str = "history", limit: int = 1000) -> dict[str, Any]:
        params: dict[str, Any] = {"source": source, "limit": limit, **({"as_of": as_of} if as_of else {})}
        result: dict[str, Any] = self._call("GET", f"/api/segments/{_seg(name)}/members", params=params)
        return result

    def segment_history(self, name: str, limit: int = 50) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/segments/{_seg(name)}/history", params={"limit": limit})
        return result

    def explain_segment(self, name: str, profile: str, as_of: str | None = None) -> dict[str, Any]:
        params = {"profile": profile, **({"as_of": as_of} if as_of else {})}
        result: dict[str, Any] = self._call("GET", f"/api/segments/{_seg(name)}/explain", params=params)
        return result

    def computed_traits(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/api/computed-traits")["computed_traits"]
        return result

    def define_computed_trait(self, name: str, expression: str, description: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/api/computed-traits", json={"name": name, "expression": expression, "description": description})
        return result

    def compute_trait(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/api/computed-traits/{_seg(name)}/compute")
        return result

    def delete_computed_trait(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/api/computed-traits/{_seg(name)}")
        return result


def _seg(name: str) -> str:
    """A segment or trait name as one path segment (names are checked on the server; this keeps '/' and '?' inside)."""
    from urllib.parse import quote

    return quote(name, safe="")


def connect(settings: Settings) -> Client:
    from refinery.api.auth import admin_token
    from refinery.api.server import running_server

    info = running_server(settings)
    if info is not None:
        return RemoteClient(info["url"], admin_token(settings))
    return LocalClient(settings)

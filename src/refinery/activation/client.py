"""How `refinery destinations` and `refinery syncs` reach the store: in-process, or through a running
server's admin API (DuckDB lets one process write the file). Mirrors `refinery.client`; both clients
offer the same methods. A local command acts as the local user (audited as `local:<user>`); without a
server, `syncs run` and `syncs replay` deliver in this process.
"""

from __future__ import annotations

import abc
from typing import Any
from urllib.parse import quote

from refinery.client import RemoteClient
from refinery.settings import Settings


def _p(name: str) -> str:
    return quote(name, safe="")


class ActivationClient(abc.ABC):
    @abc.abstractmethod
    def kinds(self) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def destinations(self) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def destination(self, name: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def create_destination(self, name: str, kind: str, purpose: str, config: dict[str, Any], description: str | None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def update_destination(self, name: str, **changes: Any) -> dict[str, Any]: ...
    @abc.abstractmethod
    def delete_destination(self, name: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def syncs(self) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def sync(self, name: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def create_sync(self, name: str, segment: str, destination: str, mapping: dict[str, str], mode: str, schedule: str,
                    batch_size: int | None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def update_sync(self, name: str, **changes: Any) -> dict[str, Any]: ...
    @abc.abstractmethod
    def delete_sync(self, name: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def run_sync(self, name: str, wait_seconds: float) -> dict[str, Any]: ...
    @abc.abstractmethod
    def runs(self, sync: str | None, limit: int) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def dead_letters(self, sync: str | None, destination: str | None, include_replayed: bool, limit: int) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def replay(self, batch_ids: list[str] | None, sync: str | None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> ActivationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalActivation(ActivationClient):
    def __init__(self, settings: Settings):
        from refinery.governance.principal import local_principal
        from refinery.runtime import Runtime

        self.rt = Runtime.open(settings, start_writer=False)
        self.actor = local_principal()

    def kinds(self) -> list[dict[str, Any]]:
        from refinery.activation import operations as ops

        return ops.list_kinds()

    def destinations(self) -> list[dict[str, Any]]:
        from refinery.activation import operations as ops

        return ops.list_destinations(self.rt)

    def destination(self, name: str) -> dict[str, Any]:
        from refinery.activation import operations as ops

        return ops.show_destination(self.rt, name)

    def create_destination(self, name: str, kind: str, purpose: str, config: dict[str, Any], description: str | None) -> dict[str, Any]:
        from refinery.activation import operations as ops

        return ops.create_destination(self.rt, self.actor, name, kind, purpose, config, description)

    def update_destination(self, name: str, **changes: Any) -> dict[str, Any]:
        from refinery.activation import operations as ops

        return ops.update_destination(self.rt, self.actor, name, **{k: v for k, v in changes.items() if v is not None})

    def delete_destination(self, name: str) -> dict[str, Any]:
        from refinery.activation import operations as ops

        return ops.delete_destination(self.rt, self.actor, name)

    def syncs(self) -> list[dict[str, Any]]:
        from refinery.activation import operations as ops

        return ops.list_syncs(self.rt)

    def sync(self, name: str) -> dict[str, Any]:
        from refinery.activation import operations as ops

        return ops.show_sync(self.rt, name)

    def create_sync(self, name: str, segment: str, destination: str, mapping: dict[str, str], mode: str, schedule: str,
                    batch_size: int | None) -> dict[str, Any]:
        from refinery.activation import operations as ops

        return ops.create_sync(self.rt, self.actor, name, segment, destination, mapping, mode=mode, schedule=schedule, batch_size=batch_size)

    def update_sync(self, name: str, **changes: Any) -> dict[str, Any]:
        from refinery.activation import operations as ops

        return ops.update_sync(self.rt, self.actor, name, **{k: v for k, v in changes.items() if v is not None})

    def delete_sync(self, name: str) -> dict[str, Any]:
        from refinery.activation import operations as ops

        return ops.delete_sync(self.rt, self.actor, name)

    def run_sync(self, name: str, wait_seconds: float) -> dict[str, Any]:
        from refinery.activation import operations as ops

        return ops.run_sync(self.rt, self.actor, name, trigger="cli", wait_seconds=wait_seconds)

    def runs(self, sync: str | None, limit: int) -> list[dict[str, Any]]:
        from refinery.activation import operations as ops

        return ops.list_runs(self.rt, sync, limit)

    def dead_letters(self, sync: str | None, destination: str | None, include_replayed: bool, limit: int) -> list[dict[str, Any]]:
        from refinery.activation import operations as ops

        return ops.dead_letters(self.rt, sync, destination, include_replayed, limit)

    def replay(self, batch_ids: list[str] | None, sync: str | None) -> dict[str, Any]:
        from refinery.activation import operations as ops

        return ops.replay(self.rt, self.actor, batch_ids, sync)

    def close(self) -> None:
        self.rt.close()


class RemoteActivation(ActivationClient):
    def __init__(self, url: str, token: str):
        self.remote = RemoteClient(url, token)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        return self.remote._call(method, path, **kw)

    def kinds(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/destinations/kinds")["kinds"])

    def destinations(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/destinations")["destinations"])

    def destination(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/destinations/{_p(name)}"))

    def create_destination(self, name: str, kind: str, purpose: str, config: dict[str, Any], description: str | None) -> dict[str, Any]:
        return dict(self._call("POST", "/api/destinations", json={"name": name, "kind": kind, "purpose": purpose, "config": config,
                                                                  "description": description}))

    def update_destination(self, name: str, **changes: Any) -> dict[str, Any]:
        return dict(self._call("PATCH", f"/api/destinations/{_p(name)}", json={k: v for k, v in changes.items() if v is not None}))

    def delete_destination(self, name: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/api/destinations/{_p(name)}"))

    def syncs(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/syncs")["syncs"])

    def sync(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/syncs/{_p(name)}"))

    def create_sync(self, name: str, segment: str, destination: str, mapping: dict[str, str], mode: str, schedule: str,
                    batch_size: int | None) -> dict[str, Any]:
        return dict(self._call("POST", "/api/syncs", json={"name": name, "segment": segment, "destination": destination, "mapping": mapping,
                                                           "mode": mode, "schedule": schedule, "batch_size": batch_size}))

    def update_sync(self, name: str, **changes: Any) -> dict[str, Any]:
        return dict(self._call("PATCH", f"/api/syncs/{_p(name)}", json={k: v for k, v in changes.items() if v is not None}))

    def delete_sync(self, name: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/api/syncs/{_p(name)}"))

    def run_sync(self, name: str, wait_seconds: float) -> dict[str, Any]:
        return dict(self._call("POST", f"/api/syncs/{_p(name)}/run", json={"wait_seconds": wait_seconds}))

    def runs(self, sync: str | None, limit: int) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, **({"sync": sync} if sync else {})}
        return list(self._call("GET", "/api/syncs/runs", params=params)["runs"])

    def dead_letters(self, sync: str | None, destination: str | None, include_replayed: bool, limit: int) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"sync": sync, "destination": destination, "include_replayed": include_replayed, "limit": limit}.items()
                  if v is not None}
        return list(self._call("GET", "/api/syncs/dead-letters", params=params)["dead_letters"])

    def replay(self, batch_ids: list[str] | None, sync: str | None) -> dict[str, Any]:
        return dict(self._call("POST", "/api/syncs/replay", json={"batch_ids": batch_ids, "sync": sync}))

    def close(self) -> None:
        self.remote.close()


def connect(settings: Settings) -> ActivationClient:
    from refinery.api.auth import admin_token
    from refinery.api.server import running_server

    info = running_server(settings)
    if info is not None:
        return RemoteActivation(info["url"], admin_token(settings))
    return LocalActivation(settings)

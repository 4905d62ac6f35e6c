"""How `refinery features` reaches the store: in-process, or through a running server's admin API
(DuckDB lets one process write the file). Both clients offer the same methods."""

from __future__ import annotations

import abc
from typing import Any
from urllib.parse import quote

from refinery.client import RemoteClient
from refinery.settings import Settings


def _p(name: str) -> str:
    return quote(name, safe="")


class FeaturesClient(abc.ABC):
    @abc.abstractmethod
    def features(self) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def feature(self, name: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def define(self, name: str, definition: str, *, create: bool, **fields: Any) -> dict[str, Any]: ...
    @abc.abstractmethod
    def delete(self, name: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def training_set(self, rows: list[dict[str, Any]], features: list[str], label: str | None, mode: str, unknown: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def materialize(self, names: list[str], full: bool) -> dict[str, Any]: ...
    @abc.abstractmethod
    def profile_features(self, profile_id: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> FeaturesClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalFeatures(FeaturesClient):
    def __init__(self, settings: Settings):
        from refinery.governance.principal import local_principal
        from refinery.runtime import Runtime

        self.rt = Runtime.open(settings)
        self.actor = local_principal()

    def features(self) -> list[dict[str, Any]]:
        from refinery.features import operations as ops

        return ops.list_features(self.rt)

    def feature(self, name: str) -> dict[str, Any]:
        from refinery.features import operations as ops

        return ops.show(self.rt, name)

    def define(self, name: str, definition: str, *, create: bool, **fields: Any) -> dict[str, Any]:
        from refinery.features import operations as ops

        return ops.define(self.rt, self.actor, name, definition, create=create, **fields)

    def delete(self, name: str) -> dict[str, Any]:
        from refinery.features import operations as ops

        return ops.delete(self.rt, self.actor, name)

    def training_set(self, rows: list[dict[str, Any]], features: list[str], label: str | None, mode: str, unknown: str) -> dict[str, Any]:
        from refinery.features import operations as ops

        return ops.build_training_set(self.rt, self.actor, rows, list(features), label=label, mode=mode, unknown=unknown)

    def materialize(self, names: list[str], full: bool) -> dict[str, Any]:
        from refinery.features import operations as ops

        return ops.materialize(self.rt, self.actor, names or None, full=full)

    def profile_features(self, profile_id: str) -> dict[str, Any]:
        from refinery.features import operations as ops

        return ops.profile_features(self.rt, self.actor, profile_id)

    def close(self) -> None:
        from refinery.features.online import close_store

        close_store(self.rt.engine)
        self.rt.close()


class RemoteFeatures(FeaturesClient):
    def __init__(self, url: str, token: str):
        self.remote = RemoteClient(url, token)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        return self.remote._call(method, path, **kw)

    def features(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/features")["features"])

    def feature(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/features/{_p(name)}"))

    def define(self, name: str, definition: str, *, create: bool, **fields: Any) -> dict[str, Any]:
        body = {"definition": definition, **{k: v for k, v in fields.items() if v is not None}}
        if create:
            return dict(self._call("POST", "/api/features", json={"name": name, **body}))
        return dict(self._call("PUT", f"/api/features/{_p(name)}", json=body))

    def delete(self, name: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/api/features/{_p(name)}"))

    def training_set(self, rows: list[dict[str, Any]], features: list[str], label: str | None, mode: str, unknown: str) -> dict[str, Any]:
        return dict(self._call("POST", "/api/features/training-set",
                               json={"rows": rows, "features": features, "label": label, "mode": mode, "unknown": unknown}))

    def materialize(self, names: list[str], full: bool) -> dict[str, Any]:
        return dict(self._call("POST", "/api/features/materialize", json={"features": names, "full": full}, timeout=600))

    def profile_features(self, profile_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/profiles/{_p(profile_id)}/features"))

    def close(self) -> None:
        self.remote.close()


def connect(settings: Settings) -> FeaturesClient:
    from refinery.api.auth import admin_token
    from refinery.api.server import running_server

    info = running_server(settings)
    if info is not None:
        return RemoteFeatures(info["url"], admin_token(settings))
    return LocalFeatures(settings)

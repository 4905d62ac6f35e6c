"""How `refinery tokens` and `refinery audit` reach the store: in-process, or through a running
server's admin API (DuckDB lets one process write the file). Mirrors `refinery.client`; both
clients offer the same methods. A command run on the data folder itself acts as a local admin
(whoever can read the folder can read `admin.token`), and is audited as `local:<user>`.
"""

from __future__ import annotations

import abc
from typing import Any

from refinery.client import RemoteClient
from refinery.governance import audit
from refinery.governance.principal import local_principal
from refinery.governance.tokens import bootstrap_token, expiry, store_for
from refinery.settings import Settings


class GovernanceClient(abc.ABC):
    @abc.abstractmethod
    def tokens(self, include_inactive: bool) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def create_token(self, name: str, role: str, sources: list[str] | None, expires: str | None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def revoke_token(self, ref: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def audit_entries(self, limit: int, after: int | None, action: str | None, actor: str | None) -> list[dict[str, Any]]: ...
    @abc.abstractmethod
    def audit_verify(self, expect: str | None) -> dict[str, Any]: ...
    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> GovernanceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalGovernance(GovernanceClient):
    def __init__(self, settings: Settings):
        from refinery.runtime import Runtime

        self.rt = Runtime.open(settings, start_writer=False)
        self.store = store_for(self.rt)
        self.actor = local_principal()

    def tokens(self, include_inactive: bool) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.store.list(include_inactive=include_inactive)]

    def create_token(self, name: str, role: str, sources: list[str] | None, expires: str | None) -> dict[str, Any]:
        lifetime = expiry(expires, self.rt.settings)
        token, secret = self.rt.writer.call(lambda e: self.store.create(e, self.actor, name, role, sources=sources, expires_in=lifetime))
        return {**token.to_dict(), "token": secret}

    def revoke_token(self, ref: str) -> dict[str, Any]:
        return self.rt.writer.call(lambda e: self.store.revoke(e, self.actor, ref)).to_dict()

    def audit_entries(self, limit: int, after: int | None, action: str | None, actor: str | None) -> list[dict[str, Any]]:
        return [e.to_dict() for e in audit.entries(self.rt.engine, limit=limit, after=after, action=action, actor=actor)]

    def audit_verify(self, expect: str | None) -> dict[str, Any]:
        return audit.verify(self.rt.engine, expect=audit.parse_head(expect) if expect else None).to_dict()

    def close(self) -> None:
        self.rt.close()


class RemoteGovernance(GovernanceClient):
    def __init__(self, url: str, token: str):
        self.remote = RemoteClient(url, token)

    def tokens(self, include_inactive: bool) -> list[dict[str, Any]]:
        return self.remote._call("GET", "/api/tokens", params={"all": include_inactive})["tokens"]

    def create_token(self, name: str, role: str, sources: list[str] | None, expires: str | None) -> dict[str, Any]:
        return self.remote._call("POST", "/api/tokens", json={"name": name, "role": role, "sources": sources, "expires": expires})

    def revoke_token(self, ref: str) -> dict[str, Any]:
        return self.remote._call("DELETE", f"/api/tokens/{ref}")

    def audit_entries(self, limit: int, after: int | None, action: str | None, actor: str | None) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"limit": limit, "after": after, "action": action, "actor": actor}.items() if v is not None}
        return self.remote._call("GET", "/api/audit", params=params)["entries"]

    def audit_verify(self, expect: str | None) -> dict[str, Any]:
        return self.remote._call("GET", "/api/audit/verify", params={"expect": expect} if expect else None)

    def close(self) -> None:
        self.remote.close()


def connect(settings: Settings) -> GovernanceClient:
    from refinery.api.server import running_server

    info = running_server(settings)
    if info is not None:
        return RemoteGovernance(info["url"], bootstrap_token(settings))
    return LocalGovernance(settings)

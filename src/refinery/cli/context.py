"""`refinery context PROFILE`: a profile's LLM context (docs/profiles.md#llm-context)."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer
from rich.markup import escape

from refinery.cli.common import DataDirOption, JsonOption, connected, console, print_json, print_table
from refinery.profiles import context as core
from refinery.settings import Settings


class ContextClient(abc.ABC):
    @abc.abstractmethod
    def context(self, profile_id: str, max_tokens: int) -> dict[str, Any]: ...
    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> ContextClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalContext(ContextClient):
    """On the data folder (no server running): audited as the local user."""

    def __init__(self, settings: Settings):
        from refinery.governance.principal import local_principal
        from refinery.runtime import Runtime

        self.rt = Runtime.open(settings)
        self.actor = local_principal()

    def context(self, profile_id: str, max_tokens: int) -> dict[str, Any]:
        return core.profile_context(self.rt, self.actor, profile_id, max_tokens)

    def close(self) -> None:
        self.rt.close()


class RemoteContext(ContextClient):
    """Through the running server's admin API."""

    def __init__(self, url: str, token: str):
        from refinery.client import RemoteClient

        self.remote = RemoteClient(url, token)

    def context(self, profile_id: str, max_tokens: int) -> dict[str, Any]:
        return dict(self.remote._call("GET", f"/api/profiles/{quote(profile_id, safe='')}/context", params={"max_tokens": max_tokens}))

    def close(self) -> None:
        self.remote.close()


def connect(settings: Settings) -> ContextClient:
    from refinery.api.auth import admin_token
    from refinery.api.server import running_server

    info = running_server(settings)
    if info is not None:
        return RemoteContext(info["url"], admin_token(settings))
    return LocalContext(settings)


def show(
    profile_id: str = typer.Argument(..., help="A profile id (a merged one answers with its survivor's)."),
    max_tokens: int = typer.Option(core.DEFAULT_MAX_TOKENS, "--max-tokens", min=core.MIN_MAX_TOKENS, max=core.MAX_MAX_TOKENS,
                                   help="The budget, as the words4 estimator counts tokens; the least important lines go first."),
    data_dir: Path = DataDirOption, as_json: bool = JsonOption,
) -> None:
    """A profile's LLM context: segments, non-personal traits and recent behaviour, with the
    message ids each line came from. Nothing for a person without personalisation consent.

    Examples:
      refinery context p_3f2a...
      refinery context p_3f2a... --max-tokens 64 --json
    """
    with connected(connect, data_dir) as c:
        result = c.context(profile_id, max_tokens)
    if as_json:
        print_json(result)
        return
    if result.get("reason"):
        console.print(f"[yellow]{escape(result['reason'])}[/]")
        return
    console.print(result["context"], markup=False, highlight=False)
    t = result["tokens"]
    console.print(f"[dim]{t['estimate']} of {t['max']} tokens ({t['estimator']}); "
                  f"{len(result['citations'])} events cited; {len(result['dropped'])} lines dropped for the budget, "
                  f"{len(result['withheld'])} withheld as personal or unsafe[/]")
    if result["dropped"]:
        print_table(result["dropped"], ["section", "key", "tokens"], title="dropped (least important first)")

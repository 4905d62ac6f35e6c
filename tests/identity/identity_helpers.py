"""Identity test helpers (imported by name: a module called conftest would clash with the other
conftest modules on sys.path): events go in through the real staging and cleaning path (in-process, one
writer), then `refinery.identity.resolve` runs inside the writer like the CLI runs it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlglot import exp

from refinery.identity import IdentityRules, ResolveReport, resolve
from refinery.identity.rules import PII_TYPES
from refinery.privacy.pii import protect_identifier
from refinery.privacy.tokens import TOKEN_PATTERN
from refinery.runtime import Runtime
from support import T0, event, fresh_runtime, write_events

__all__ = ["T0", "Identity", "event", "ident"]

_TOKENS = re.compile(TOKEN_PATTERN)

class Identity:
    """A runtime plus helpers to send events and read the identity tables."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def send(self, *events: dict[str, Any], source: str = "web", check: bool = True) -> None:
        outcomes = write_events(self.rt, *events, source=source)
        bad = [o for o in outcomes if o.status != "loaded"]
        assert not (check and bad), bad

    def resolve(self, rules: IdentityRules | None = None) -> ResolveReport:
        return self.rt.writer.call(lambda e: resolve(e, rules or IdentityRules()))  # type: ignore[no-any-return]

    def edges(self) -> list[tuple[tuple[str, str], tuple[str, str]]]:
        return [((r["a_type"], r["a_value"]), (r["b_type"], r["b_value"])) for r in self.rows("SELECT * FROM identity_edges")]

    def rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Rows as a person reads them: personal values (stored as tokens) revealed from the vault."""
        rows = self.rt.engine.fetch_dicts(sql, params, cursor=self.rt.engine.reader())
        return [{k: self.clear(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]

    def clear(self, text: str) -> str:
        """`text` with every token in it (JSON included) replaced by its value from the vault."""
        tokens = set(_TOKENS.findall(text))
        if not tokens:
            return text
        values = self.rt.vault.reveal(self.rt.engine, tokens)
        return _TOKENS.sub(lambda m: values.get(m.group(0), m.group(0)), text)

    def stored(self, kind: str, value: str) -> str:
        """The identity tables' form of a normalised value: its token for personal types."""
        return str(protect_identifier(self.rt.engine, kind, exp.Literal.string(value)).this) if kind in PII_TYPES else value

    def profile(self, kind: str, value: str) -> str | None:
        rows = self.rows("SELECT profile_id FROM identities WHERE identifier_type = ? AND value = ?", [kind, self.stored(kind, value)])
        assert rows, f"{kind}={value!r} not in identities"
        return rows[0]["profile_id"]  # type: ignore[no-any-return]

    def identity(self, kind: str, value: str) -> dict[str, Any]:
        rows = self.rows("SELECT * FROM identities WHERE identifier_type = ? AND value = ?", [kind, self.stored(kind, value)])
        assert rows, f"{kind}={value!r} not in identities"
        return rows[0]

    def blocked(self, reason: str | None = None) -> list[dict[str, Any]]:
        if reason is None:
            return self.rows("SELECT * FROM identity_blocked")
        return self.rows("SELECT * FROM identity_blocked WHERE reason = ?", [reason])

    def assignment(self) -> dict[tuple[str, str], str | None]:
        return {(r["identifier_type"], r["value"]): r["profile_id"] for r in self.rows("SELECT * FROM identities")}


@pytest.fixture
def ident(tmp_path: Path) -> Iterator[Identity]:
    with fresh_runtime(tmp_path) as rt:
        yield Identity(rt)

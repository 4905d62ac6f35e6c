"""API tokens: a name, a role, optionally some sources, an expiry; stored as a SHA-256 hash.

The token itself is shown once, at creation; the store keeps its hash and a prefix to recognise it
in lists. Tokens carry 256 random bits, so a plain SHA-256 cannot be reversed or guessed (a slow
password hash would only slow every request). The bootstrap admin token (`<data_dir>/admin.token`)
is not stored here; `authenticate` accepts it beside the stored tokens. Source write keys are not
tokens: `authenticate` refuses them.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from refinery.errors import NotFoundError
from refinery.governance import audit
from refinery.governance.errors import PermissionDenied, TokenError, Unauthenticated
from refinery.governance.permissions import get_role, grants
from refinery.governance.principal import BOOTSTRAP_ADMIN, Principal
from refinery.ingest.sources import SourceRegistry, validate_name
from refinery.settings import Settings
from refinery.storage.engine import Engine

TOKEN_PREFIX = "rft_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_COLUMNS = "token_id, name, token_prefix, role, sources, created_at, created_by, expires_at, revoked_at, revoked_by"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '90m', '2w' or '45s' as a duration."""
    m = _DURATION.match(text)
    if not m or int(m.group(1)) <= 0:
        raise TokenError(f"Expiry {text!r} is not a duration.", fix="Write a positive number and a unit: 30d, 12h, 90m, 2w.", field="expires")
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


@dataclass(frozen=True)
class Token:
    token_id: str
    name: str
    token_prefix: str
    role: str
    sources: tuple[str, ...] | None
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None

    def state(self, now: datetime | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC)):
            return "expired"
        return "active"

    def principal(self) -> Principal:
        return Principal(self.token_id, self.name, self.role, frozenset(self.sources) if self.sources is not None else None)

    def to_dict(self) -> dict[str, Any]:
        iso = lambda d: d.isoformat() if d is not None else None  # noqa: E731
        return {"token_id": self.token_id, "name": self.name, "token_prefix": self.token_prefix, "role": self.role,
                "sources": list(self.sources) if self.sources is not None else None, "state": self.state(),
                "created_at": iso(self.created_at), "created_by": self.created_by, "expires_at": iso(self.expires_at),
                "revoked_at": iso(self.revoked_at), "revoked_by": self.revoked_by}


def _token(row: tuple[Any, ...]) -> Token:
    sources = json.loads(row[4]) if isinstance(row[4], str) else row[4]
    return Token(row[0], row[1], row[2], row[3], tuple(sources) if sources is not None else None, *row[5:])


class TokenStore:
    """Reads through reader cursors (with a cache of hashes for authentication), writes inside the writer."""

    def __init__(self, engine: Engine, bootstrap_token: str, sources: SourceRegistry):
        self.engine = engine
        self._bootstrap = bootstrap_token.encode("utf-8")
        self._sources = sources
        self._lock = threading.Lock()
        self._by_hash: dict[str, Token] | None = None

    # --- reads --------------------------------------------------------------------------------
    def list(self, *, include_inactive: bool = False) -> list[Token]:
        rows = self.engine.fetch_all(f"SELECT {_COLUMNS} FROM api_tokens ORDER BY created_at, name", cursor=self.engine.reader())  # noqa: S608 - constant text
        tokens = [_token(r) for r in rows]
        return tokens if include_inactive else [t for t in tokens if t.state() == "active"]

    def get(self, ref: str, engine: Engine | None = None) -> Token:
        """A token by id, by name (the active one) or by its shown prefix."""
        e = engine or self.engine
        cur = None if engine is not None else self.engine.reader()
        rows = [_token(r) for r in e.fetch_all(
            f"SELECT {_COLUMNS} FROM api_tokens WHERE token_id = ? OR name = ? OR token_prefix = ? ORDER BY created_at DESC",  # noqa: S608 - constant text
            [ref, ref, ref], cursor=cur,
        )]
        exact = [t for t in rows if t.token_id == ref] or [t for t in rows if t.state() == "active"] or rows
        if not exact:
            raise NotFoundError(f"No token {ref!r} (by id, name or prefix).", fix="List tokens with: refinery tokens list --all")
        if len(exact) > 1:
            raise TokenError(f"{ref!r} names {len(exact)} tokens.", fix="Use the token id from: refinery tokens list --all")
        return exact[0]

    def authenticate(self, bearer: str) -> Principal:
        """The principal a bearer token stands for; 401 when unknown, expired or revoked, 403 for a write key."""
        if hmac.compare_digest(bearer.encode("utf-8"), self._bootstrap):
            return BOOTSTRAP_ADMIN
        if self._sources.by_write_key(bearer) is not None:
            raise PermissionDenied(
                "A source's write key can only send events; it does not open the admin API.",
                fix="Use an API token: refinery tokens create NAME --role ROLE.",
            )
        with self._lock:
            if self._by_hash is None:
                rows = self.engine.fetch_all(f"SELECT token_hash, {_COLUMNS} FROM api_tokens WHERE revoked_at IS NULL", cursor=self.engine.reader())  # noqa: S608 - constant text
                self._by_hash = {r[0]: _token(r[1:]) for r in rows}
            token = self._by_hash.get(hash_token(bearer))
        if token is None:
            raise Unauthenticated("The token is not known (or was revoked).", fix="Check the token, or create one: refinery tokens create NAME --role ROLE.")
        if token.state() == "expired":
            raise Unauthenticated(f"Token {token.name!r} expired at {token.expires_at}.", fix=f"Create a new one: refinery tokens create NAME --role {token.role}.")
        return token.principal()

    def invalidate(self) -> None:
        with self._lock:
            self._by_hash = None

    # --- writes (inside the writer) -------------------------------------------------------------
    def create(self, engine: Engine, actor: Principal, name: str, role: str, *, sources: Sequence[str] | None = None,
               expires_in: timedelta | None = None) -> tuple[Token, str]:
        """Create a token and record it in the audit log; returns it with the token (shown once)."""
        if not _NAME.match(name):
            raise TokenError(f"Token name {name!r} is not valid.", fix="Use 1-63 letters, digits, '.', '-' or '_' (e.g. 'jane-analyst').", field="name")
        granted = get_role(role)
        if not all(grants(actor.grants, g) if g != "*" else "*" in actor.grants for g in granted.grants):
            raise PermissionDenied(f"Token {actor.name!r} (role {actor.role}) may not create a token with more rights (role {role}).",
                                   fix="Ask an admin to create it.")
        scope = self._scope(engine, actor, sources)
        now = datetime.now(UTC)
        active = [_token(r) for r in engine.fetch_all(f"SELECT {_COLUMNS} FROM api_tokens WHERE name = ? AND revoked_at IS NULL", [name])]  # noqa: S608 - constant text
        if any(t.state(now) == "active" for t in active):
            raise TokenError(f"An active token named {name!r} exists.", fix=f"Pick another name, or revoke it first: refinery tokens revoke {name}.", field="name")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = Token("tok_" + secrets.token_hex(8), name, secret[:10], role, tuple(scope) if scope is not None else None,
                      now, actor.name, now + expires_in if expires_in else None, None, None)
        engine.execute(
            "INSERT INTO api_tokens (token_id, name, token_hash, token_prefix, role, sources, created_at, created_by, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [token.token_id, name, hash_token(secret), token.token_prefix, role,
             json.dumps(scope) if scope is not None else None, now, actor.name, token.expires_at],
        )
        audit.record(engine, actor, "tokens.create", f"token:{token.token_id}",
                     {"token_name": name, "role": role, "sources": scope, "expires_at": token.expires_at.isoformat() if token.expires_at else None})
        self.invalidate()
        return token, secret

    @staticmethod
    def _scope(engine: Engine, actor: Principal, sources: Sequence[str] | None) -> builtins.list[str] | None:
        """The sources a new token is limited to: known sources, within the creator's own scope."""
        if sources is None:
            return sorted(actor.sources) if actor.sources is not None else None
        chosen = sorted({validate_name(s.strip()) for s in sources if s.strip()})
        if not chosen:
            raise TokenError("The list of sources is empty.", fix="Name at least one source, or leave the list out for every source.", field="sources")
        if actor.sources is not None and not set(chosen) <= actor.sources:
            raise PermissionDenied(f"Token {actor.name!r} may not give access to sources it cannot reach.", fix="Ask an admin to create it.")
        known = {r[0] for r in engine.fetch_all("SELECT name FROM sources")}
        unknown = [s for s in chosen if s not in known]
        if unknown:
            raise TokenError(f"Unknown source(s): {', '.join(unknown)}.", fix="Create them first (refinery sources create NAME), or fix the names.", field="sources")
        return chosen

    def revoke(self, engine: Engine, actor: Principal, ref: str) -> Token:
        token = self.get(ref, engine)
        if token.revoked_at is not None:
            raise TokenError(f"Token {token.name!r} ({token.token_id}) was already revoked at {token.revoked_at}.", fix="Nothing to do.")
        now = datetime.now(UTC)
        engine.execute("UPDATE api_tokens SET revoked_at = ?, revoked_by = ? WHERE token_id = ?", [now, actor.name, token.token_id])
        audit.record(engine, actor, "tokens.revoke", f"token:{token.token_id}", {"token_name": token.name, "role": token.role})
        self.invalidate()
        return self.get(token.token_id, engine)


def bootstrap_token(settings: Settings) -> str:
    """The bootstrap admin token: the `admin_token` setting, or the one kept in `<data_dir>/admin.token`
    (created with mode 0600 on first use). It is never stored in the database."""
    if settings.admin_token:
        return settings.admin_token
    path: Path = settings.data_dir / "admin.token"
    if path.exists():
        return path.read_text("utf-8").strip()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    token = "rfa_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def expiry(text: str | None, settings: Settings) -> timedelta | None:
    """How long a new token lives: `text` ('30d', 'never'), else the `token_default_expiry` setting."""
    chosen = text if text is not None else settings.token_default_expiry
    if chosen.strip().lower() in ("never", "none", "0", ""):
        return None
    return parse_duration(chosen)


def store_for(runtime: Any) -> TokenStore:
    """The runtime's token store, built once (kept in `runtime.extras`)."""
    store = runtime.extras.get("governance.tokens")
    if store is None:
        store = TokenStore(runtime.engine, bootstrap_token(runtime.settings), runtime.sources)
        runtime.extras["governance.tokens"] = store
    return store

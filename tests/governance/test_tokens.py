"""API tokens: shown once, stored as a hash, scoped, expiring, revocable; write keys never pass."""

from __future__ import annotations

from datetime import timedelta

import pytest

from refinery.errors import ConfigurationError, NotFoundError
from refinery.governance import audit
from refinery.governance.errors import PermissionDenied, TokenError, Unauthenticated
from refinery.governance.permissions import ROLES, define_role
from refinery.governance.principal import BOOTSTRAP_ADMIN, Principal
from refinery.governance.tokens import TokenStore, expiry, parse_duration, store_for
from refinery.runtime import Runtime
from refinery.settings import Settings
from support import WRITE_KEY


@pytest.fixture
def store(runtime: Runtime) -> TokenStore:
    runtime.writer.call(lambda e: runtime.sources.create(e, "app"))
    return store_for(runtime)


def _create(runtime: Runtime, store: TokenStore, name: str, role: str = "analyst", actor: Principal = BOOTSTRAP_ADMIN, **kw):  # type: ignore[no-untyped-def]
    return runtime.writer.call(lambda e: store.create(e, actor, name, role, **kw))


def test_a_token_is_shown_once_and_stored_only_as_a_hash(runtime: Runtime, store: TokenStore) -> None:
    token, secret = _create(runtime, store, "jane")
    assert secret.startswith("rft_") and len(secret) > 40 and secret.startswith(token.token_prefix)
    assert store.authenticate(secret) == Principal(token.token_id, "jane", "analyst", None)
    stored = runtime.engine.fetch_all("SELECT * FROM api_tokens")
    assert secret not in repr(stored)
    runtime.engine.execute("CHECKPOINT")
    assert secret.encode() not in runtime.settings.database_path.read_bytes()
    entry = audit.entries(runtime.engine)[-1]
    assert (entry.action, entry.object, entry.actor_id) == ("tokens.create", f"token:{token.token_id}", "admin")
    assert secret not in repr(entry)


def test_bootstrap_unknown_and_write_keys(runtime: Runtime, store: TokenStore) -> None:
    assert store.authenticate("test-admin-token") == BOOTSTRAP_ADMIN
    with pytest.raises(Unauthenticated):
        store.authenticate("rft_made-up")
    with pytest.raises(PermissionDenied, match="write key"):
        store.authenticate(WRITE_KEY)


def test_revoked_and_expired_tokens_are_refused(runtime: Runtime, store: TokenStore) -> None:
    _, secret = _create(runtime, store, "temp", expires_in=timedelta(hours=1))
    store.authenticate(secret)
    revoked = runtime.writer.call(lambda e: store.revoke(e, BOOTSTRAP_ADMIN, "temp"))
    assert revoked.state() == "revoked" and revoked.revoked_by == "bootstrap admin"
    with pytest.raises(Unauthenticated):
        store.authenticate(secret)
    with pytest.raises(TokenError, match="already revoked"):
        runtime.writer.call(lambda e: store.revoke(e, BOOTSTRAP_ADMIN, revoked.token_id))
    # the name is free again once revoked
    token, secret = _create(runtime, store, "temp", expires_in=timedelta(hours=1))
    runtime.engine.execute("UPDATE api_tokens SET expires_at = now() - INTERVAL 1 MINUTE WHERE token_id = ?", [token.token_id])
    store.invalidate()
    with pytest.raises(Unauthenticated, match="expired"):
        store.authenticate(secret)
    assert [t.name for t in store.list()] == []
    assert sorted(t.state() for t in store.list(include_inactive=True)) == ["expired", "revoked"]
    assert [e.action for e in audit.entries(runtime.engine)] == ["tokens.create", "tokens.revoke", "tokens.create"]


def test_bad_requests_name_the_field(runtime: Runtime, store: TokenStore) -> None:
    _create(runtime, store, "jane")
    for kw, field in (({"name": "jane"}, "name"), ({"name": "bad name!"}, "name"), ({"name": "x", "role": "owner"}, "role"),
                      ({"name": "x", "sources": ["nope"]}, "sources"), ({"name": "x", "sources": [" "]}, "sources")):
        args = {"role": "analyst", **kw}
        with pytest.raises(ConfigurationError) as e:
            _create(runtime, store, args.pop("name"), args.pop("role"), **args)
        assert getattr(e.value, "field", None) == field, (kw, e.value)
    with pytest.raises(NotFoundError):
        store.get("nobody")
    with pytest.raises(TokenError, match="30d"):
        parse_duration("soon")
    assert parse_duration("2w") == timedelta(weeks=2)
    assert expiry(None, Settings(token_default_expiry="never")) is None
    assert expiry(None, Settings()) == timedelta(days=90)


def test_scopes_and_no_escalation(runtime: Runtime, store: TokenStore) -> None:
    token, secret = _create(runtime, store, "web-team", "marketer", sources=["web", " web"])
    assert token.sources == ("web",) and store.authenticate(secret).sources == frozenset({"web"})
    define_role("token_clerk", "test role: may mint tokens", ["tokens:write", "events:read"])
    try:
        clerk = Principal("tok_c", "clerk", "token_clerk", frozenset({"web"}))
        with pytest.raises(PermissionDenied, match="more rights"):
            _create(runtime, store, "escalated", "admin", actor=clerk)
        with pytest.raises(PermissionDenied, match="more rights"):
            _create(runtime, store, "escalated", "analyst", actor=clerk)  # analyst holds query:read, the clerk does not
        define_role("reader", "test role", ["events:read"])
        inherited, _ = _create(runtime, store, "inherits", "reader", actor=clerk)
        assert inherited.sources == ("web",)  # a scoped creator passes its scope on
        with pytest.raises(PermissionDenied, match="cannot reach"):
            _create(runtime, store, "wider", "reader", actor=clerk, sources=["app"])
    finally:
        ROLES.pop("token_clerk", None)
        ROLES.pop("reader", None)

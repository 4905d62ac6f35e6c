"""`refinery query` sees tokens without their hashes, and the audit log."""

from __future__ import annotations

import pytest

from refinery.errors import QueryError
from refinery.governance import audit
from refinery.governance.principal import BOOTSTRAP_ADMIN
from refinery.governance.tokens import store_for
from refinery.runtime import Runtime
from refinery.storage.query import run_query


def test_tokens_are_queryable_without_hashes_and_the_audit_log_is_too(runtime: Runtime) -> None:
    store = store_for(runtime)
    token, secret = runtime.writer.call(lambda e: store.create(e, BOOTSTRAP_ADMIN, "jane", "analyst"))
    result = run_query(runtime.engine, "SELECT * FROM api_tokens")
    assert "token_hash" not in result.columns and result.to_dicts()[0]["token_id"] == token.token_id
    assert secret not in repr(result.rows)
    with pytest.raises(QueryError):
        run_query(runtime.engine, "SELECT token_hash FROM api_tokens")
    rows = run_query(runtime.engine, "SELECT seq, action, object FROM audit_log").rows
    assert rows == [(1, "tokens.create", f"token:{token.token_id}")]
    assert audit.verify(runtime.engine).ok

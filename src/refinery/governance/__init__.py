"""Governance: who may do what (roles, API tokens, source scopes) and the record of what was done
(the hash-chained audit log). Consent, pseudonymisation, erasure, retention and lineage plug in
here: each records through `audit.record` and declares its permissions with `register_permission`.
"""

from __future__ import annotations

from refinery.governance.audit import AuditEntry, Verification, record, record_now, verify
from refinery.governance.permissions import (
    PERMISSIONS,
    ROLES,
    Role,
    get_role,
    grant,
    grants,
    register_permission,
)
from refinery.governance.principal import BOOTSTRAP_ADMIN, Principal, local_principal
from refinery.governance.tokens import Token, TokenStore, bootstrap_token, store_for

__all__ = [
    "BOOTSTRAP_ADMIN", "PERMISSIONS", "ROLES", "AuditEntry", "Principal", "Role", "Token", "TokenStore", "Verification",
    "bootstrap_token", "get_role", "grant", "grants", "local_principal", "record", "record_now", "register_permission",
    "store_for", "verify",
]

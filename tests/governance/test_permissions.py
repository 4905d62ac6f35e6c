"""Permissions and roles are data: grants by name, by resource wildcard, or everything; typos fail loudly."""

from __future__ import annotations

import pytest

from refinery.governance.errors import PermissionDenied, UnknownPermission
from refinery.governance.permissions import (
    PERMISSIONS,
    ROLES,
    check_permission,
    get_role,
    grants,
    register_permission,
)
from refinery.governance.principal import Principal


def test_grants_by_name_by_resource_wildcard_and_by_star() -> None:
    assert grants({"profiles:read"}, "profiles:read")
    assert not grants({"profiles:read"}, "pii:read")
    assert grants({"privacy:*"}, "privacy:write")
    assert not grants({"privacy:*"}, "profiles:read")
    assert grants({"*"}, "tokens:write")


def test_the_built_in_roles() -> None:
    assert set(ROLES) >= {"admin", "privacy_officer", "marketer", "analyst"}
    assert all(get_role("admin").allows(p) for p in PERMISSIONS)
    officer, marketer, analyst = get_role("privacy_officer"), get_role("marketer"), get_role("analyst")
    assert officer.allows("pii:read") and officer.allows("audit:read") and officer.allows("privacy:write")
    assert not officer.allows("tokens:write") and not officer.allows("sources:write")
    for role in (marketer, analyst):
        assert not role.allows("pii:read"), f"{role.name} must not see personal data in clear"
        assert not role.allows("tokens:write") and not role.allows("audit:read") and not role.allows("identity:write")
    assert analyst.allows("query:read") and not marketer.allows("query:read")


def test_unknown_permissions_and_roles_are_refused() -> None:
    with pytest.raises(UnknownPermission, match="profile:read"):
        check_permission("profile:read")
    with pytest.raises(UnknownPermission, match="resource:action"):
        register_permission("nocolon", "x")
    with pytest.raises(UnknownPermission, match="Unknown role 'owner'") as e:
        get_role("owner")
    assert "analyst" in (e.value.fix or "")


def test_a_principal_names_what_it_lacks_and_its_sources() -> None:
    p = Principal("tok_1", "jane", "analyst", frozenset({"web"}))
    p.check(["events:read"])
    with pytest.raises(PermissionDenied, match="pii:read"):
        p.check(["profiles:read", "pii:read"])
    p.check_sources(["web"], where="?source=")
    with pytest.raises(PermissionDenied, match="may not reach app"):
        p.check_sources(["app"], where="?source=")
    with pytest.raises(PermissionDenied, match="not limited to one"):
        p.check_sources(None, where="?source=")
    Principal("tok_2", "all", "analyst").check_sources(None, where="-")  # unscoped: every source

"""docs/governance.md stays true: its roles table is the roles the code defines."""

from __future__ import annotations

import re
from pathlib import Path

from refinery.governance.permissions import ROLES

DOC = Path(__file__).resolve().parents[2] / "docs" / "governance.md"


def test_the_roles_table_matches_the_code() -> None:
    documented = {}
    for line in DOC.read_text("utf-8").splitlines():
        m = re.match(r"^\|\s*`(\w+)`\s*\|\s*((?:`[^`]+`,?\s*)+)\|$", line)
        if m and m.group(1) in ROLES:
            documented[m.group(1)] = set(re.findall(r"`([^`]+)`", m.group(2)))
    assert documented == {name: set(role.grants) for name, role in ROLES.items()}

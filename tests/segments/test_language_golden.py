"""Golden files: each tests/segments/golden/NAME.rule compiles to NAME.sql (as of a fixed moment).

Regenerate after an intended change with `REFINERY_UPDATE_GOLDEN=1 pytest tests/segments/test_language_golden.py`
and read the diff: it is the change in what every rule costs and means."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from refinery.segments import Catalog, CompileContext, compile_rule

GOLDEN = Path(__file__).parent / "golden"
AS_OF = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)
CATALOG = Catalog(
    events={
        "page_view": {"url": "string", "path": "string", "referrer": "string"},
        "Order Completed": {"total": "number", "category": "string", "items": "array", "url": "string"},
        "Product Viewed": {"category": "string", "price": "number", "sku": "string"},
    },
    traits={"plan": "string", "age": "number", "email": "string", "name": "string"},
    personal_traits=frozenset({"email", "name"}),
)
CTX = CompileContext(CATALOG, segments={"high_value": "sum(total) of 'Order Completed' > 500 counted by persons above 0.9"},
                     tokenise=lambda kind, normal: f"pii:{kind}:<{normal}>")


@pytest.mark.parametrize("rule", sorted(GOLDEN.glob("*.rule")), ids=lambda p: p.stem)
def test_rule_compiles_to_its_golden_sql(rule: Path) -> None:
    sql = compile_rule(rule.read_text(encoding="utf-8"), CTX).sql(AS_OF) + "\n"
    golden = rule.with_suffix(".sql")
    if os.environ.get("REFINERY_UPDATE_GOLDEN") == "1":
        golden.write_text(sql, encoding="utf-8")
    assert golden.exists(), f"{golden.name} is missing: run with REFINERY_UPDATE_GOLDEN=1 and review it"
    assert sql == golden.read_text(encoding="utf-8")

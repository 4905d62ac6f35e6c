"""Identity resolution: identifiers from the clean zone, an evidence-keeping graph, merge
protection, stable profile ids (docs/identity.md).

The deterministic graph lives here (`rules`, `normalise`, `extract`, `graph`, `resolve`);
probabilistic matching lives in `identity.matching`.
"""

from __future__ import annotations

from refinery.identity.errors import IdentityRulesError
from refinery.identity.resolve import ResolveReport, resolve
from refinery.identity.rules import (
    BUILTIN_TYPES,
    IdentityRules,
    load_rules_file,
    parse_rules,
    rules_from_settings,
)

__all__ = [
    "BUILTIN_TYPES", "IdentityRules", "IdentityRulesError", "ResolveReport", "load_rules_file", "parse_rules", "resolve",
    "rules_from_settings",
]

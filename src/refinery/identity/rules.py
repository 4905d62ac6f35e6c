"""Identity rules: which identifier types exist, their priority, per-profile limits, blocked values,
identifiers declared by JSON path, and the thresholds that stop over-merging.

Scalar knobs are settings (`identity_*` in docs/configuration.md); the structured parts live in an
identity rules file (YAML or JSON, `<data_dir>/identity-rules.yaml` by default; docs/identity.md).
`IdentityRules` is plain, frozen data: the resolver and the extractor read it, nothing here touches
the database.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from refinery.identity.errors import IdentityRulesError

#: Built-in identifier types, highest priority first. Priority decides which identifier anchors a
#: profile when a limit would break (the higher one is kept, the lower one that links two anchors is
#: dropped) and which identifier of an event is the centre of the edges it creates.
BUILTIN_TYPES: tuple[str, ...] = ("user_id", "crm_id", "email", "phone", "device_id", "advertising_id", "anonymous_id")
#: Types whose values are personal data: they pass through `privacy.pii.protect_identifier`.
PII_TYPES: frozenset[str] = frozenset({"email", "phone"})
#: Default per-profile limits: one user id per profile; other types unlimited.
DEFAULT_LIMITS: dict[str, int] = {"user_id": 1}

_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
_PATH = re.compile(r"^(traits|context|properties)((?:\.[A-Za-z_][A-Za-z0-9_-]*)+)$")

#: Default blocked values, compared case-insensitively after normalisation, for every type.
PLACEHOLDER_VALUES: tuple[str, ...] = (
    "", "null", "nil", "none", "undefined", "nan", "0", "-1", "anonymous", "anon", "unknown", "n/a", "na",
    "guest", "test", "true", "false", "[object object]", "{}", "[]", "user", "default", "(null)", "<null>",
)


@dataclass(frozen=True)
class BlockPattern:
    """A regular expression (RE2 syntax, matched against the whole normalised value)."""

    name: str
    pattern: str
    types: tuple[str, ...] | None = None  # None: every type


#: Named default patterns; a rules file can switch one off with `blocked.disable_defaults`.
DEFAULT_PATTERNS: tuple[BlockPattern, ...] = (
    BlockPattern("all_zero", r"[0\-.:_ ]*0[0\-.:_ ]*"),                      # 0000, 00000000-0000-..., 0.0
    BlockPattern("placeholder_chars", r"[x*?#.\-_ ]+"),                        # xxx, ***, ???, ---
    BlockPattern("email_without_at", r"[^@]*", ("email",)),
    BlockPattern("test_email_local", r"(test|testing|tester|noreply|no-reply|donotreply|example|foo|asdf)@.*", ("email",)),
    BlockPattern("test_email_domain", r".*@(test\.com|example\.(com|net|org)|([^@]*\.)?(example|test|invalid|localhost)|localhost)", ("email",)),
)


@dataclass(frozen=True)
class DeclaredIdentifier:
    """An identifier a user declares at a JSON path of the clean zone (e.g. `traits.webUserId`)."""

    type: str
    column: str                   # traits | context | properties
    json_path: str                # $.webUserId
    sources: tuple[str, ...] = ()  # empty: every source

    @property
    def path(self) -> str:
        return self.column + self.json_path[1:]


@dataclass(frozen=True)
class IdentityRules:
    priority: tuple[str, ...] = BUILTIN_TYPES
    limits: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    declared: tuple[DeclaredIdentifier, ...] = ()
    blocked_values: tuple[str, ...] = PLACEHOLDER_VALUES
    blocked_patterns: tuple[BlockPattern, ...] = DEFAULT_PATTERNS
    hub_max_user_ids: int = 10
    max_value_length: int = 256
    max_merges_per_profile: int = 1000
    phone_region: str = "US"

    def rank(self, kind: str) -> int:
        """0 for the highest priority; types not listed rank after every listed one (by name)."""
        try:
            return self.priority.index(kind)
        except ValueError:
            return len(self.priority)

    @property
    def exclusive_types(self) -> tuple[str, ...]:
        """Types limited to one value per profile, highest priority first: they anchor profiles."""
        return tuple(sorted((t for t, n in self.limits.items() if n == 1), key=lambda t: (self.rank(t), t)))

    @property
    def capped_types(self) -> dict[str, int]:
        """Types limited to more than one value per profile."""
        return {t: n for t, n in self.limits.items() if n > 1}

    def to_dict(self) -> dict[str, Any]:
        return {
            "priority": list(self.priority),
            "limits": dict(self.limits),
            "identifiers": [{"type": d.type, "path": d.path, "sources": list(d.sources)} for d in self.declared],
            "blocked_values": list(self.blocked_values),
            "blocked_patterns": [{"name": p.name, "pattern": p.pattern, "types": list(p.types) if p.types else None} for p in self.blocked_patterns],
            "hub_max_user_ids": self.hub_max_user_ids,
            "max_value_length": self.max_value_length,
            "max_merges_per_profile": self.max_merges_per_profile,
            "phone_region": self.phone_region,
        }


def _err(message: str, fix: str, key: str) -> IdentityRulesError:
    return IdentityRulesError(f"Identity rules: {message}", fix=fix, field=key)


def _type_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _TYPE_NAME.match(value):
        raise _err(f"{key} {value!r} is not an identifier type name.",
                   "Use lower-case letters, digits, '_' or '.', starting with a letter (e.g. crm_id, hubspot_id).", key)
    return value


def _check_regex(pattern: Any, key: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise _err(f"{key} must be a non-empty regular expression, got {pattern!r}.", "Write e.g. '.*@mycompany-test\\.com'.", key)
    if "(?P<" in pattern or re.search(r"\\[1-9]", pattern) or "(?=" in pattern or "(?!" in pattern or "(?<" in pattern:
        raise _err(f"{key} uses a back-reference, named group or look-around, which RE2 (the engine's regex) lacks.",
                   "Rewrite it without them.", key)
    try:
        re.compile(pattern)
    except re.error as e:
        raise _err(f"{key} is not a valid regular expression: {e}.", "Fix the pattern (it must match the whole value).", key) from e
    return pattern


def _parse_types(raw: Any, rules: IdentityRules) -> IdentityRules:
    if raw is None:
        return rules
    if not isinstance(raw, list) or not raw:
        raise _err("types must be a list, highest priority first.", "Write types: [user_id: {limit: 1}, crm_id, email, ...].", "types")
    order: list[str] = []
    limits: dict[str, int] = {}
    for i, item in enumerate(raw):
        key = f"types[{i}]"
        opts: Any
        if isinstance(item, str):
            name, opts = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, opts = next(iter(item.items()))
            opts = opts or {}
        else:
            raise _err(f"{key} must be a type name or {{name: {{limit: N}}}}, got {item!r}.", "Write - user_id: {limit: 1}", key)
        name = _type_name(name, key)
        if name in order:
            raise _err(f"{key}: {name} is listed twice.", "List each type once.", key)
        if not isinstance(opts, dict) or set(opts) - {"limit"}:
            raise _err(f"{key}: only `limit` may be set on a type, got {opts!r}.", "Write - email: {limit: 5}", key)
        if "limit" in opts and opts["limit"] is not None:
            n = opts["limit"]
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise _err(f"{key}.limit must be a whole number >= 1, got {n!r}.", "Write limit: 1 (or leave it out for no limit).", f"{key}.limit")
            limits[name] = n
        order.append(name)
    rest = [t for t in BUILTIN_TYPES if t not in order]
    return replace(rules, priority=(*order, *rest), limits=limits)


def _parse_identifiers(raw: Any) -> tuple[DeclaredIdentifier, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _err("identifiers must be a list.", "Write identifiers: [{type: crm_id, path: traits.crmId}].", "identifiers")
    out: list[DeclaredIdentifier] = []
    for i, item in enumerate(raw):
        key = f"identifiers[{i}]"
        if not isinstance(item, dict) or set(item) - {"type", "path", "sources"} or "type" not in item or "path" not in item:
            raise _err(f"{key} needs type and path (and optionally sources).", "Write {type: crm_id, path: traits.crmId, sources: [crm]}.", key)
        kind = _type_name(item["type"], f"{key}.type")
        path = item["path"]
        m = _PATH.match(path) if isinstance(path, str) else None
        if m is None:
            raise _err(f"{key}.path {path!r} is not a path into traits, context or properties.",
                       "Write e.g. traits.webUserId or context.traits.loyaltyId (letters, digits, '_' and '-' per key).", f"{key}.path")
        sources = item.get("sources") or []
        if not isinstance(sources, list) or not all(isinstance(s, str) and s for s in sources):
            raise _err(f"{key}.sources must be a list of source names.", "Write sources: [demo-crm].", f"{key}.sources")
        out.append(DeclaredIdentifier(kind, m.group(1), "$" + m.group(2), tuple(sources)))
    return tuple(out)


def _parse_blocked(raw: Any, rules: IdentityRules) -> IdentityRules:
    if raw is None:
        return rules
    if not isinstance(raw, dict) or set(raw) - {"values", "patterns", "disable_defaults"}:
        raise _err("blocked takes values, patterns and disable_defaults.",
                   "Write blocked: {values: [guest], patterns: {email: ['.*@corp-test\\.com']}}.", "blocked")
    off = raw.get("disable_defaults") or []
    known = {p.name for p in DEFAULT_PATTERNS} | {"placeholders"}
    if not isinstance(off, list) or any(n not in known for n in off):
        raise _err(f"blocked.disable_defaults {off!r} names an unknown default.", f"Use names from: {', '.join(sorted(known))}.",
                   "blocked.disable_defaults")
    values = [] if "placeholders" in off else list(PLACEHOLDER_VALUES)
    extra = raw.get("values") or []
    if not isinstance(extra, list) or not all(isinstance(v, str | int) for v in extra):
        raise _err("blocked.values must be a list of values.", "Write values: [guest, '12345'].", "blocked.values")
    values.extend(str(v).strip().lower() for v in extra)
    patterns = [p for p in DEFAULT_PATTERNS if p.name not in off]
    by_type = raw.get("patterns") or {}
    if not isinstance(by_type, dict):
        raise _err("blocked.patterns must map a type (or '*') to a list of patterns.", "Write patterns: {email: ['.*@corp\\.test']}.", "blocked.patterns")
    for kind, pats in by_type.items():
        key = f"blocked.patterns.{kind}"
        types = None if kind == "*" else (_type_name(kind, key),)
        if not isinstance(pats, list):
            raise _err(f"{key} must be a list of patterns.", "Write - '.*@corp\\.test'", key)
        for j, p in enumerate(pats):
            patterns.append(BlockPattern(f"custom:{kind}:{j}", _check_regex(p, f"{key}[{j}]"), types))
    return replace(rules, blocked_values=tuple(dict.fromkeys(values)), blocked_patterns=tuple(patterns))


def parse_rules(raw: Any, base: IdentityRules | None = None) -> IdentityRules:
    """Validate a rules document (already parsed from YAML/JSON) on top of `base`."""
    rules = base or IdentityRules()
    if raw is None:
        return rules
    if not isinstance(raw, dict):
        raise _err(f"the file must hold an object, got {type(raw).__name__}.", "Start it with `types:` or `identifiers:`.", "")
    unknown = set(raw) - {"version", "types", "identifiers", "blocked"}
    if unknown:
        bad = sorted(unknown)[0]
        raise _err(f"unknown key {bad!r}.", "Use version, types, identifiers and blocked (thresholds are settings: identity_*).", bad)
    if raw.get("version", 1) != 1:
        raise _err(f"version {raw.get('version')!r} is not supported.", "Write version: 1.", "version")
    rules = _parse_types(raw.get("types"), rules)
    rules = replace(rules, declared=_parse_identifiers(raw.get("identifiers")))
    return _parse_blocked(raw.get("blocked"), rules)


def load_rules_file(path: Path, base: IdentityRules | None = None) -> IdentityRules:
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise IdentityRulesError(f"Cannot read the identity rules file {path}: {e.strerror}.",
                                 fix="Point identity_rules_file at a readable file, or remove the setting.") from e
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise IdentityRulesError(f"{path} is not valid YAML/JSON: {e}", fix="Fix the syntax; see docs/identity.md.") from e
    try:
        return parse_rules(raw, base)
    except IdentityRulesError as e:
        raise IdentityRulesError(f"{path}: {e.message}", fix=e.fix, field=e.field) from e


def thresholds_from_settings(settings: Any) -> IdentityRules:
    """The default rules with the settings' thresholds (the base a rules file is read on top of)."""
    return IdentityRules(
        hub_max_user_ids=settings.identity_hub_max_user_ids,
        max_value_length=settings.identity_max_value_length,
        max_merges_per_profile=settings.identity_max_merges_per_profile,
        phone_region=settings.identity_phone_region,
    )


def rules_from_settings(settings: Any) -> IdentityRules:
    """The rules in force: settings' thresholds, plus the rules file if there is one."""
    base = IdentityRules(
        hub_max_user_ids=settings.identity_hub_max_user_ids,
        max_value_length=settings.identity_max_value_length,
        max_merges_per_profile=settings.identity_max_merges_per_profile,
        phone_region=settings.identity_phone_region,
    )
    path: Path = settings.identity_rules_path
    if settings.identity_rules_file is not None and not path.exists():
        raise IdentityRulesError(f"The identity rules file {path} does not exist.",
                                 fix="Create it (see docs/identity.md) or unset identity_rules_file.")
    return load_rules_file(path, base) if path.exists() else base

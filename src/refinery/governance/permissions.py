"""Permissions and roles, as data.

A permission is `resource:action` (e.g. `profiles:read`). A role is a named set of grants; a grant
is a permission, `resource:*` (every action on the resource) or `*` (everything: the admin role).
Endpoints declare the permissions they need (`refinery.api.auth.require`); `grants` decides.

Later stages register their permissions (and extend the built-in roles) with `register_permission`
and `grant`, the same way the built-in ones are declared here, so a typo in a route's declaration
or a role fails at start-up instead of silently granting nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from refinery.governance.errors import UnknownPermission

#: Every permission, with what it allows. Extended by `register_permission`.
PERMISSIONS: dict[str, str] = {}


def register_permission(name: str, description: str) -> str:
    """Add `name` (`resource:action`) to the catalogue; registering it twice is harmless."""
    resource, sep, action = name.partition(":")
    if not sep or not resource or not action or "*" in name:
        raise UnknownPermission(
            f"Permission {name!r} is not of the form resource:action.", fix="Name it like 'profiles:read'."
        )
    PERMISSIONS.setdefault(name, description)
    return name


for _name, _description in (
    ("events:read", "The event catalogue, quarantined events and import jobs' status."),
    ("events:replay", "Replay quarantined events."),
    ("imports:write", "Start batch imports of files."),
    ("sources:read", "List sources (never their write keys)."),
    ("sources:write", "Create, enable, disable and configure sources."),
    ("query:read", "Run read-only SQL over the zones."),
    ("profiles:read", "Read profiles, their timelines, identifiers and the evidence that formed them."),
    ("identity:write", "Run identity resolution and change identity rules or overrides."),
    ("pii:read", "See personal data (emails, phones, names, addresses, IPs) in clear; every such read is audited."),
    ("privacy:read", "Read consent, subject requests and their receipts."),
    ("privacy:write", "Record consent and run subject requests (export, erasure)."),
    ("audit:read", "Read and verify the audit log."),
    ("tokens:read", "List API tokens (never the tokens themselves)."),
    ("tokens:write", "Create and revoke API tokens."),
    ("config:write", "Change server configuration (tracking plans, identity rules, retention)."),
):
    register_permission(_name, _description)


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    grants: frozenset[str] = field(default_factory=frozenset)

    def allows(self, permission: str) -> bool:
        return grants(self.grants, permission)


def _check_grant(grant: str) -> str:
    if grant == "*":
        return grant
    resource, _, action = grant.partition(":")
    if action == "*":
        if not any(p.startswith(resource + ":") for p in PERMISSIONS):
            raise UnknownPermission(f"Grant {grant!r} names no known resource.", fix=f"Use one of: {known()}.")
        return grant
    if grant not in PERMISSIONS:
        raise UnknownPermission(f"Unknown permission {grant!r}.", fix=f"Use one of: {known()}.")
    return grant


def known() -> str:
    return ", ".join(sorted(PERMISSIONS))


def check_permission(permission: str) -> str:
    """`permission` itself, or `UnknownPermission` when the catalogue does not hold it."""
    if permission not in PERMISSIONS:
        raise UnknownPermission(f"Unknown permission {permission!r}.", fix=f"Declare one of: {known()}, or register it first.")
    return permission


def grants(held: Iterable[str], permission: str) -> bool:
    """Whether the grants `held` include `permission` (exactly, by `resource:*`, or by `*`)."""
    resource = permission.partition(":")[0]
    held = set(held)
    return "*" in held or permission in held or f"{resource}:*" in held


#: The built-in roles. The admin role holds everything, including permissions registered later.
ROLES: dict[str, Role] = {}


def define_role(name: str, description: str, grant_list: Iterable[str]) -> Role:
    role = Role(name, description, frozenset(_check_grant(g) for g in grant_list))
    ROLES[name] = role
    return role


def grant(role: str, *permissions: str) -> Role:
    """Give a built-in role more permissions (a later stage extending the roles with its own)."""
    current = get_role(role)
    return define_role(current.name, current.description, [*current.grants, *permissions])


def get_role(name: str) -> Role:
    try:
        return ROLES[name]
    except KeyError:
        raise UnknownPermission(
            f"Unknown role {name!r}.", fix=f"Use one of: {', '.join(sorted(ROLES))}.", field="role"
        ) from None


define_role("admin", "Everything, including tokens and configuration.", ["*"])
define_role(
    "privacy_officer",
    "Personal data in clear (audited), consent and subject requests, the audit log.",
    ["events:read", "sources:read", "profiles:read", "pii:read", "privacy:*", "audit:read", "tokens:read"],
)
define_role(
    "marketer",
    "Sources, the event catalogue and profiles (without personal data in clear).",
    ["events:read", "sources:read", "profiles:read"],
)
define_role(
    "analyst",
    "The event catalogue, sources, read-only SQL and profiles (without personal data in clear).",
    ["events:read", "sources:read", "query:read", "profiles:read"],
)

# retention (governance/retention.py): running it deletes data past its time-to-live; the privacy officer may run it.
register_permission("retention:run", "Run retention: delete what is older than its time-to-live (or count it, in a dry run).")
register_permission("retention:read", "Read the retention policy and past retention runs (counts, never data).")
grant("privacy_officer", "retention:run", "retention:read")

# lineage (governance/lineage.py): the runs that read or wrote a table, and a profile's sources; no personal values.
register_permission("lineage:read", "Read lineage: the job runs behind a table, and the sources, messages and files behind a profile.")
grant("privacy_officer", "lineage:read")
grant("analyst", "lineage:read")

# segments (refinery/segments/): definitions, membership, previews and explanations; profile ids, values only with pii:read.
register_permission("segments:read", "List segments, preview rules, read members (profile ids), history and explanations; every member read is audited.")
register_permission("segments:write", "Create, change and delete segments and computed traits, and run their recomputation.")
grant("marketer", "segments:read", "segments:write")
grant("analyst", "segments:read")
grant("privacy_officer", "segments:read")

# activation (refinery/activation/): destinations (secrets never shown), syncs, runs and dead letters; counts, no personal values.
register_permission("activation:read", "List destinations (secrets shown as ***), syncs, their runs, outboxes and dead letters.")
register_permission("activation:write", "Create, change and delete destinations and syncs, run syncs and replay dead letters.")
grant("marketer", "activation:read", "activation:write")
grant("analyst", "activation:read")
grant("privacy_officer", "activation:read")

# features (refinery/features/): definitions and point-in-time training sets (profile ids and derived values, no personal values).
register_permission("features:read", "List feature definitions and their versions, and build point-in-time training sets (audited).")
register_permission("features:write", "Create, change and delete feature definitions.")
grant("analyst", "features:read", "features:write")
grant("marketer", "features:read")

# LLM context (profiles/context.py, decision 0027): a profile's segments, non-personal traits and recent behaviour for a prompt.
register_permission("context:read", "Read a profile's LLM context: segments, non-personal traits and recent behaviour, "
                                    "token-budgeted, with the message ids it came from (audited).")
grant("marketer", "context:read")
grant("analyst", "context:read")
define_role("assistant", "An LLM application: profiles' LLM context (no identifiers, no personal data), nothing else.", ["context:read"])

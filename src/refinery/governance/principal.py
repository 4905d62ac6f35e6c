"""Who is acting: an API token's holder, the bootstrap admin, or a local command on the data folder.

A `Principal` carries the role's grants and, for tokens limited to some sources, those sources.
It is also the audit log's actor: its id and name are recorded, never the token.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterable
from dataclasses import dataclass

from refinery.governance.errors import PermissionDenied
from refinery.governance.permissions import get_role, grants


@dataclass(frozen=True)
class Principal:
    actor_id: str                       # token id ('tok_...'), 'admin' (bootstrap) or 'local'
    name: str                           # the token's name, or who ran a local command
    role: str
    sources: frozenset[str] | None = None  # None: every source

    @property
    def grants(self) -> frozenset[str]:
        return get_role(self.role).grants

    def can(self, permission: str) -> bool:
        return grants(self.grants, permission)

    def check(self, permissions: Iterable[str]) -> None:
        missing = [p for p in permissions if not self.can(p)]
        if missing:
            raise PermissionDenied(
                f"Token {self.name!r} (role {self.role}) does not grant {', '.join(missing)}.",
                fix="Use a token whose role grants it (see docs/governance.md), or ask an admin: "
                "refinery tokens create NAME --role ROLE.",
                required=missing,
            )

    def check_sources(self, names: Iterable[str] | None, *, where: str) -> None:
        """Object-level check: a token limited to some sources may only touch those.

        `names` None means the request reaches every source (no source given), which such a
        token may not do."""
        if self.sources is None:
            return
        allowed = ", ".join(sorted(self.sources))
        if names is None:
            raise PermissionDenied(
                f"Token {self.name!r} is limited to sources {allowed}, and this request is not limited to one.",
                fix=f"Name one of your sources ({where}), or use a token for every source.",
            )
        outside = sorted(set(names) - self.sources)
        if outside:
            raise PermissionDenied(
                f"Token {self.name!r} is limited to sources {allowed}; it may not reach {', '.join(outside)}.",
                fix="Use a token scoped to that source, or one for every source.",
                field=where,
            )


#: The holder of `<data_dir>/admin.token` (or the `admin_token` setting).
BOOTSTRAP_ADMIN = Principal("admin", "bootstrap admin", "admin")


def local_principal() -> Principal:
    """A command run on the data folder itself (no server): whoever can read the folder is admin."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Principal("local", f"local:{user}", "admin")

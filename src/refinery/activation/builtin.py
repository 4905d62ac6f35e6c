"""Imports every built-in destination module, each of which calls `register()` at import.

The modules import their client libraries (redis, psycopg, pyarrow) only when a destination of
their kind is built, so loading the registry stays cheap."""

from __future__ import annotations

from refinery.activation import (  # noqa: F401
    adfiles,
    files,
    postgres_destination,  # noqa: F401
    redis_destination,  # noqa: F401
    webhook,  # noqa: F401
)

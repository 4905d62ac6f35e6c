"""Refinery: an open-source data management platform, embedded first on DuckDB."""

from __future__ import annotations

__version__ = "0.1.0"

from refinery.errors import RefineryError
from refinery.settings import Settings, load_settings

__all__ = ["RefineryError", "Settings", "__version__", "load_settings"]

"""Imports every built-in destination module, each of which calls `register()` at import."""

from __future__ import annotations

"""Fixtures for the profile tests; the helpers live in profile_helpers.py."""

from __future__ import annotations

from profile_helpers import world

__all__ = ["world"]

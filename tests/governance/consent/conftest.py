"""Fixtures for the consent tests; the helpers live in consent_helpers.py."""

from __future__ import annotations

from consent_helpers import cw

__all__ = ["cw"]

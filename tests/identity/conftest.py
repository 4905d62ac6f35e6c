"""Fixtures for the identity tests; the helpers live in identity_helpers.py."""

from __future__ import annotations

from identity_helpers import ident

__all__ = ["ident"]

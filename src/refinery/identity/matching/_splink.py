"""Splink is an optional, heavy dependency: imported only when person-record matching runs."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from refinery.identity.matching.errors import MissingExtraError

REQUIRED_MAJOR = 5


def require(module: str = "splink") -> ModuleType:
    """Import `module` (splink or one of its submodules), or say which extra provides it."""
    try:
        mod = importlib.import_module(module)
        root = importlib.import_module("splink")
    except ImportError as e:
        raise MissingExtraError(
            f"Person-record matching needs Splink, which is not installed ({e}).",
            fix="Install the ml extra: pip install 'refinery-dmp[ml]'.",
        ) from e
    major = int(str(getattr(root, "__version__", "0")).split(".")[0])
    if major != REQUIRED_MAJOR:
        raise MissingExtraError(
            f"Person-record matching is written for Splink {REQUIRED_MAJOR}.x; found {root.__version__}.",
            fix=f"pip install 'splink>={REQUIRED_MAJOR},<{REQUIRED_MAJOR + 1}' (or reinstall the ml extra).",
        )
    return mod


def version() -> str:
    return str(require().__version__)


@contextmanager
def quiet() -> Iterator[None]:
    """Keep Splink's progress and training chatter (which names columns and levels) out of our logs.

    Splink logs through the `splink` logger; its warnings about untrained levels are expected for
    columns a data set leaves empty, and are reported in the model summary instead.
    """
    logger = logging.getLogger("splink")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)

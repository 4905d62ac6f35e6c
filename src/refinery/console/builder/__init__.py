"""The segment builder: a visual editor of rules that round-trips with the rule language
(refinery.segments.tree), with a live count, errors at their place, save, and size over time."""

from __future__ import annotations

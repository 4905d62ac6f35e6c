"""What the segment builder asks of the store: tree <-> text with errors at their node, preview, save,
and membership size over time.

Each function takes the engine (and the writer and the acting principal where something is
recorded) and answers plain JSON-ready dicts; the routes (routes.py) only check permissions and
call these. Rule errors are answers, not exceptions: an editor shows them while the person types.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from refinery.errors import RefineryError
from refinery.governance.principal import Principal
from refinery.segments import lifecycle, store
from refinery.segments import tree as T
from refinery.segments.catalog import cached_catalog
from refinery.segments.errors import SegmentError
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer

#: The most points a size-over-time answer holds (the latest ones).
MAX_POINTS = 500


class BuilderError(RefineryError):
    """A rule the builder cannot preview or save: carries every error, each at its node and place."""

    http_status = 400
    code = "segment_builder_error"

    def __init__(self, errors: list[dict[str, Any]], text: str | None):
        first = errors[0] if errors else {"message": "the rule has errors", "fix": None}
        super().__init__(str(first["message"]), fix=first.get("fix"), errors=errors, text=text)


def _error(e: SegmentError, spans: list[tuple[str, int, int]] | None) -> dict[str, Any]:
    """An error as the editor shows it: message and fix, where in the text, and at which tree node."""
    out: dict[str, Any] = {"code": e.code, "message": e.message, "fix": e.fix, "pointer": getattr(e, "pointer", None)}
    if e.span is not None:
        out.update(line=e.span.line, column=e.span.column, end_line=e.span.end_line, end_column=e.span.end_column,
                   start=e.span.start, end=e.span.end)
        if out["pointer"] is None and spans is not None:
            out["pointer"] = T.locate(spans, e.span.start, e.span.end)
    return out


def check_text(engine: Engine, text: str, *, name: str | None = None) -> list[SegmentError]:
    """The errors compiling `text` against this store gives (names from the catalog, types, cycles)."""
    try:
        store.compile_text(engine, text, name=name)
    except SegmentError as e:
        return [e]
    return []


def tree_to_text(engine: Engine, tree: Any, *, name: str | None = None) -> dict[str, Any]:
    """The canonical text of a tree, the place of each node in it, and its errors at their nodes."""
    printed = T.to_text(tree)
    errors = [_error(p, None) for p in printed.problems]
    if not errors:
        errors = [_error(e, printed.spans) for e in check_text(engine, printed.text, name=name)]
    return {"text": printed.text, "errors": errors, "valid": not errors, "spans": _spans(printed.spans)}


def text_to_tree(engine: Engine, text: str, *, name: str | None = None) -> dict[str, Any]:
    """The tree of a rule text (None when it does not parse), with its errors at line, column and node."""
    try:
        converted = T.from_text(text)
    except SegmentError as e:
        return {"text": text, "tree": None, "errors": [_error(e, None)], "valid": False, "spans": {}}
    errors = [_error(e, converted.spans) for e in check_text(engine, text, name=name)]
    return {"text": text, "tree": converted.tree, "errors": errors, "valid": not errors, "spans": _spans(converted.spans)}


def _spans(spans: list[tuple[str, int, int]]) -> dict[str, list[int]]:
    """pointer -> [start, end] (the outermost place, when a pointer was recorded twice)."""
    out: dict[str, list[int]] = {}
    for pointer, start, end in spans:
        if pointer not in out or end - start > out[pointer][1] - out[pointer][0]:
            out[pointer] = [start, end]
    return out


def rule_of(engine: Engine, body: dict[str, Any], *, name: str | None = None) -> str:
    """The rule text of a request: its `text` when given, else its `tree` printed; BuilderError when it has errors."""
    text = body.get("text")
    if isinstance(text, str):
        errors = [_error(e, None) for e in check_text(engine, text, name=name)]
        if errors:
            raise BuilderError(errors, text)
        return text
    answer = tree_to_text(engine, body.get("tree"), name=name)
    if answer["errors"]:
        raise BuilderError(list(answer["errors"]), str(answer["text"]))
    return str(answer["text"])


def preview(engine: Engine, writer: Writer, actor: Principal, body: dict[str, Any], *, rules: Any = None,
            settings: Any = None) -> dict[str, Any]:
    """Count and sample the members of the rule in `body` (text or tree), as `POST /api/segments/preview` does."""
    name = body.get("name") if isinstance(body.get("name"), str) and body.get("name") else None
    text = rule_of(engine, body, name=name)
    sample = body.get("sample", 10)
    result = lifecycle.run_preview(engine, writer, actor, text, sample=sample if isinstance(sample, int) else 10,
                                   name=name, rules=rules, settings=settings)
    return {"text": text, "count": result["count"], "sample": result["sample"], "as_of": result["as_of"],
            "realtime": result["realtime"], "identity_policy": result["identity_policy"], "timings_ms": result["timings_ms"]}


def save(engine: Engine, writer: Writer, actor: Principal, body: dict[str, Any], *, rules: Any = None,
         settings: Any = None) -> dict[str, Any]:
    """Create the segment `body["name"]`, or save a new version of it, with the rule in `body`."""
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise BuilderError([{"message": "the segment has no name", "fix": "give it a name such as pricing_visitors.",
                             "pointer": "/name"}], None)
    store.check_name(name)
    text = rule_of(engine, body, name=name)
    description = body.get("description") if isinstance(body.get("description"), str) else None
    if store.find(engine, name) is None:
        out = lifecycle.create(engine, writer, actor, name, text, description, trigger="console", rules=rules, settings=settings)
        out["created"] = True
    else:
        out = lifecycle.update(engine, writer, actor, name, text, description, rules=rules, settings=settings)
        out["created"] = False
    return out


def load(engine: Engine, name: str) -> dict[str, Any]:
    """A saved segment as the builder opens it: its rule, its tree, errors (a rule may no longer check)."""
    seg = store.get(engine, name)
    body = text_to_tree(engine, seg.rule, name=name)
    return {"name": seg.name, "description": seg.description, "version": seg.version, **body}


def sizes(engine: Engine, name: str, *, now: datetime | None = None) -> dict[str, Any]:
    """Membership size over time from `segment_members`: the size after every moment someone entered
    or left (the latest MAX_POINTS of them), and the size now."""
    store.get(engine, name)  # 404 for an unknown segment
    rows = engine.fetch_all(
        "WITH changes AS ("
        " SELECT entered_at AS moment, 1 AS d FROM segment_members WHERE segment = ?"
        " UNION ALL SELECT exited_at AS moment, -1 AS d FROM segment_members WHERE segment = ? AND exited_at IS NOT NULL),"
        " steps AS (SELECT moment, sum(d) AS d FROM changes GROUP BY moment),"
        " sized AS (SELECT moment, sum(d) OVER (ORDER BY moment ROWS UNBOUNDED PRECEDING) AS size FROM steps)"
        " SELECT moment, size FROM sized ORDER BY moment DESC LIMIT ?",
        [name, name, MAX_POINTS], cursor=engine.reader(),
    )
    points = [{"at": at.astimezone(UTC).isoformat(), "size": int(size)} for at, size in reversed(rows)]
    current = points[-1]["size"] if points else 0
    return {"segment": name, "points": points, "size": current, "now": (now or datetime.now(UTC)).isoformat()}


def catalog(engine: Engine) -> dict[str, Any]:
    """The names a rule may use, for suggestions: events with their properties and types, traits,
    segments, computed traits. Names only: no values."""
    cat = cached_catalog(engine)
    from refinery.segments import computed

    return {
        "events": {name: dict(sorted(props.items())) for name, props in sorted(cat.events.items())},
        "traits": dict(sorted(cat.traits.items())),
        "personal": sorted(set(cat.personal_traits) | set(cat.personal_properties)),
        "segments": [s.name for s in store.list_segments(engine)],
        "computed_traits": sorted(computed.expressions(engine)),
        "event_fields": ["event", "type", "source", "timestamp"],
    }

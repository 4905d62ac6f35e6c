"""The segment builder's service (console/builder/service.py) on a real store: errors at their tree
node and line/column, preview equal to the segments preview, save as create then new version, and
membership size over time from segment_members."""

from __future__ import annotations

from typing import Any

import pytest

from refinery.console.builder import service
from refinery.governance.principal import Principal
from refinery.profiles.build import Refresh
from refinery.runtime import Runtime
from refinery.segments import lifecycle, members
from refinery.segments import tree as T
from support import event, write_events

ACTOR = Principal("local", "local:test", "admin")


def _order(user: str, total: float) -> dict[str, Any]:
    return event("track", userId=user, event="Order Completed", properties={"total": total})


@pytest.fixture
def shop(runtime: Runtime) -> Runtime:
    write_events(runtime, _order("alice", 120), _order("alice", 80), _order("bob", 30), _order("carol", 300),
                 event("identify", userId="alice", traits={"plan": "pro"}), event("identify", userId="bob", traits={"plan": "free"}))
    runtime.writer.call(Refresh.from_settings(runtime.settings))
    return runtime


def _tree(*children: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "root": {"kind": "group", "op": "and", "children": list(children)}, "policy": None}


def _performed(event_name: str, **more: Any) -> dict[str, Any]:
    return {"kind": "performed", "event": event_name, "where": None, "frequency": {"op": ">=", "count": 1}, "window": None,
            "negated": False, "note": None, **more}


def test_tree_to_text_and_back_with_errors_at_their_node(shop: Runtime) -> None:
    tree = _tree(_performed("Order Completed", frequency={"op": ">=", "count": 2}),
                 {"kind": "trait", "path": "plan", "op": "=", "values": [{"type": "string", "value": "pro"}], "negated": False, "note": None})
    out = service.tree_to_text(shop.engine, tree)
    assert out["valid"] and out["errors"] == []
    assert out["text"] == "performed 'Order Completed' at least 2 times\nand plan = 'pro'"
    assert out["spans"]["/root/children/1"] == [len("performed 'Order Completed' at least 2 times\nand "), len(out["text"])]

    back = service.text_to_tree(shop.engine, out["text"])
    assert back["tree"] == tree and back["valid"]

    # an unknown event: the checker's error lands on the event field of the second condition
    bad = _tree(tree["root"]["children"][1], _performed("Order Complete"))
    out = service.tree_to_text(shop.engine, bad)
    [err] = out["errors"]
    assert err["pointer"] == "/root/children/1/event" and "did you mean 'Order Completed'" in err["message"]
    assert (err["line"], err["column"]) == (2, len("and performed ") + 1)

    # a structural problem needs no checker: it names the node
    out = service.tree_to_text(shop.engine, _tree(_performed("")))
    assert [e["pointer"] for e in out["errors"]] == ["/root/children/0/event"] and not out["valid"]

    # text that does not parse: no tree, the error at its line and column
    out = service.text_to_tree(shop.engine, "performed 'Order Completed' at least two times")
    assert out["tree"] is None and out["errors"][0]["line"] == 1 and out["errors"][0]["column"] == 38
    # text that parses but does not check: the tree, and the error at its node in that tree
    out = service.text_to_tree(shop.engine, "plan = 'pro' or performed 'Order Complete'")
    assert out["tree"]["root"]["op"] == "or" and out["errors"][0]["pointer"] == "/root/children/1/event"


def test_preview_is_the_segments_preview(shop: Runtime) -> None:
    tree = _tree(_performed("Order Completed", where={"kind": "group", "op": "and", "children": [
        {"kind": "compare", "path": "total", "op": ">", "values": [{"type": "number", "value": 50}], "negated": False}]}))
    mine = service.preview(shop.engine, shop.writer, ACTOR, {"tree": tree})
    theirs = lifecycle.run_preview(shop.engine, shop.writer, ACTOR, mine["text"])
    assert mine["text"] == "performed 'Order Completed' where total > 50"
    assert mine["count"] == theirs["count"] == 2 and mine["sample"] == theirs["sample"]
    with pytest.raises(service.BuilderError) as e:
        service.preview(shop.engine, shop.writer, ACTOR, {"text": "performed 'Nope'"})
    assert e.value.to_dict()["errors"][0]["column"] == 11


def test_save_creates_then_versions_and_sizes_follow_the_runs(shop: Runtime) -> None:
    first = service.save(shop.engine, shop.writer, ACTOR, {"name": "buyers", "tree": _tree(_performed("Order Completed"))})
    assert first["created"] and first["version"] == 1 and first["rule"] == "performed 'Order Completed'"
    second = service.save(shop.engine, shop.writer, ACTOR, {"name": "buyers", "text": "performed 'Order Completed' at least 2 times"})
    assert not second["created"] and second["version"] == 2
    loaded = service.load(shop.engine, "buyers")
    assert loaded["tree"] == T.from_text("performed 'Order Completed' at least 2 times").tree and loaded["version"] == 2

    write_events(shop, _order("bob", 10))
    shop.writer.call(Refresh.from_settings(shop.settings))
    members.run_segments(shop.engine, shop.writer, ACTOR, ["buyers"], force=True)
    sizes = service.sizes(shop.engine, "buyers")
    assert [p["size"] for p in sizes["points"]] == [3, 1, 2] and sizes["size"] == 2
    with pytest.raises(Exception) as missing:
        service.sizes(shop.engine, "nobody")
    assert getattr(missing.value, "http_status", None) == 404


def test_save_refuses_a_bad_name_or_rule_and_writes_nothing(shop: Runtime) -> None:
    with pytest.raises(service.BuilderError):
        service.save(shop.engine, shop.writer, ACTOR, {"name": "x", "tree": _tree(_performed(""))})
    with pytest.raises(service.BuilderError):
        service.save(shop.engine, shop.writer, ACTOR, {"tree": _tree(_performed("Order Completed"))})
    assert lifecycle.list_segments(shop.engine) == []


def test_catalog_names_events_properties_traits_and_segments(shop: Runtime) -> None:
    service.save(shop.engine, shop.writer, ACTOR, {"name": "buyers", "text": "performed 'Order Completed'"})
    cat = service.catalog(shop.engine)
    assert cat["events"]["Order Completed"] == {"total": "number"}
    assert cat["traits"]["plan"] == "string" and cat["segments"] == ["buyers"]

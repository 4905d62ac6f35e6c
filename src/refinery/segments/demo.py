"""The demo's segments: a few audiences over the demo world, their sizes, and one explanation.

`define_demo_segments(client)` is called by the demo (refinery/demo/run.py) once profiles exist,
through the same client as the rest of the demo (the running server's admin API). It is safe to
call again: segments that exist keep their rule (updated if it changed) and are recomputed.
"""

from __future__ import annotations

from typing import Any

from refinery.client import Client

#: name -> (rule, description). Each shows a part of the language on the demo world's events.
DEMO_SEGMENTS: dict[str, tuple[str, str]] = {
    "pricing_visitors": (
        "performed any event where path = '/pricing' in last 30 days",
        "Looked at the pricing page (web) or membership screen (app) in the last 30 days (an event filter over a window)",
    ),
    "repeat_buyers": (
        "performed 'Order Completed' at least 2 times",
        "Bought at least twice (a frequency)",
    ),
    "big_spenders": (
        "sum(total) of 'Order Completed' > 150",
        "Spent more than 150 in total (an aggregate of a property)",
    ),
    "viewed_then_bought": (
        "'Product Viewed' then 'Order Completed' within 1 day",
        "Viewed a product and ordered within a day (a sequence)",
    ),
    "known_browsers_not_buying": (
        "email is set and performed 'Product Viewed' and not performed 'Order Completed'",
        "Known by email, browsing but never ordering (a trait condition on a personal field, and a negation)",
    ),
    "repeat_buyers_on_pricing": (
        "in segment 'repeat_buyers' and in segment 'pricing_visitors'",
        "Repeat buyers back on the pricing page (segments combined)",
    ),
}


def define_demo_segments(client: Client) -> dict[str, Any]:
    """Create (or refresh) the demo segments; return their sizes and one member's explanation."""
    existing = {s["name"]: s for s in client.segments()}
    for name, (rule, description) in DEMO_SEGMENTS.items():
        if name in existing:
            client.update_segment(name, rule, description, run=False)
        else:
            client.create_segment(name, rule, description, run=False)
    report = client.run_segments(force=True)
    failed = {r["segment"]: r["error"] for r in report["runs"] if r["status"] == "failed"}
    sizes = {s["name"]: s["members"] for s in client.segments() if s["name"] in DEMO_SEGMENTS}
    explanation = None
    for name in ("repeat_buyers_on_pricing", "repeat_buyers", "big_spenders"):
        if sizes.get(name):
            member = client.segment_members(name, limit=1)["members"][0]["profile_id"]
            explanation = client.explain_segment(name, member)
            break
    return {"sizes": sizes, "failed": failed, "explanation": explanation,
            "rules": {name: rule for name, (rule, _) in DEMO_SEGMENTS.items()}}

"""A fast loopback webhook receiver for bench/activation.py: uvicorn (uvloop, httptools) and a bare
ASGI app that checks each batch's HMAC signature, parses it with orjson and applies its records to
a dict once per idempotency key. Lighter than the test receiver (a threaded stdlib server), so the
benchmark measures the sender. `GET /state` answers the members per segment (profile ids only).

    python bench/_fast_receiver.py SECRET PORT
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from typing import Any

import orjson
import uvicorn

SECRET = sys.argv[1].encode()
members: dict[str, set[str]] = {}
applied: set[str] = set()


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = dict(scope["headers"])
    body = await _body(receive)
    status, out = 200, b"{}"
    if scope["method"] == "GET":
        out = orjson.dumps({s: sorted(m) for s, m in members.items()})
    else:
        ts = headers.get(b"x-refinery-timestamp", b"")
        sig = headers.get(b"x-refinery-signature", b"").decode()
        want = "sha256=" + hmac.new(SECRET, ts + b"." + body, hashlib.sha256).hexdigest()
        key = headers.get(b"idempotency-key", b"").decode()
        if not hmac.compare_digest(sig, want):
            status = 401
        elif key not in applied:
            batch = orjson.loads(body)
            held = members.setdefault(batch["segment"], set())
            for r in batch["records"]:
                if r["action"] == "add":
                    held.add(r["profile_id"])
                else:
                    held.discard(r["profile_id"])
            applied.add(key)
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", loop="uvloop", http="httptools")

"""An acknowledged event is durably on disk: SIGKILL the server mid-load, restart it on the same
data, and every messageId that got a 200 is in `events` exactly once."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from collector_helpers import query, uid

from support import Server, start_server


class _Sender(threading.Thread):
    """Posts batches of fresh messageIds until stopped or the server dies; records what was acknowledged."""

    def __init__(self, server: Server, batch_size: int):
        super().__init__(daemon=True)
        self.server = server
        self.batch_size = batch_size
        self.acked: list[str] = []
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.server.url, headers=self.server.basic, timeout=10) as client:
            while not self.stop.is_set():
                ids = [uid("crash") for _ in range(self.batch_size)]
                batch = [{"type": "track", "userId": "u-crash", "event": "Load", "messageId": m, "properties": {"i": i}}
                         for i, m in enumerate(ids)]
                self.sent += len(ids)
                try:
                    r = client.post("/v1/batch", json={"batch": batch})
                except httpx.HTTPError:
                    return  # the server died mid-request: these ids were never acknowledged
                if r.status_code == 200 and r.json()["accepted"] == len(ids):
                    self.acked.extend(ids)


@pytest.mark.slow
def test_every_acknowledged_event_survives_sigkill(server: Server) -> None:
    senders = [_Sender(server, batch_size) for batch_size in (1, 25, 100)]
    for s in senders:
        s.start()
    deadline = time.monotonic() + 20
    while sum(len(s.acked) for s in senders) < 500 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL while the senders are still posting
    for s in senders:
        s.stop.set()
        s.join(15)
    acked = [m for s in senders for m in s.acked]
    assert len(acked) >= 100, "the load never got going; the test proves nothing"
    assert sum(s.sent for s in senders) > len(acked), "kill the server while requests are in flight"

    restarted = start_server(server.data_dir)
    try:
        rows = query(restarted, "SELECT message_id, count(*) AS n FROM events WHERE user_id = 'u-crash' GROUP BY message_id")
        counts = {r["message_id"]: r["n"] for r in rows}
        missing = [m for m in acked if m not in counts]
        assert missing == [], f"{len(missing)} acknowledged events lost, e.g. {missing[:3]}"
        assert all(n == 1 for n in counts.values())
        raw = query(restarted, "SELECT count(*) AS n FROM raw_events WHERE message_id LIKE 'crash-%'")[0]["n"]
        assert raw >= len(acked)
        # The restarted server keeps accepting, and still knows the acknowledged ids.
        r = httpx.post(restarted.url + "/v1/batch", json={"batch": [
            {"type": "track", "userId": "u-crash", "event": "Load", "messageId": acked[0], "properties": {"i": 0}}
        ]}, headers=restarted.basic, timeout=10)
        assert r.status_code == 200 and r.json()["duplicates"] == 1
    finally:
        restarted.stop()

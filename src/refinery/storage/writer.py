"""The single writer: every write to the store goes through one thread, one transaction at a time.

Group commit: concurrent ingest requests queue their rows; the writer takes everything waiting
(up to `max_group` rows), writes it in one transaction, commits (DuckDB syncs its WAL on commit),
and only then resolves each request's future. A 200 therefore always means "on disk", and
throughput comes from sharing one commit among many requests, never from acknowledging early.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from refinery.storage.engine import Engine

log = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item")
Outcome = TypeVar("Outcome")
_ItemIn = TypeVar("_ItemIn", contravariant=True)


class RetryGroup(Exception):
    """Raised by a handler's `write` to have its transaction rolled back and `write` called again,
    once, with the same items in a fresh transaction.

    It lets a handler try a cheap way first (a plain INSERT that fails if a key exists) and fall
    back to the careful way only when it must: DuckDB aborts the whole transaction on a
    constraint error, so the fallback cannot run in the same one. The handler decides, on the
    second call, to take the careful way; raising again on the second call is an error.
    """


class BatchHandler(Protocol[_ItemIn, Outcome]):
    """Writes a group of items inside the writer's open transaction; one outcome per item, in order.

    It may raise `RetryGroup` to be called again in a fresh transaction (see there)."""

    def write(self, engine: Engine, items: Sequence[_ItemIn]) -> list[Outcome]: ...


@dataclass
class _BatchJob(Generic[Item, Outcome]):
    """Items waiting for a group commit, and whoever waits for their outcomes: a thread's future,
    or (`submit_batch_async`) a future on an event loop, settled from that loop's own thread."""

    handler: BatchHandler[Item, Outcome]
    items: Sequence[Item]
    future: Future[list[Outcome]] | None = None
    waiter: asyncio.Future[list[Outcome]] | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def claim(self) -> bool:
        """False when the requester gave up (cancelled) before the write began: it was never
        acknowledged, so it is not written (the SDK retries; dedup absorbs the retry)."""
        if self.waiter is not None:
            return not self.waiter.cancelled()  # a late cancel only loses the answer, never the event
        assert self.future is not None
        return self.future.running() or self.future.set_running_or_notify_cancel()


@dataclass
class _CallJob(Generic[T]):
    fn: Callable[[Engine], T]
    future: Future[T] = field(default_factory=Future)


_STOP = object()


class Writer:
    def __init__(self, engine: Engine, *, max_group: int = 20_000, max_wait_ms: float = 2.0):
        self.engine = engine
        self.max_group = max_group
        self.max_wait = max_wait_ms / 1000.0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.commits = 0
        self.last_group_size = 0
        self.retried_groups = 0
        self.rewritten_groups = 0  # groups a handler asked to write again (RetryGroup)

    # --- public ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="refinery-writer", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def submit(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run `fn(engine)` alone in one transaction on the writer thread."""
        job: _CallJob[T] = _CallJob(fn)
        self._put(job)
        return job.future

    def submit_batch(self, handler: BatchHandler[Item, Outcome], items: Sequence[Item]) -> Future[list[Outcome]]:
        """Queue items to be written with any other waiting items of the same handler, in one commit."""
        future: Future[list[Outcome]] = Future()
        self._put(_BatchJob(handler, items, future=future))
        return future

    def submit_batch_async(self, handler: BatchHandler[Item, Outcome], items: Sequence[Item]) -> asyncio.Future[list[Outcome]]:
        """`submit_batch` for a caller on a running event loop: a future of that loop.

        After a commit the writer settles all of a loop's futures with one wake-up of the loop,
        instead of one per request (a thread future chained to an asyncio one costs a lock, a
        condition and a cross-thread call each, a tenth of the event loop's time per small request).
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[list[Outcome]] = loop.create_future()
        self._put(_BatchJob(handler, items, waiter=waiter, loop=loop))
        return waiter

    def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn` through the writer and wait; runs inline (still in one transaction) when no thread runs.

        Called from the writer thread itself (a job calling a helper that uses `call`), `fn` joins the
        transaction already open instead of queueing behind itself forever.
        """
        if threading.current_thread() is self._thread:
            return fn(self.engine)
        if self._thread is None:
            with self.engine.transaction():
                return fn(self.engine)
        return self.submit(fn).result()

    def write_batch(self, handler: BatchHandler[Item, Outcome], items: Sequence[Item]) -> list[Outcome]:
        if self._thread is None:
            return self._write_group(handler, items)
        return self.submit_batch(handler, items).result()

    def pending(self) -> int:
        return self._queue.qsize()

    # --- the writer thread ----------------------------------------------------------------
    def _put(self, job: Any) -> None:
        if self._thread is None:
            raise RuntimeError("The writer is not running; call start() first or use call()/write_batch().")
        self._queue.put(job)

    def _run(self) -> None:
        """The writer loop. It must never die: an unexpected error fails the jobs at hand, not the thread."""
        while True:
            try:
                if self._loop():
                    return
            except BaseException as e:  # pragma: no cover - a bug in the loop itself
                log.error("writer: unexpected %s; continuing", type(e).__name__, exc_info=True)

    def _loop(self) -> bool:
        carry: Any = None
        while True:
            # Work already waiting when the writer comes free means requests are arriving faster
            # than single commits: take what is queued and commit at once (more arrives during the
            # commit and forms the next group). Only an idle writer waits `max_wait` for company.
            backlog = True
            job = carry
            if job is None:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    backlog = False
                    job = self._queue.get()
            carry = None
            if job is _STOP:
                return True
            if isinstance(job, _CallJob):
                self._run_call(job)
                continue
            group = [job]
            size = len(job.items)
            deadline = time.monotonic() + (0.0 if backlog else self.max_wait)
            while size < self.max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if isinstance(nxt, _BatchJob) and nxt.handler is job.handler:
                    group.append(nxt)
                    size += len(nxt.items)
                else:
                    carry = nxt
                    break
            self._run_group(group)

    def _run_call(self, job: _CallJob[Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            with self.engine.transaction():
                result = job.fn(self.engine)
            self.commits += 1
        except BaseException as e:
            job.future.set_exception(e)
        else:
            job.future.set_result(result)

    def _write_group(self, handler: BatchHandler[Item, Outcome], items: Sequence[Item]) -> list[Outcome]:
        """One transaction for `items`, and a second one if the handler asks for it (`RetryGroup`)."""
        try:
            with self.engine.transaction():
                outcomes = handler.write(self.engine, items)
        except RetryGroup:
            self.rewritten_groups += 1
            with self.engine.transaction():
                outcomes = handler.write(self.engine, items)
        self.commits += 1
        return outcomes

    def _run_group(self, group: list[_BatchJob[Any, Any]]) -> None:
        group = [j for j in group if j.claim()]
        if not group:
            return
        handler = group[0].handler
        items: list[Any] = []
        for j in group:
            items.extend(j.items)
        try:
            outcomes = self._write_group(handler, items)
            self.last_group_size = len(items)
        except Exception as e:
            if len(group) == 1:
                log.error("writer: a write of %d items failed and was rolled back: %s", len(items), type(e).__name__)
                _settle([(group[0], None, e)])
                return
            self.retried_groups += 1
            # One bad request must not fail its neighbours: retry each on its own.
            for j in group:
                self._run_group([j])
            return
        settled: list[tuple[_BatchJob[Any, Any], Any, BaseException | None]] = []
        start = 0
        for j in group:
            n = len(j.items)
            settled.append((j, outcomes[start : start + n], None))
            start += n
        _settle(settled)


def _settle(done: list[tuple[_BatchJob[Any, Any], Any, BaseException | None]]) -> None:
    """Hand each job its outcomes (or error): thread futures at once, loop futures in one call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
    for job, result, error in done:
        if job.waiter is not None and job.loop is not None:
            by_loop.setdefault(job.loop, []).append((job.waiter, result, error))
        elif job.future is not None:
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
    for loop, waiters in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_on_loop, waiters)
        except RuntimeError:  # the loop has closed: nobody is waiting for these answers any more
            log.debug("writer: %d answers for a closed event loop dropped", len(waiters))


def _settle_on_loop(waiters: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for waiter, result, error in waiters:
        if waiter.done():  # cancelled while its group was being written
            continue
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(result)

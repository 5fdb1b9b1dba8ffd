"""Coalesced calls (the DataLoader pattern, across callers).

`Batches`: while one batch of a group is in flight, the work of that group
that arrives waits; when the batch returns, everything that queued meanwhile
runs together as the next one. An idle server adds no latency: work that
finds nothing of its group in flight runs at once, in its caller's task.

Point reads also linger (`linger_s`): work that queued behind a batch in
flight is answered by a batch that gathers the calls arriving meanwhile,
yielding to the event loop turn by turn. It starts once LINGER_QUIET_TURNS
turns have passed with no call joining it, once LINGER_KEYS calls wait, or
once LINGER_S have passed since the batch before it started, whichever comes
first. grpc.aio hands new calls to the loop about one per turn, and a cheap
query returns within a turn or two: without lingering, 64 concurrent
GetBalance calls shared a query about once, each paying its own checkout and
round trip (~150-200 µs of the loop's CPU). Lingering a fixed millisecond
(at most 40 turns, up to 8 calls) gathered about four calls a query at 16 to
64 calls in flight; gathering for as long as calls keep coming gathers
twelve to fourteen, and one worker answered GetContent 23-37% faster at 16
and 64 in flight, 3-10% at 4 and 8, the same at 2 (h2load, interleaved
runs). Counted in turns, not time: when every caller has arrived, nobody
joins for a few idle turns, and the batch goes; a quiet time would have to
be as long as the slowest gap between arrivals (a timer of uvloop's also
fires only every millisecond). Lingering goes on only while it pays: when
the calls that joined lingering batches average under one (a few callers,
all queued already), only every LINGER_PROBE-th batch lingers. A call that
finds nothing in flight still runs at once, so an idle server adds no
latency, and no call waits more than LINGER_S beyond the batch before its
own.

`PointReads` builds on it: point reads answered together by one `= ANY($1)`
query. Tenancy stays with the caller: the batch fetches rows by key only, and
each caller's service checks that the row it gets is one it may see.
VectorService coalesces similarity searches of one shape the same way (one
LATERAL statement for the searches that queued).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

import asyncpg

from server import replicas

if TYPE_CHECKING:  # server.uow coalesces with Batches too
    from server.uow import Database, UnitOfWork

G = TypeVar("G", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)

# Keys answered by one point-read query at the most; more wait for the next one.
MAX_BATCH_KEYS = 1000

# How long a point read's batch may gather queued calls (see the module's
# docstring): until this long after the batch before it started, and only
# while calls keep joining it (one at least every LINGER_QUIET_TURNS turns).
LINGER_S = 0.003
LINGER_QUIET_TURNS = 40
# A batch this large lingers no more: its fixed cost (a checkout and a round
# trip, ~150-200 µs of the loop) is then a small part of each call's.
LINGER_KEYS = 32
# Batches linger while at least this many calls joined the recent lingering
# batches on average; otherwise only every LINGER_PROBE-th one does.
LINGER_WORTH = 1.0
LINGER_PROBE = 16

# `run(group, items)` answers `items` (all of `group`), one result per item in order.
Run = Callable[[G, Sequence[T]], Awaitable[Sequence[R]]]


class Batches(Generic[G, T, R]):
    """Work items answered in batches of at most `max_batch`, per group, with
    at most `max_in_flight` batches of a group running at once: one gives
    the most sharing (cheap point reads); more keep several connections,
    and so the database's cores, busy when each batch is costly (searches)."""

    def __init__(
        self,
        run: Run[G, T, R],
        max_batch: int,
        max_in_flight: int = 1,
        linger_s: float = 0.0,
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._linger_s = linger_s
        self._joining = float(LINGER_WORTH)  # see _linger
        self._chances = 0  # batches that could have lingered
        self._in_flight: dict[G, int] = {}
        self._waiting: dict[G, list[tuple[T, asyncio.Future[R]]]] = {}
        self._drainers: set[asyncio.Task[None]] = set()

    async def submit(self, group: G, items: Sequence[T]) -> list[R]:
        """The results of `items`, in order."""
        call = replicas.current_call()
        if call is not None and call.min_lsn is not None:
            # Work that must see a given write goes on its own: a shared batch
            # is routed by whoever opened it.
            return await self._run_all(group, items)
        running = self._in_flight.get(group, 0)
        if running >= self._max_in_flight:
            loop = asyncio.get_running_loop()
            futures = [loop.create_future() for _ in items]
            self._waiting.setdefault(group, []).extend(zip(items, futures, strict=True))
            if len(futures) == 1:
                return [await futures[0]]
            return list(await asyncio.gather(*futures))
        self._in_flight[group] = running + 1
        started = time.monotonic()
        try:
            return await self._run_all(group, items)
        finally:
            self._hand_over(group, started)

    async def _run_all(self, group: G, items: Sequence[T]) -> list[R]:
        results: list[R] = []
        for start in range(0, len(items), self._max_batch):
            chunk = items[start : start + self._max_batch]
            answered = await self._run(group, chunk)
            if len(answered) != len(chunk):
                raise RuntimeError(f"a batch of {len(chunk)} got {len(answered)} results")
            results.extend(answered)
        return results

    def _hand_over(self, group: G, started: float) -> None:
        """After a batch (run since `started`): its slot runs the work that
        queued meanwhile, or is freed."""
        if self._waiting.get(group):
            task = asyncio.get_running_loop().create_task(self._drain(group, started))
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)
        else:
            self._release(group)

    async def _linger(self, group: G, since: float) -> None:
        """Before a batch of work that queued behind the one in flight: yields
        to the event loop while calls keep joining it (one at least every
        LINGER_QUIET_TURNS turns), until LINGER_KEYS items wait or `linger_s`
        have passed `since` the batch before it started, so that the calls
        gRPC hands over meanwhile join it. A slow query gathers calls enough
        while it is in flight.

        Only while it pays: `_joining` follows how many calls joined while
        batches lingered (an average over the last few); below LINGER_WORTH
        (a few callers, all of whom had queued already) only every
        LINGER_PROBE-th batch lingers, to notice when more callers come."""
        deadline = since + self._linger_s
        if time.monotonic() >= deadline:
            return
        enough = min(LINGER_KEYS, self._max_batch)
        queued = len(self._waiting.get(group, ()))
        if queued >= enough:
            return
        self._chances += 1
        if self._joining < LINGER_WORTH and self._chances % LINGER_PROBE:
            return
        waiting = queued
        quiet = 0  # turns since a call last joined
        while quiet < LINGER_QUIET_TURNS:
            await asyncio.sleep(0)
            now_waiting = len(self._waiting.get(group, ()))
            quiet = 0 if now_waiting > waiting else quiet + 1
            waiting = now_waiting
            if waiting >= enough or time.monotonic() >= deadline:
                break
        self._joining += (waiting - queued - self._joining) / 4

    def _release(self, group: G) -> None:
        running = self._in_flight.get(group, 1) - 1
        if running > 0:
            self._in_flight[group] = running
        else:
            self._in_flight.pop(group, None)
            self._waiting.pop(group, None)

    async def _drain(self, group: G, since: float) -> None:
        try:
            while True:
                await self._linger(group, since)
                since = time.monotonic()
                queued = self._waiting.get(group)
                if not queued:
                    break
                batch, self._waiting[group] = (
                    queued[: self._max_batch],
                    queued[self._max_batch :],
                )
                live = [(item, future) for item, future in batch if not future.done()]
                if not live:
                    continue  # every caller of this batch has gone
                try:
                    results = await self._run_all(group, [item for item, _ in live])
                except BaseException as exc:
                    for _, future in live:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                        raise
                    continue
                for (_, future), result in zip(live, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            if self._in_flight.get(group, 0) <= 1:
                # The last slot (cancelled: the server is stopping): nobody is
                # left waiting forever.
                for _, future in self._waiting.pop(group, []):
                    future.cancel()
            self._release(group)


# Runs on `uow.driver` only (the unit is a Database.driver_read()).
Fetch = Callable[["UnitOfWork", Sequence[K]], Awaitable[Iterable[asyncpg.Record]]]


class PointReads(Generic[K]):
    """Rows by key, `fetch(uow, keys)` returning the rows of those keys that
    exist and `key(row)` telling which key a row answers."""

    def __init__(self, db: Database, fetch: Fetch[K], key: Callable[[asyncpg.Record], K]) -> None:
        self._db = db
        self._fetch = fetch
        self._key = key
        self._batches: Batches[None, K, asyncpg.Record | None] = Batches(
            self._query, MAX_BATCH_KEYS, linger_s=LINGER_S
        )

    async def get(self, key: K) -> asyncpg.Record | None:
        return (await self._batches.submit(None, (key,)))[0]

    async def _query(self, _: None, keys: Sequence[K]) -> list[asyncpg.Record | None]:
        # The fetches run on the driver alone: the cheaper checkout.
        async with self._db.driver_read() as uow:
            rows = {
                self._key(row): row for row in await self._fetch(uow, list(dict.fromkeys(keys)))
            }
        return [rows.get(key) for key in keys]

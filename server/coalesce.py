"""Coalesced point reads (the DataLoader pattern, across callers).

While one query is in flight, the reads that arrive wait; when it returns,
all of them are answered together by one `= ANY($1)` query. An idle server
adds no latency: a read that finds nothing in flight runs at once, in its own
task. Tenancy stays with the caller: the batch fetches rows by key only, and
each caller's service checks that the row it gets is one it may see.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

import asyncpg

from server import replicas
from server.uow import Database, UnitOfWork

K = TypeVar("K", bound=Hashable)

# Keys answered by one query at the most; more wait for the next one.
MAX_BATCH_KEYS = 1000

# Runs on `uow.driver` only (the unit is a Database.driver_read()).
Fetch = Callable[[UnitOfWork, Sequence[K]], Awaitable[Iterable[asyncpg.Record]]]


class PointReads(Generic[K]):
    """Rows by key, `fetch(uow, keys)` returning the rows of those keys that
    exist and `key(row)` telling which key a row answers."""

    def __init__(self, db: Database, fetch: Fetch[K], key: Callable[[asyncpg.Record], K]) -> None:
        self._db = db
        self._fetch = fetch
        self._key = key
        self._busy = False
        self._waiting: dict[K, list[asyncio.Future[asyncpg.Record | None]]] = {}
        self._drainer: asyncio.Task[None] | None = None

    async def get(self, key: K) -> asyncpg.Record | None:
        call = replicas.current_call()
        if call is not None and call.min_lsn is not None:
            # A read that must see a given write goes on its own: a shared batch
            # is routed by whoever opened it.
            return (await self._query([key])).get(key)
        if self._busy:
            future: asyncio.Future[asyncpg.Record | None] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiting.setdefault(key, []).append(future)
            return await future
        self._busy = True
        try:
            rows = await self._query([key])
        finally:
            self._hand_over()
        return rows.get(key)

    async def _query(self, keys: Sequence[K]) -> dict[K, asyncpg.Record]:
        # The fetches run on the driver alone: the cheaper checkout.
        async with self._db.driver_read() as uow:
            return {self._key(row): row for row in await self._fetch(uow, keys)}

    def _hand_over(self) -> None:
        """After a query: the reads that queued meanwhile get one of their own."""
        if self._waiting:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        else:
            self._busy = False

    async def _drain(self) -> None:
        try:
            while self._waiting:
                keys = list(self._waiting)[:MAX_BATCH_KEYS]
                batch = {key: self._waiting.pop(key) for key in keys}
                try:
                    rows = await self._query(keys)
                except BaseException as exc:
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                        raise
                    continue
                for key, futures in batch.items():
                    row = rows.get(key)
                    for future in futures:
                        if not future.done():
                            future.set_result(row)
        finally:
            # Cancelled (the server is stopping): nobody is left waiting forever.
            for futures in self._waiting.values():
                for future in futures:
                    future.cancel()
            self._waiting.clear()
            self._busy = False
            self._drainer = None

"""Exports (ExportContent, ExportNetwork): a producer task reads in a snapshot
unit of its own and fills a small bounded queue; the RPC's stream takes what
it made off the queue and sends it.

When the client reads slowly the queue fills, the producer waits, and so does
its statement (a COPY, a cursor): memory stays flat. Cancelling the RPC
cancels the producer, whose unit then discards its connection, which ends the
statement on the server.

A client that stops reading cannot hold the snapshot forever: once the
producer has waited `idle_s` (OBSERVATORY_EXPORT_IDLE_S, 60 s by default) for
room on the queue, the export ends. Its unit discards the connection at once,
and the client, when it reads again, gets what was already on its way and
then RESOURCE_EXHAUSTED, reason LIMIT_EXCEEDED, metadata `limit`
OBSERVATORY_EXPORT_IDLE_S. (HTTP/2 delivers the status only after those
bytes; a client that never reads again holds its stream, but no connection.)
A pause shorter than `idle_s` costs nothing, even one longer than the
session's idle-in-transaction timeout: the snapshot is granted `idle_s` and
some more (`idle_settings`).

All exports of a worker share its export slots (server.limits): at most that
many snapshot connections serve exports at once; another export waits for a
slot, holding no connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc

from server import errors
from server.uow import Database, UnitOfWork

IDLE_LIMIT = "OBSERVATORY_EXPORT_IDLE_S"
# Items waiting for the client: besides the one being made, the most an export
# holds in memory.
QUEUE_ITEMS = 2
# What a snapshot may idle in its transaction beyond the idle bound: the time
# the producer takes to make one item between two waits.
IDLE_MARGIN_S = 30.0


class ClientIdle(BaseException):
    """The client has not read for longer than the idle bound. A BaseException,
    as a cancellation is: the statement it interrupts (a COPY waiting to send)
    cannot be rolled back, so the unit discards its connection rather than
    returning it to the pool."""


class Outlet:
    """The producer's end of the queue."""

    def __init__(self, queue: asyncio.Queue[Any], idle_s: float) -> None:
        self._queue = queue
        self._idle_s = idle_s

    async def put(self, item: Any) -> None:
        """Queues `item`, waiting at most the idle bound for room (ClientIdle)."""
        if not self._queue.full():
            self._queue.put_nowait(item)
            return
        try:
            async with asyncio.timeout(self._idle_s):
                await self._queue.put(item)
        except TimeoutError:
            raise ClientIdle from None


# produce(uow, outlet): reads in the snapshot `uow`, puts what it makes on `outlet`.
Producer = Callable[[UnitOfWork, Outlet], Awaitable[None]]


def idle_settings(idle_s: float) -> dict[str, str]:
    """The transaction-local settings of an export's snapshot, which may wait
    for its client between statements (a cursor's FETCHes): it may idle in its
    transaction for the idle bound and a margin, however short the session's
    idle_in_transaction_session_timeout (OBSERVATORY_STATEMENT_TIMEOUT_S)."""
    return {"idle_in_transaction_session_timeout": f"{int((idle_s + IDLE_MARGIN_S) * 1000)}ms"}


class SnapshotExport:
    """One export: `items(produce)` runs `produce` on a snapshot unit in a task
    of its own and yields what it puts on its outlet; `cancel()` stops it."""

    def __init__(
        self,
        db: Database,
        *,
        idle_s: float,
        slots: asyncio.Semaphore,
        queue_items: int = QUEUE_ITEMS,
    ) -> None:
        self._db = db
        self._idle_s = idle_s
        # The snapshot connections exports may hold at once (server.limits).
        self._slots = slots
        self._queue_items = queue_items
        self._task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def cancel_when_done(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """However the RPC ends (also while its stream waits on the client),
        the export stops and its connection goes back at once."""
        # The stubs type the callback as a class of their own; any callable works.
        context.add_done_callback(lambda _: self.cancel())  # type: ignore[arg-type]

    async def items(self, produce: Producer) -> AsyncGenerator[Any, None]:
        """What `produce` puts on its outlet, in order, until it returns; an
        error it raises (or the idle bound's) is raised here, after the items
        it queued before."""
        queue: asyncio.Queue[Any] = asyncio.Queue(self._queue_items)
        self._task = asyncio.create_task(self._produce(produce, queue))
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _produce(self, produce: Producer, queue: asyncio.Queue[Any]) -> None:
        try:
            async with self._slots, self._db.snapshot() as uow:
                await uow.use_local_settings(idle_settings(self._idle_s))
                await produce(uow, Outlet(queue, self._idle_s))
        except asyncio.CancelledError:
            raise
        except ClientIdle:
            # The connection is gone already; what waits on the queue is moot.
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(
                _Failed(
                    errors.LimitExceeded(
                        f"the export waited {self._idle_s:g} s ({IDLE_LIMIT}) for the client "
                        "to read; it was ended and its snapshot released",
                        limit=IDLE_LIMIT,
                        maximum=self._idle_s,
                    )
                )
            )
        except Exception as exc:
            await queue.put(_Failed(exc))
        else:
            await queue.put(_END)


class _Failed:
    """The producer's error, queued after what it made before."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


_END = object()

"""The machinery of the bulk-load streams (ContentService.IngestContent, and
VectorService.UpsertItems once it adopts it): batches cut by rows and bytes,
written on several pooled connections at once while the next ones are
converted, per-element error reports, and moving a staged batch into its
table so that a row the database refuses costs only itself.

How a stream uses it (see server.content.ingest):

    batcher = Batcher(loader.budget, digest=request_id is not None)
    async with loader.pipeline(write) as pipeline:   # write(batch) opens its own write unit
        async for message in whole_stream(messages, context):
            for element in message.<elements>:
                record = convert(element) or None       # None: refused, reported in ItemErrors
                if (batch := batcher.add(element, record)) is not None:
                    await pipeline.put(batch)           # waits while `writers` batches are in flight
        if (batch := batcher.close()) is not None:
            await pipeline.put(batch)

No connection is held while the stream waits for its client: `write` takes
one from the pool for one batch and gives it back when that batch has
committed. Memory is bounded by bytes: at most `writers` batches are in
flight per stream plus the one being filled, each at most `Budget.bytes` of
serialized elements (or one element, when a single one is larger).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import grpc
from observatory.v1 import common_pb2

from server.db import sqlstate
from server.uow import UnitOfWork

MAX_REPORTED_ERRORS = 10_000
# Rows per batch: the database's per-statement cost is well amortised at a few
# thousand rows, and a refused row is found in log2(5000) ~ 13 halvings.
BATCH_ROWS = 5000
# Tries of a batch that the database chose as a deadlock victim (two streams
# inserting the same natural keys in opposite orders) or could not serialise.
BATCH_ATTEMPTS = 3
_RETRIED_SQLSTATES = ("40P01", "40001")

# SQLSTATE classes of errors that a row's own values cause: data exceptions,
# integrity violations, program limits. Validation should catch them all first.
_ROW_ERROR_CLASSES = ("22", "23", "54")

R = TypeVar("R")


class Element(Protocol):
    """What a Batcher needs of a stream's element (a protobuf message)."""

    def ByteSize(self) -> int: ...

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


M = TypeVar("M")


async def whole_stream(
    requests: AsyncIterator[M], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[M]:
    """The client stream's messages, to the end only if the client ended it:
    gRPC ends the messages of a stream the client cancelled (or lost) as it
    ends those of a finished one, so after the last one this sends the
    response headers, which fails on a cancelled call. A stream that broke off
    then raises CancelledError instead of looking complete."""
    async for message in requests:
        yield message
    try:
        await context.send_initial_metadata(())
    except asyncio.CancelledError:
        raise
    except Exception:
        raise asyncio.CancelledError("the client went away before it ended its stream") from None


def is_row_error(exc: BaseException) -> bool:
    code = sqlstate(exc)
    return code is not None and code[:2] in _ROW_ERROR_CLASSES


def default_writers(pool_size: int) -> int:
    """Connections bulk streams write on at once per worker: half the pool (at
    most 4, at least 1), so that the other half stays for everyone else."""
    return max(1, min(4, pool_size // 2))


@dataclass(frozen=True, slots=True)
class Budget:
    """A batch is cut at `rows` elements or `bytes` of serialized elements,
    whichever comes first; `writers` batches are written at once per worker."""

    rows: int = BATCH_ROWS
    bytes: int = 8 * 1024 * 1024
    writers: int = 2


@dataclass(slots=True)
class Batch(Generic[R]):
    """Consecutive elements [first, last] of a stream (by 0-based index in the
    whole stream), and the records of those that passed validation, with
    their stream indices. `digest` (when the stream has a request_id) is the
    SHA-256 of every element of the stream up to `last`, serialized, in
    order: two tries of a stream that agree on it agree on all those rows."""

    first: int
    last: int
    records: list[R] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    size: int = 0
    digest: bytes = b""


class Batcher(Generic[R]):
    """Cuts a stream's elements into batches at the budget's rows or bytes.
    Cuts depend only on the elements (their count and serialized sizes), so
    the same stream sent again is cut the same way, whatever its messages."""

    def __init__(self, budget: Budget, *, digest: bool = False) -> None:
        self._rows = budget.rows
        self._bytes = budget.bytes
        self._digest: Any = hashlib.sha256() if digest else None
        self.received = 0
        self._batch: Batch[R] = Batch(0, -1)

    def add(self, element: Element, record: R | None, size: int | None = None) -> Batch[R] | None:
        """Adds the stream's next element, with its record (None: validation
        refused it) and, when the caller knows it, its encoded size; returns
        the batch it completed, if any."""
        index = self.received
        self.received += 1
        batch = self._batch
        batch.last = index
        if self._digest is not None:
            encoded = element.SerializeToString(deterministic=True)
            self._digest.update(len(encoded).to_bytes(8, "little"))
            self._digest.update(encoded)
        if record is None:
            return None
        batch.records.append(record)
        batch.indices.append(index)
        batch.size += element.ByteSize() if size is None else size
        if len(batch.records) >= self._rows or batch.size >= self._bytes:
            return self._cut()
        return None

    def close(self) -> Batch[R] | None:
        """The last batch: whatever follows the last cut (None when nothing
        does). Its records may be empty when only refused elements remain."""
        if self._batch.last < self._batch.first:
            return None
        return self._cut()

    def stream_digest(self) -> bytes:
        """SHA-256 of every element so far: what the whole stream asked for."""
        return b"" if self._digest is None else bytes(self._digest.digest())

    def _cut(self) -> Batch[R]:
        batch = self._batch
        if self._digest is not None:
            batch.digest = self._digest.digest()
        self._batch = Batch(batch.last + 1, batch.last)
        return batch


class Loader:
    """One worker's bulk loading: the budget, and the writer slots that every
    stream's batches share, so that bulk streams together never hold more than
    `budget.writers` pooled connections."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.slots = asyncio.Semaphore(budget.writers)

    def pipeline(
        self, write: Callable[[Batch[R]], Awaitable[None]], *, in_order: bool = False
    ) -> Pipeline[R]:
        """A stream's pipeline; `in_order`: one batch at a time, each written
        only after the one before it committed."""
        return Pipeline(self, write, 1 if in_order else self.budget.writers)


class Pipeline(Generic[R]):
    """One stream's batches on their way to the database. `put` starts writing
    a batch and returns at once unless `writers` of this stream's batches are
    already in flight; then it waits for one to finish. A failed batch fails
    the stream: the next `put` (or the end of the block) raises its error.

    As an async context manager: a normal exit waits for every batch; an
    exit by an exception (the client broke off, a message did not decode)
    cancels the batches in flight, whose units roll back and free their
    connections; what had committed stays."""

    def __init__(
        self, loader: Loader, write: Callable[[Batch[R]], Awaitable[None]], writers: int
    ) -> None:
        self._loader = loader
        self._write = write
        self._writers = writers
        # Each batch in flight, with the keys it writes (see `put`).
        self._running: dict[asyncio.Task[None], frozenset[Hashable]] = {}
        self._failure: BaseException | None = None

    async def __aenter__(self) -> Pipeline[R]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.finish()
        else:
            await self.cancel()

    async def put(self, batch: Batch[R], keys: frozenset[Hashable] = frozenset()) -> None:
        """Starts writing `batch`. `keys` (e.g. the item IDs an upsert writes):
        the batch waits for every batch in flight that writes one of them, so
        that of two writes of one key, the later in the stream commits later."""
        self._raise_failure()
        while True:
            if len(self._running) >= self._writers:
                blockers = set(self._running)
            else:
                blockers = {task for task, theirs in self._running.items() if keys & theirs}
                if not blockers:
                    break
            await asyncio.wait(blockers, return_when=asyncio.FIRST_COMPLETED)
            self._raise_failure()
        task = asyncio.create_task(self._run(batch))
        self._running[task] = keys
        task.add_done_callback(self._done)

    async def finish(self) -> None:
        """Waits for every batch in flight; raises the first failure. Should the
        wait itself end (the RPC was cancelled), the batches are cancelled."""
        try:
            while self._running:
                await asyncio.wait(set(self._running))
        except BaseException:
            await self.cancel()
            raise
        self._raise_failure()

    async def cancel(self) -> None:
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def _run(self, batch: Batch[R]) -> None:
        async with self._loader.slots:
            for attempt in range(1, BATCH_ATTEMPTS + 1):
                try:
                    await self._write(batch)
                    return
                except Exception as exc:
                    if attempt == BATCH_ATTEMPTS or sqlstate(exc) not in _RETRIED_SQLSTATES:
                        raise

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        if not task.cancelled() and self._failure is None:
            self._failure = task.exception()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


class ItemErrors:
    """The rejected elements of one stream: all counted, the MAX_REPORTED_ERRORS
    lowest stream indices kept for the response, in index order."""

    def __init__(self) -> None:
        self.count = 0
        # How many of them the database refused (after validation passed them).
        self.refused = 0
        self._kept: list[tuple[int, str, str]] = []

    def add(self, index: int, field: str, reason: str) -> None:
        self.count += 1
        if len(self._kept) < MAX_REPORTED_ERRORS or index < self._kept[-1][0]:
            bisect.insort(self._kept, (index, field, reason))
            del self._kept[MAX_REPORTED_ERRORS:]

    def refuse(self, index: int, exc: BaseException) -> None:
        self.refused += 1
        self.add(index, "", f"the database refused this row: {getattr(exc, 'orig', exc)}")

    def refused_by_database(self, index: int, field: str, reason: str) -> None:
        """A refusal recorded earlier (a batch written by an earlier try of
        the same request_id), counted as `refuse` counts it."""
        self.refused += 1
        self.add(index, field, reason)

    def merge(self, other: ItemErrors) -> None:
        """Adds `other`'s errors (those of one batch) to these."""
        self.count += other.count
        self.refused += other.refused
        for kept in other._kept:
            if len(self._kept) < MAX_REPORTED_ERRORS or kept[0] < self._kept[-1][0]:
                bisect.insort(self._kept, kept)
                del self._kept[MAX_REPORTED_ERRORS:]

    def messages(self) -> Iterator[common_pb2.ItemError]:
        for index, field_name, reason in self._kept:
            yield common_pb2.ItemError(index=index, field=field_name, reason=reason)


async def move_in_halves(
    uow: UnitOfWork,
    move: Callable[[int, int], Awaitable[int]],
    first: int,
    last: int,
    errors: ItemErrors,
) -> int:
    """Runs `move(first, last)` (which moves the staged rows with stream index
    in [first, last] in one statement) under a savepoint. Should the database
    refuse a row, the range is halved until that row is found, reported in
    `errors` and skipped, so one bad row never costs the good ones. Returns
    the sum of what the successful moves returned."""
    try:
        async with uow.savepoint():
            return await move(first, last)
    except Exception as exc:
        if not is_row_error(exc):
            raise
        if first == last:
            errors.refuse(first, exc)
            return 0
    middle = (first + last) // 2
    return await move_in_halves(uow, move, first, middle, errors) + await move_in_halves(
        uow, move, middle + 1, last, errors
    )

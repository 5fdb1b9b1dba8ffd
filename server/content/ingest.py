"""IngestContent: one client stream of rows, written batch by batch.

Rows are validated and converted one by one as the messages arrive and cut
into batches of 5,000 rows or OBSERVATORY_BULK_BATCH_BYTES (server.bulk).
Each batch is written in a write unit of its own, taken from the pool only
for that batch: a stream never holds a connection while it waits for its
client. Up to `writers` batches are written at once, on as many connections,
while the next one is being converted.

A batch is COPYed straight into content. Should the database refuse that
COPY (a natural-key duplicate, or a row validation did not foresee), the
batch goes through a staging table instead: one INSERT ... ON CONFLICT DO
NOTHING skips the duplicates, and a refused row is found by halving the
batch, reported and skipped (server.bulk.move_in_halves). After a
duplicate, the rest of the stream takes the staging path straight away.
Rows with no author_id are linked to the actor whose presence is their
author's account, as CreateContent links them.

The response accounts for every row: `inserted`, `duplicates`, and each
error by its index in the whole stream. Each committed batch writes one
audit entry (action `content.ingest`, detail: the batch's received,
inserted, duplicates and errors). A stream that breaks off (the client went
away, a message did not decode) keeps the batches that had committed; the
ones in flight roll back.

With a `request_id`, the stream claims it when it begins (a transaction
of its own), each batch claims a key of its own in its transaction (derived
from the request_id and the batch's first index, stored with the batch's
outcome and the digest of every row up to the batch's end), and the whole
stream's response is stored under the request_id when it ends. A retry
with the same request_id:

- of a stream that finished gets the stored response; nothing is written
  (REQUEST_ID_REUSED if it sends other rows);
- of a stream that broke off (or is still running) runs again, one batch at
  a time: every batch an earlier try committed is skipped and its stored
  outcome counted, so each row is written once and the response is the one
  the first try would have given, had it finished. Should the rows differ
  from those of a committed batch, the retry stops there with
  REQUEST_ID_REUSED, having written nothing the earlier try had not.
  (Batches are cut by row count and size only, so the same rows are cut the
  same way whatever the messages.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from observatory.v1 import content_pb2

from server import bulk, errors, idempotency
from server.audit import AuditRepository
from server.auth import Principal
from server.content import convert
from server.content.repository import ContentRepository
from server.db import UNIQUE_VIOLATION, sqlstate
from server.protoconv import parse_uuid
from server.uow import Database, UnitOfWork

METHOD = "IngestContent"
# The method recorded with each batch's own key.
BATCH_METHOD = "IngestContent.batch"
# Rows converted between two turns of the event loop (a few milliseconds).
YIELD_EVERY_ROWS = 64
_AT = {column: i for i, column in enumerate(convert.INSERT_COLUMNS)}
_PLATFORM, _ACCOUNT, _AUTHOR = _AT["platform"], _AT["author_platform_id"], _AT["author_id"]

Record = tuple[Any, ...]


def batch_key(request_id: uuid.UUID, first: int) -> uuid.UUID:
    """The key a batch starting at stream index `first` claims."""
    return uuid.uuid5(request_id, f"{BATCH_METHOD}:{first}")


class Ingest:
    """One IngestContent stream (see the module's docstring)."""

    def __init__(self, db: Database, loader: bulk.Loader, caller: Principal) -> None:
        self._db = db
        self._loader = loader
        self._caller = caller
        self._owner = caller.user_id
        self._errors = bulk.ItemErrors()
        self._valid = 0
        self._inserted = 0
        # False once a batch met a duplicate: the rest go through staging.
        self._copy_first = True

    async def run(
        self,
        first: content_pb2.IngestContentRequest,
        rest: AsyncIterator[content_pb2.IngestContentRequest],
    ) -> content_pb2.IngestContentResponse:
        key = parse_uuid(first.request_id, "request_id") if first.request_id else None
        retry, finished = (False, None) if key is None else await self._begin(key)
        batcher: bulk.Batcher[Record] = bulk.Batcher(self._loader.budget, digest=key is not None)
        write = self._skip if finished is not None else self._writer(key)
        async with self._loader.pipeline(write, in_order=retry) as pipeline:
            await self._absorb(first, batcher, pipeline)
            async for message in rest:
                await self._absorb(message, batcher, pipeline)
            last = batcher.close()
            if last is not None and last.records:
                await pipeline.put(last)
        digest = idempotency.request_hash(METHOD, batcher.stream_digest())
        if finished is not None:
            return idempotency.replay(finished, METHOD, digest, content_pb2.IngestContentResponse)
        response = content_pb2.IngestContentResponse(
            received=batcher.received,
            inserted=self._inserted,
            duplicates=self._valid - self._errors.refused - self._inserted,
            error_count=self._errors.count,
        )
        response.errors.extend(self._errors.messages())
        if key is None:
            return response
        return await self._store(key, digest, response)

    async def _absorb(
        self,
        message: content_pb2.IngestContentRequest,
        batcher: bulk.Batcher[Record],
        pipeline: bulk.Pipeline[Record],
    ) -> None:
        owner = self._owner
        for i, item in enumerate(message.contents):
            if i % YIELD_EVERY_ROWS == YIELD_EVERY_ROWS - 1:
                # Converting is CPU work on the event loop: let the batches in
                # flight feed their COPYs (and other calls run) now and then.
                await asyncio.sleep(0)
            try:
                record: Record | None = convert.ingest_record(item, owner)
            except errors.InvalidArgument as error:
                self._errors.add(batcher.received, error.field, error.field_violations[0][1])
                record = None
            else:
                self._valid += 1
            batch = batcher.add(item, record)
            if batch is not None:
                await pipeline.put(batch)

    # -- one batch ----------------------------------------------------------------

    def _writer(self, key: uuid.UUID | None) -> Callable[[bulk.Batch[Record]], Awaitable[None]]:
        async def write(batch: bulk.Batch[Record]) -> None:
            async with self._db.write() as uow:
                earlier = None if key is None else await self._claim(uow, key, batch)
                if earlier is None:
                    refused = bulk.ItemErrors()
                    inserted = await self._write_rows(uow, batch, refused)
                    await self._record(uow, key, batch, inserted, refused)
            # Counted once committed: a batch that failed counts nothing.
            if earlier is None:
                self._inserted += inserted
                self._errors.merge(refused)
                return
            self._inserted += earlier.inserted
            for error in earlier.errors:
                self._errors.refused_by_database(error.index, error.field, error.reason)

        return write

    @staticmethod
    async def _skip(batch: bulk.Batch[Record]) -> None:
        """A retry of a finished stream only reads it through."""

    async def _claim(
        self, uow: UnitOfWork, key: uuid.UUID, batch: bulk.Batch[Record]
    ) -> content_pb2.IngestContentResponse | None:
        """Claims the batch's key; when an earlier try of the stream committed
        this batch already, its stored outcome instead."""
        keys = idempotency.IdempotencyRepository(uow.conn)
        own_key = batch_key(key, batch.first)
        if await keys.claim(self._owner, own_key, BATCH_METHOD, batch.digest):
            return None
        stored = await keys.stored(self._owner, own_key)
        return idempotency.replay(
            stored, BATCH_METHOD, batch.digest, content_pb2.IngestContentResponse
        )

    async def _write_rows(
        self, uow: UnitOfWork, batch: bulk.Batch[Record], refused: bulk.ItemErrors
    ) -> int:
        """Writes the batch's rows; returns how many were new."""
        repo = ContentRepository(uow)
        records, indices = await self._own_authors(repo, batch, refused)
        if await repo.owner_has_presences(self._owner):
            records = await self._link_authors(repo, records)
        if self._copy_first:
            try:
                async with uow.savepoint():
                    await repo.copy_in(records)
                return len(records)
            except Exception as exc:
                if not bulk.is_row_error(exc):
                    raise
                if sqlstate(exc) == UNIQUE_VIOLATION:
                    self._copy_first = False
        await repo.create_staging()
        await repo.stage([(*record, i) for record, i in zip(records, indices, strict=True)])
        return await bulk.move_in_halves(uow, repo.move_staged, batch.first, batch.last, refused)

    async def _own_authors(
        self, repo: ContentRepository, batch: bulk.Batch[Record], refused: bulk.ItemErrors
    ) -> tuple[list[Record], list[int]]:
        """The batch's records and their indices, less those whose author_id is
        not one of the owner's actors (each reported in `refused`); the
        owner's actors they name are held FOR KEY SHARE until commit, as
        CreateContent holds them."""
        given = {record[_AUTHOR] for record in batch.records if record[_AUTHOR] is not None}
        if not given:
            return batch.records, batch.indices
        own = set(await repo.lock_own_actors(sorted(given), self._owner))
        if own >= given:
            return batch.records, batch.indices
        records: list[Record] = []
        indices: list[int] = []
        for record, index in zip(batch.records, batch.indices, strict=True):
            if record[_AUTHOR] is not None and record[_AUTHOR] not in own:
                refused.refused_by_database(index, "author_id", "no actor of yours has this ID")
            else:
                records.append(record)
                indices.append(index)
        return records, indices

    async def _link_authors(self, repo: ContentRepository, records: list[Record]) -> list[Record]:
        """The records, those with no author_id linked to the actor of their
        author's account (when it has one)."""
        unlinked = [
            i for i, r in enumerate(records) if r[_AUTHOR] is None and r[_ACCOUNT] is not None
        ]
        if not unlinked:
            return records
        accounts = {(records[i][_PLATFORM], records[i][_ACCOUNT]) for i in unlinked}
        actors = await repo.link_authors(
            self._owner, [a[0] for a in accounts], [a[1] for a in accounts]
        )
        if not actors:
            return records
        linked = list(records)
        for i in unlinked:
            actor = actors.get((records[i][_PLATFORM], records[i][_ACCOUNT]))
            if actor is not None:
                row = list(records[i])
                row[_AUTHOR] = actor
                linked[i] = tuple(row)
        return linked

    async def _record(
        self,
        uow: UnitOfWork,
        key: uuid.UUID | None,
        batch: bulk.Batch[Record],
        inserted: int,
        refused: bulk.ItemErrors,
    ) -> None:
        """The batch's audit entry and, with a request_id, its stored outcome."""
        received = batch.last - batch.first + 1
        await AuditRepository(uow.conn).record(
            self._caller,
            "content.ingest",
            "contents",
            {
                "received": received,
                "inserted": inserted,
                "duplicates": len(batch.records) - refused.refused - inserted,
                "errors": received - len(batch.records) + refused.count,
            },
        )
        if key is not None:
            outcome = content_pb2.IngestContentResponse(inserted=inserted)
            outcome.errors.extend(refused.messages())
            await idempotency.IdempotencyRepository(uow.conn).save_response(
                self._owner, batch_key(key, batch.first), outcome.SerializeToString()
            )

    # -- the whole stream's request_id ----------------------------------------------

    async def _begin(self, key: uuid.UUID) -> tuple[bool, tuple[str, bytes, bytes | None] | None]:
        """Claims the request_id for this stream. Returns (retry, finished):
        whether an earlier try claimed it already, and that try's stored
        (method, digest, response) if it finished."""
        async with self._db.write() as uow:
            keys = idempotency.IdempotencyRepository(uow.conn)
            if await keys.claim(self._owner, key, METHOD, b""):
                return False, None
            stored = await keys.stored(self._owner, key)
        if stored[0] != METHOD:
            raise errors.RequestIdReused()
        return True, (stored if stored[2] is not None else None)

    async def _store(
        self, key: uuid.UUID, digest: bytes, response: content_pb2.IngestContentResponse
    ) -> content_pb2.IngestContentResponse:
        """Stores the stream's response under its request_id; should another try
        of the same stream have finished first, answers as it did (with
        exactly-once batches, both tries of the same rows answer alike)."""
        async with self._db.write() as uow:
            keys = idempotency.IdempotencyRepository(uow.conn)
            stored = await keys.stored(self._owner, key)
            if stored[2] is None:
                await keys.save_response(self._owner, key, response.SerializeToString(), digest)
                return response
        return idempotency.replay(stored, METHOD, digest, content_pb2.IngestContentResponse)

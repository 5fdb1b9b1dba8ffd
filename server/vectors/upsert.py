"""UpsertItems: one client stream of items, written batch by batch.

Items are converted as the messages arrive, a few hundred at a time (their
vectors as one numpy matrix: sized, checked for finite values and norms, and
encoded in pgvector's binary form with a handful of numpy calls), and cut
into batches of 5,000 items or OBSERVATORY_BULK_BATCH_BYTES (server.bulk).
Each batch is written in a write unit of its own, taken from the pool only
for that batch: a stream never holds a connection while it waits for its
client. Up to `writers` batches are written at once, on as many
connections, while the next ones are converted; a batch waits for any batch
in flight that writes one of its ids, so that of two writes of one id the
later in the stream commits later (it wins, as in one statement).

Each batch holds the collection's row key-share locked (a concurrent
DeleteCollection waits for it; a collection deleted meanwhile fails the
stream with NOT_FOUND, one re-created under the same name with ABORTED).
A batch of distinct ids is COPYed straight into the collection's partition
(once a COPY of the stream met an id the collection held, only a batch that
a look-up finds holds none of its ids); any other batch, or one whose COPY
the database refused, goes through a staging table and one INSERT ...
ON CONFLICT DO UPDATE (the last of repeated ids wins), where a row the
database refuses is found by halving the batch, reported and skipped
(server.bulk.move_in_halves). Items whose content_id is not one of the
caller's content rows are reported and skipped.

The response accounts for every item: `upserted`, and each error by its
index in the whole stream. Each committed batch writes one audit entry
(action `vectors.items.upsert`, detail: the collection's name and the
batch's received, upserted and errors). A stream that breaks off keeps the
batches that had committed; those in flight roll back. UpsertItemsRequest
has no request_id: an upsert is idempotent by itself, so the same stream
sent again after a break leaves the collection as one whole stream would
have and answers as it would have.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from observatory.v1 import vector_pb2

from server import bulk, errors
from server.audit import AuditRepository
from server.auth import Principal
from server.content.repository import ContentRepository
from server.db import UNIQUE_VIOLATION, sqlstate
from server.uow import Database, UnitOfWork
from server.vectors import convert
from server.vectors.repository import CollectionRepository, CollectionSpec
from server.vectors.wire import WireRequest

# Items converted between two turns of the event loop (a few milliseconds at
# the usual dimensions): the batches in flight feed their COPYs meanwhile.
CONVERT_ITEMS = 256
# Where a record (repository.STAGED_COLUMNS) holds the id and the content_id.
_ID, _CONTENT_ID = 0, 5

Record = tuple[Any, ...]


class Upsert:
    """One UpsertItems stream into the collection `spec` (see the module's docstring)."""

    def __init__(
        self, db: Database, loader: bulk.Loader, caller: Principal, spec: CollectionSpec
    ) -> None:
        self._db = db
        self._loader = loader
        self._caller = caller
        self._spec = spec
        self._errors = bulk.ItemErrors()
        self._upserted = 0
        self._overwrites = False  # a COPY of this stream met an id already held

    async def run(
        self,
        first: WireRequest,
        rest: AsyncIterator[WireRequest],
    ) -> vector_pb2.UpsertItemsResponse:
        batcher: bulk.Batcher[Record] = bulk.Batcher(self._loader.budget)
        async with self._loader.pipeline(self._write) as pipeline:
            await self._absorb(first, batcher, pipeline)
            async for message in rest:
                await self._absorb(message, batcher, pipeline)
            # The last batch goes out even with no valid item: it tells a
            # collection deleted meanwhile and audits the stream's last errors.
            last = batcher.close()
            if last is not None:
                await _put(pipeline, last)
        response = vector_pb2.UpsertItemsResponse(
            upserted=self._upserted, received=batcher.received, error_count=self._errors.count
        )
        response.errors.extend(self._errors.messages())
        return response

    async def _absorb(
        self,
        message: WireRequest,
        batcher: bulk.Batcher[Record],
        pipeline: bulk.Pipeline[Record],
    ) -> None:
        items = message.items
        for start in range(0, len(items), CONVERT_ITEMS):
            if start:
                # Converting is CPU work on the event loop: let the batches in
                # flight (and other calls) run now and then.
                await asyncio.sleep(0)
            chunk = items[start : start + CONVERT_ITEMS]
            outcomes = convert.item_records(chunk, self._spec)
            sizes = message.sizes[start : start + CONVERT_ITEMS]
            for item, outcome, size in zip(chunk, outcomes, sizes, strict=True):
                record: Record | None
                if isinstance(outcome, errors.InvalidArgument):
                    self._errors.add(
                        batcher.received, outcome.field, outcome.field_violations[0][1]
                    )
                    record = None
                else:
                    record = outcome
                batch = batcher.add(item, record, size)
                if batch is not None:
                    await _put(pipeline, batch)

    # -- one batch ----------------------------------------------------------------

    async def _write(self, batch: bulk.Batch[Record]) -> None:
        async with self._db.write() as uow:
            repo = CollectionRepository(uow)
            # Key-share: concurrent upserts pass, DeleteCollection waits for us.
            spec = await repo.lock(self._caller.user_id, self._spec.name)
            if spec is None:
                raise errors.NotFound(f"collection {errors.quote(self._spec.name)} not found")
            if spec.id != self._spec.id:
                raise errors.Aborted(
                    f"collection {errors.quote(self._spec.name)} was re-created meanwhile; retry"
                )
            refused = bulk.ItemErrors()
            records, indices = await self._own_content(uow, batch, refused)
            if records:
                await self._write_rows(uow, repo, batch, records, indices, refused)
            upserted = len(batch.records) - refused.refused
            received = batch.last - batch.first + 1
            await AuditRepository(uow.conn).record(
                self._caller,
                "vectors.items.upsert",
                f"vector_collections/{spec.id}",
                {
                    "name": spec.name,
                    "received": received,
                    "upserted": upserted,
                    "errors": received - len(batch.records) + refused.count,
                },
            )
        # Counted once committed: a batch that failed counts nothing.
        self._upserted += upserted
        self._errors.merge(refused)

    async def _write_rows(
        self,
        uow: UnitOfWork,
        repo: CollectionRepository,
        batch: bulk.Batch[Record],
        records: list[Record],
        indices: list[int],
        refused: bulk.ItemErrors,
    ) -> None:
        spec = self._spec
        ids = [record[_ID] for record in records]
        repeated = len(set(ids)) < len(ids)
        # A stream of new items (a load) COPYs without looking first. Once a
        # COPY met an id the collection held, this stream's later batches
        # look first (one primary-key probe per id) and go to staging when
        # they hold one: a re-sent stream wastes one COPY, not one per batch.
        if not repeated and not (self._overwrites and await repo.holds_any(spec, ids)):
            try:
                async with uow.savepoint():
                    await repo.copy_items(spec, records)
                return
            except Exception as exc:
                # The collection holds one of the ids (a unique violation),
                # or the database refused a row: the staging path.
                if not bulk.is_row_error(exc):
                    raise
                self._overwrites = self._overwrites or sqlstate(exc) == UNIQUE_VIOLATION
        await repo.create_staging()
        await repo.stage([(i, *record) for record, i in zip(records, indices, strict=True)])
        await bulk.move_in_halves(
            uow,
            lambda first, last: repo.move_staged(spec, first, last, repeated_ids=repeated),
            batch.first,
            batch.last,
            refused,
        )

    async def _own_content(
        self, uow: UnitOfWork, batch: bulk.Batch[Record], refused: bulk.ItemErrors
    ) -> tuple[list[Record], list[int]]:
        """The batch's records and their indices, less those whose content_id
        is not one of the caller's content rows (each reported in `refused`)."""
        named = {record[_CONTENT_ID] for record in batch.records} - {None}
        if not named:
            return batch.records, batch.indices
        owner: uuid.UUID = self._caller.user_id
        foreign = named - await ContentRepository(uow).owned_ids(list(named), owner)
        if not foreign:
            return batch.records, batch.indices
        records: list[Record] = []
        indices: list[int] = []
        for record, index in zip(batch.records, batch.indices, strict=True):
            if record[_CONTENT_ID] in foreign:
                refused.refused_by_database(index, "content_id", "no content of yours has this ID")
            else:
                records.append(record)
                indices.append(index)
        return records, indices


async def _put(pipeline: bulk.Pipeline[Record], batch: bulk.Batch[Record]) -> None:
    """Starts writing `batch` once no batch in flight writes one of its ids."""
    await pipeline.put(batch, keys=frozenset(record[_ID] for record in batch.records))

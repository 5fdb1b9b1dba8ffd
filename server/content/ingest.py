"""IngestContent: one client stream, loaded at COPY speed in one write unit."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from observatory.v1 import content_pb2

from server import bulk, errors, idempotency
from server.audit import AuditRepository
from server.auth import Principal
from server.content import convert
from server.content.repository import ContentRepository
from server.protoconv import parse_uuid
from server.uow import UnitOfWork

INGEST_BATCH_ROWS = 5000
METHOD = "IngestContent"


class Ingest:
    """One IngestContent stream: validate each row, COPY good ones in batches,
    report bad ones by their index in the whole stream.

    Each batch moves into content in one INSERT under a savepoint. Validation
    should leave the database nothing to refuse; should it refuse a row all the
    same, the batch is halved until that row is found, reported and skipped, so
    one bad row never costs the good ones."""

    def __init__(self, uow: UnitOfWork, caller: Principal) -> None:
        self._uow = uow
        self._caller = caller
        self._repo = ContentRepository(uow)
        self._keys = idempotency.IdempotencyRepository(uow.conn)
        # Only a stream with a request_id needs its payload digested.
        self._digest: Any = None
        self._response = content_pb2.IngestContentResponse()
        self._errors = bulk.ItemErrors()
        self._valid = 0

    def _absorb(
        self, message: content_pb2.IngestContentRequest, batch: list[tuple[Any, ...]]
    ) -> None:
        for item in message.contents:
            index = self._response.received
            self._response.received += 1
            self._digest_item(item)
            try:
                record = (*convert.ingest_record(item, self._caller.user_id), index)
            except errors.InvalidArgument as error:
                self._errors.add(index, error.field, error.field_violations[0][1])
                continue
            self._valid += 1
            batch.append(record)

    async def _move_staged(self, first: int, last: int) -> int:
        """Moves the staged batch [first, last] into content, skipping (and
        reporting) each row the database refuses, and empties the staging
        table; returns how many rows were new."""
        inserted = await bulk.move_in_halves(
            self._uow, self._repo.move_staged, first, last, self._errors
        )
        await self._repo.clear_staging()
        return inserted

    async def run(
        self,
        first: content_pb2.IngestContentRequest,
        rest: AsyncIterator[content_pb2.IngestContentRequest],
    ) -> content_pb2.IngestContentResponse:
        key = parse_uuid(first.request_id, "request_id") if first.request_id else None
        if key is not None:
            self._digest = hashlib.sha256(METHOD.encode())
            if not await self._keys.claim(self._caller.user_id, key, METHOD, b""):
                return await self._replay(key, first, rest)
        await self._repo.create_staging()
        inserted = 0
        batch: list[tuple[Any, ...]] = []
        pending: asyncio.Task[int] | None = None
        try:
            self._absorb(first, batch)
            async for message in rest:
                self._absorb(message, batch)
                if len(batch) >= INGEST_BATCH_ROWS:
                    if pending is not None:
                        inserted += await pending
                    # COPY now (it is quick while nothing else runs), then let the
                    # database move the batch while the next one is parsed.
                    await self._repo.stage(batch)
                    pending = asyncio.create_task(self._move_staged(batch[0][-1], batch[-1][-1]))
                    batch = []
            if pending is not None:
                inserted += await pending
                pending = None
            if batch:
                await self._repo.stage(batch)
                inserted += await self._move_staged(batch[0][-1], batch[-1][-1])
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
        self._response.inserted = inserted
        self._response.duplicates = self._valid - self._errors.refused - inserted
        self._response.error_count = self._errors.count
        self._response.errors.extend(self._errors.messages())
        await AuditRepository(self._uow.conn).record(
            self._caller,
            "content.ingest",
            "contents",
            {
                "received": self._response.received,
                "inserted": inserted,
                "duplicates": self._response.duplicates,
                "errors": self._response.error_count,
            },
        )
        if key is not None:
            await self._keys.save_response(
                self._caller.user_id, key, self._response.SerializeToString(), self._digest.digest()
            )
        return self._response

    async def _replay(
        self,
        key: uuid.UUID,
        first: content_pb2.IngestContentRequest,
        rest: AsyncIterator[content_pb2.IngestContentRequest],
    ) -> content_pb2.IngestContentResponse:
        """A retried stream: read it through, compare, answer as the first time."""
        self._absorb_digest(first)
        async for message in rest:
            self._absorb_digest(message)
        stored = await self._keys.stored(self._caller.user_id, key)
        return idempotency.replay(
            stored, METHOD, self._digest.digest(), content_pb2.IngestContentResponse
        )

    def _absorb_digest(self, message: content_pb2.IngestContentRequest) -> None:
        for item in message.contents:
            self._digest_item(item)

    def _digest_item(self, item: content_pb2.Content) -> None:
        if self._digest is None:
            return
        encoded = item.SerializeToString(deterministic=True)
        self._digest.update(len(encoded).to_bytes(8, "little"))
        self._digest.update(encoded)

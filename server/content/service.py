"""Content business rules. Each public method is one unit of work."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from google.protobuf import field_mask_pb2
from observatory.v1 import content_pb2
from sqlalchemy.ext.asyncio import AsyncConnection

from server import bulk, errors, idempotency, pagination
from server.audit import AuditRepository
from server.auth import Principal
from server.content import convert
from server.content.repository import ContentQuery, ContentRepository, lookup_content
from server.db import Database
from server.protoconv import mask_fields, parse_uuid, timestamp_field
from server.tables import CONTENT_NATURAL_KEY
from server.urls import normalize_url

INGEST_BATCH_ROWS = 5000


def _owner_scope(caller: Principal) -> uuid.UUID | None:
    """Admins see every owner's rows; users only their own."""
    return None if caller.is_admin else caller.user_id


def _filter_texts(filter: content_pb2.ContentFilter, name: str) -> tuple[str, ...]:
    values = tuple(getattr(filter, name))
    for i, value in enumerate(values):
        _check_filter_text(value, f"filter.{name}[{i}]")
    return values


def _check_filter_text(value: str, field: str) -> None:
    # PostgreSQL text cannot hold NUL; caught here so the error names the field.
    if "\x00" in value:
        raise errors.InvalidArgument(field, "must not contain NUL characters")


def content_query(caller: Principal, filter: content_pb2.ContentFilter) -> ContentQuery:
    """Validates a ContentFilter (field paths relative to the request)."""
    for name in ("collection_run_id", "search_term", "query"):
        _check_filter_text(getattr(filter, name), f"filter.{name}")
    author_ids = [
        parse_uuid(value, f"filter.author_ids[{i}]") for i, value in enumerate(filter.author_ids)
    ]
    after = timestamp_field(filter, "published_after", "filter.published_after")
    before = timestamp_field(filter, "published_before", "filter.published_before")
    if after is not None and before is not None and after >= before:
        raise errors.InvalidArgument(
            "filter.published_before", "must be later than published_after"
        )
    return ContentQuery(
        owner_id=_owner_scope(caller),
        platforms=_filter_texts(filter, "platforms"),
        arenas=_filter_texts(filter, "arenas"),
        languages=_filter_texts(filter, "languages"),
        published_after=after,
        published_before=before,
        author_ids=tuple(author_ids),
        collection_run_id=filter.collection_run_id or None,
        search_term=filter.search_term or None,
        query=filter.query.strip() or None,
        show_deleted=filter.show_deleted,
    )


def _prefixed(error: errors.InvalidArgument, prefix: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"{prefix}.{error.field}", error.field_violations[0][1])


class ContentService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self, caller: Principal, message: content_pb2.Content, request_id: str
    ) -> content_pb2.Content:
        try:
            values = convert.new_content_values(message, caller.user_id)
        except errors.InvalidArgument as error:
            raise _prefixed(error, "content") from None
        digest = idempotency.request_hash("CreateContent", message)
        async with self._db.write() as conn:

            async def work() -> content_pb2.Content:
                row = await ContentRepository(conn).insert(values)
                if row is None:
                    raise errors.AlreadyExists(
                        "content with this platform, platform_id and published_at already exists"
                    )
                await AuditRepository(conn).record(
                    caller, "content.create", f"contents/{row['id']}"
                )
                return convert.to_proto(row)

            return await idempotency.once(
                conn, caller, request_id, "CreateContent", digest, content_pb2.Content, work
            )

    async def get(self, caller: Principal, content_id: uuid.UUID) -> content_pb2.Content:
        async with self._db.lookup() as driver:
            row = await lookup_content(driver, content_id, _owner_scope(caller))
        if row is None:
            raise errors.NotFound(f"content {content_id} not found")
        return convert.to_proto(row)

    async def list(
        self, caller: Principal, request: content_pb2.ListContentRequest
    ) -> content_pb2.ListContentResponse:
        query = content_query(caller, request.filter)
        size = pagination.page_size(request.page_size)
        token_query = pagination.fingerprint("ListContent", request.filter, str(query.owner_id))
        after = pagination.decode_token(
            request.page_token, token_query, datetime.fromisoformat, uuid.UUID
        )
        async with self._db.read() as conn:
            rows = await ContentRepository(conn).find_page(query, after=after, limit=size + 1)
        response = content_pb2.ListContentResponse()
        for row in rows[:size]:
            convert.to_proto(row, response.contents.add())
        response.next_page_token = pagination.next_page_token(
            rows, size, token_query, lambda row: (row["published_at"], row["id"])
        )
        return response

    async def update(
        self, caller: Principal, message: content_pb2.Content, mask: field_mask_pb2.FieldMask
    ) -> content_pb2.Content:
        content_id = parse_uuid(message.id, "content.id")
        fields = mask_fields(mask, convert.WRITABLE_FIELDS, convert.OUTPUT_ONLY_FIELDS, "Content")
        try:
            changes = convert.writable_values(message, fields)
        except errors.InvalidArgument as error:
            raise _prefixed(error, "content") from None
        async with self._db.write() as conn:
            repo = ContentRepository(conn)
            current = await repo.get(content_id, _owner_scope(caller), for_update=True)
            if current is None:
                raise errors.NotFound(f"content {content_id} not found")
            merged = {**current, **changes}
            try:
                convert.check_complete(merged)
            except errors.InvalidArgument as error:
                raise _prefixed(error, "content") from None
            if {"title", "text_content"} & fields:
                changes["content_hash"] = convert.content_hash(
                    merged["title"], merged["text_content"]
                )
            if "url" in fields:
                changes["url_normalized"] = normalize_url(merged["url"])
            if fields & set(CONTENT_NATURAL_KEY) and await repo.natural_key_taken(
                merged, content_id
            ):
                raise errors.AlreadyExists(
                    "content with this platform, platform_id and published_at already exists"
                )
            row = await repo.update(content_id, _owner_scope(caller), changes)
            assert row is not None
            await AuditRepository(conn).record(
                caller, "content.update", f"contents/{content_id}", {"fields": sorted(fields)}
            )
            return convert.to_proto(row)

    async def set_deleted(
        self, caller: Principal, content_id: uuid.UUID, deleted: bool
    ) -> content_pb2.Content:
        async with self._db.write() as conn:
            repo = ContentRepository(conn)
            row = await repo.set_deleted(content_id, _owner_scope(caller), deleted)
            if row is None:
                existing = await repo.get(content_id, _owner_scope(caller))
                if existing is None or deleted:
                    raise errors.NotFound(f"content {content_id} not found")
                raise errors.AlreadyExists(f"content {content_id} is not deleted")
            action = "content.delete" if deleted else "content.undelete"
            await AuditRepository(conn).record(caller, action, f"contents/{content_id}")
            return convert.to_proto(row)

    async def search(
        self, caller: Principal, request: content_pb2.SearchContentRequest
    ) -> content_pb2.SearchContentResponse:
        query = content_query(caller, request.filter)
        if not query.query:
            raise errors.InvalidArgument("filter.query", "is required for SearchContent")
        size = pagination.page_size(request.page_size)
        token_query = pagination.fingerprint("SearchContent", request.filter, str(query.owner_id))
        after = pagination.decode_token(request.page_token, token_query, float, uuid.UUID)
        async with self._db.read() as conn:
            rows = await ContentRepository(conn).search(query, after=after, limit=size + 1)
        response = content_pb2.SearchContentResponse()
        for row in rows[:size]:
            result = response.results.add(rank=row["rank"], snippet=row["snippet"] or "")
            convert.to_proto(row, result.content)
        response.next_page_token = pagination.next_page_token(
            rows, size, token_query, lambda row: (row["rank"], row["id"])
        )
        return response

    async def ingest(
        self, caller: Principal, stream: AsyncIterator[content_pb2.IngestContentRequest]
    ) -> content_pb2.IngestContentResponse:
        first = await anext(stream, None)
        if first is None:
            return content_pb2.IngestContentResponse()
        async with self._db.write() as conn:
            return await _Ingest(conn, caller).run(first, stream)

    async def prepare_partitions(self, months_ahead: int) -> int:
        """Makes sure monthly partitions exist from this month to `months_ahead` on."""
        today = datetime.now(UTC).date().replace(day=1)
        async with self._db.write() as conn:
            return await ContentRepository(conn).ensure_partitions(today, months_ahead + 1)


class _Ingest:
    """One IngestContent stream: validate each row, COPY good ones in batches,
    report bad ones by their index in the whole stream.

    Each batch moves into content in one INSERT under a savepoint. Validation
    should leave the database nothing to refuse; should it refuse a row all the
    same, the batch is halved until that row is found, reported and skipped, so
    one bad row never costs the good ones."""

    def __init__(self, conn: AsyncConnection, caller: Principal) -> None:
        self._conn = conn
        self._caller = caller
        self._repo = ContentRepository(conn)
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
        """Moves the staged batch [first, last] into content and empties the
        staging table; returns how many rows were new."""
        inserted = await self._move(first, last)
        await self._repo.clear_staging()
        return inserted

    async def _move(self, first: int, last: int) -> int:
        """Moves the staged rows [first, last] into content, skipping (and
        reporting) each row the database refuses."""
        return await bulk.move_in_halves(
            self._conn, self._repo.move_staged, first, last, self._errors
        )

    async def run(
        self,
        first: content_pb2.IngestContentRequest,
        rest: AsyncIterator[content_pb2.IngestContentRequest],
    ) -> content_pb2.IngestContentResponse:
        key = parse_uuid(first.request_id, "request_id") if first.request_id else None
        if key is not None:
            self._digest = hashlib.sha256(b"IngestContent")
        keys = idempotency.IdempotencyRepository(self._conn)
        if key is not None and not await keys.claim(
            self._caller.user_id, key, "IngestContent", b""
        ):
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
        await AuditRepository(self._conn).record(
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
            await keys.save_response(
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
        method, stored_hash, stored = await idempotency.IdempotencyRepository(self._conn).stored(
            self._caller.user_id, key
        )
        if method != "IngestContent" or stored_hash != self._digest.digest() or stored is None:
            raise errors.RequestIdReused()
        return content_pb2.IngestContentResponse.FromString(stored)

    def _absorb_digest(self, message: content_pb2.IngestContentRequest) -> None:
        for item in message.contents:
            self._digest_item(item)

    def _digest_item(self, item: content_pb2.Content) -> None:
        if self._digest is None:
            return
        encoded = item.SerializeToString(deterministic=True)
        self._digest.update(len(encoded).to_bytes(8, "little"))
        self._digest.update(encoded)

"""Content business rules, applied inside the unit of work each RPC is
handed. The `*_request` functions check a request's shape before any unit
is opened."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from observatory.v1 import content_pb2

from server import audit, errors, idempotency, pagination, validate
from server.auth import Principal
from server.coalesce import PointReads
from server.content import convert
from server.content.repository import (
    CREATE_METHOD,
    LOCK_ROUNDS,
    ContentQuery,
    ContentRepository,
)
from server.content.tables import CONTENT_NATURAL_KEY
from server.protoconv import mask_fields, optional_uuid, parse_uuid, timestamp_field
from server.uow import Database, UnitOfWork


def owner_scope(caller: Principal) -> uuid.UUID | None:
    """Admins see every owner's rows; users only their own."""
    return None if caller.is_admin else caller.user_id


def _filter_texts(filter: content_pb2.ContentFilter, name: str, max_bytes: int) -> tuple[str, ...]:
    return validate.texts(getattr(filter, name), f"filter.{name}", max_bytes=max_bytes)


def content_query(caller: Principal, filter: content_pb2.ContentFilter) -> ContentQuery:
    """Validates a ContentFilter (field paths relative to the request). Its
    lists hold at most validate.MAX_FILTER_VALUES values (author_ids:
    validate.MAX_IDS), its texts what the stored fields may hold."""
    name_bytes = validate.MAX_NAME_BYTES
    collection_run_id = validate.text(
        filter.collection_run_id, "filter.collection_run_id", max_bytes=convert.MAX_KEY_BYTES
    )
    search_term = validate.text(
        filter.search_term, "filter.search_term", max_bytes=convert.MAX_KEY_BYTES
    )
    query = validate.text(filter.query, "filter.query", max_chars=validate.MAX_QUERY_CHARS)
    author_ids = validate.uuids(filter.author_ids, "filter.author_ids")
    after = timestamp_field(filter, "published_after", "filter.published_after")
    before = timestamp_field(filter, "published_before", "filter.published_before")
    if after is not None and before is not None and after >= before:
        raise errors.InvalidArgument(
            "filter.published_before", "must be later than published_after"
        )
    return ContentQuery(
        owner_id=owner_scope(caller),
        platforms=_filter_texts(filter, "platforms", name_bytes),
        arenas=_filter_texts(filter, "arenas", name_bytes),
        languages=_filter_texts(filter, "languages", name_bytes),
        published_after=after,
        published_before=before,
        author_ids=tuple(author_ids),
        collection_run_id=collection_run_id or None,
        search_term=search_term or None,
        query=query.strip() or None,
        show_deleted=filter.show_deleted,
    )


def _prefixed(error: errors.InvalidArgument, prefix: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"{prefix}.{error.field}", error.field_violations[0][1])


@dataclass(frozen=True, slots=True)
class NewContent:
    """A checked CreateContent request."""

    values: dict[str, Any]
    request_id: uuid.UUID | None
    digest: bytes


def create_request(caller: Principal, request: content_pb2.CreateContentRequest) -> NewContent:
    try:
        values = convert.new_content_values(request.content, caller.user_id)
    except errors.InvalidArgument as error:
        raise _prefixed(error, "content") from None
    request_id = optional_uuid(request.request_id, "request_id")
    digest = b"" if request_id is None else idempotency.request_hash(CREATE_METHOD, request.content)
    return NewContent(values, request_id, digest)


@dataclass(frozen=True, slots=True)
class ContentChange:
    """A checked UpdateContent request: the row, the fields named, their values."""

    content_id: uuid.UUID
    fields: frozenset[str]
    values: dict[str, Any]


def update_request(request: content_pb2.UpdateContentRequest) -> ContentChange:
    content_id = parse_uuid(request.content.id, "content.id")
    fields = mask_fields(
        request.update_mask, convert.WRITABLE_FIELDS, convert.OUTPUT_ONLY_FIELDS, "Content"
    )
    try:
        values = convert.writable_values(request.content, fields)
    except errors.InvalidArgument as error:
        raise _prefixed(error, "content") from None
    return ContentChange(content_id, fields, values)


@dataclass(frozen=True, slots=True)
class PageRequest:
    """A checked ListContent or SearchContent request."""

    query: ContentQuery
    size: int
    token_query: str
    after: tuple[Any, ...] | None


def list_request(caller: Principal, request: content_pb2.ListContentRequest) -> PageRequest:
    query = content_query(caller, request.filter)
    size = pagination.page_size(request.page_size)
    token_query = pagination.fingerprint("ListContent", request.filter, str(query.owner_id))
    after = pagination.decode_token(
        request.page_token, token_query, datetime.fromisoformat, uuid.UUID
    )
    return PageRequest(query, size, token_query, after)


def search_request(caller: Principal, request: content_pb2.SearchContentRequest) -> PageRequest:
    query = content_query(caller, request.filter)
    if not query.query:
        raise errors.InvalidArgument("filter.query", "is required for SearchContent")
    size = pagination.page_size(request.page_size)
    token_query = pagination.fingerprint("SearchContent", request.filter, str(query.owner_id))
    after = pagination.decode_token(request.page_token, token_query, float, uuid.UUID)
    return PageRequest(query, size, token_query, after)


# A page ends early once its rows hold this many characters of title and text,
# so that it fits the 4 MiB a gRPC client receives by default (unless its rows
# are mostly characters of three or four bytes); the next page goes on from
# there. A single row is always served.
PAGE_TEXT_CHARS = 2_000_000


def _page_rows(rows: Sequence[Any], size: int) -> int:
    """How many of `rows` (fetched with a limit of `size` + 1) a page holds: up
    to `size`, fewer when their text passes PAGE_TEXT_CHARS (never none)."""
    total = 0
    for i, row in enumerate(rows[:size]):
        total += len(row["title"] or "") + len(row["text_content"] or "")
        if total > PAGE_TEXT_CHARS and i:
            return i
    return min(len(rows), size)


async def _rows_by_id(uow: UnitOfWork, ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    return await ContentRepository(uow).by_ids(ids)


def _row_id(row: asyncpg.Record) -> uuid.UUID:
    content_id: uuid.UUID = row["id"]
    return content_id


async def _own_author(
    repo: ContentRepository, values: dict[str, Any], owner_id: uuid.UUID
) -> list[uuid.UUID]:
    """The given author_id, locked (FOR KEY SHARE, as a merge would wait for),
    when it names an actor of the row's owner; NOT_FOUND otherwise (another
    owner's actor looks the same as none)."""
    author_id = values.get("author_id")
    if author_id is None:
        return []
    if not await repo.lock_own_actors([author_id], owner_id):
        raise errors.NotFound(f"actor {author_id} (content.author_id) not found")
    return [author_id]


class ContentService:
    def __init__(self, units: Database) -> None:
        # GetContent's reads: those that arrive together share one query.
        self._by_id = PointReads(units, _rows_by_id, _row_id)

    async def create(
        self, uow: UnitOfWork, caller: Principal, new: NewContent
    ) -> content_pb2.Content:
        repo = ContentRepository(uow)
        entry = audit.entry_params(caller, "content.create")
        locked = await _own_author(repo, new.values, new.values["owner_id"])
        for _ in range(LOCK_ROUNDS):
            row = await repo.create(
                new.values,
                locked=locked,
                request_id=new.request_id,
                digest=new.digest,
                entry=entry,
            )
            if row["ready"]:
                break
            # The author's actor must be held before a row links to it (see
            # repository._hold_linked_actors): lock it, then try again.
            locked += await repo.lock_actors([row["linked_author"]])
        else:
            raise errors.Aborted("the author's actor kept being merged; retry")
        if row["id"] is not None:
            response = convert.to_proto(row)
            if new.request_id is not None:
                await idempotency.store_response(
                    uow.driver, caller.user_id, new.request_id, response.SerializeToString()
                )
            return response
        if new.request_id is not None and not row["claimed"]:
            stored = (row["prior_method"], row["prior_request_hash"], row["prior_response"])
            if stored[0] is None:
                # The first call committed after this statement's snapshot began.
                stored = await idempotency.IdempotencyRepository(uow.conn).stored(
                    caller.user_id, new.request_id
                )
            return idempotency.replay(stored, CREATE_METHOD, new.digest, content_pb2.Content)
        raise errors.AlreadyExists(
            "content with this platform, platform_id and published_at already exists"
        )

    async def get(self, caller: Principal, content_id: uuid.UUID) -> content_pb2.Content:
        """One row by ID, read together with the other reads in flight."""
        row = await self._by_id.get(content_id)
        if row is None or not (caller.is_admin or row["owner_id"] == caller.user_id):
            raise errors.NotFound(f"content {content_id} not found")
        return convert.to_proto(row)

    async def list(self, uow: UnitOfWork, page: PageRequest) -> content_pb2.ListContentResponse:
        rows = await ContentRepository(uow).find_page(
            page.query,
            after=page.after,
            limit=page.size + 1,
        )
        size = _page_rows(rows, page.size)
        response = content_pb2.ListContentResponse()
        for row in rows[:size]:
            convert.to_proto(row, response.contents.add())
        response.next_page_token = pagination.next_page_token(
            rows[: size + 1], size, page.token_query, lambda row: (row["published_at"], row["id"])
        )
        return response

    async def update(
        self, uow: UnitOfWork, caller: Principal, change: ContentChange
    ) -> content_pb2.Content:
        content_id, fields, changes = change.content_id, change.fields, dict(change.values)
        repo = ContentRepository(uow)
        current = await repo.get(content_id, owner_scope(caller), for_update=True)
        if current is None:
            raise errors.NotFound(f"content {content_id} not found")
        if "author_id" in fields:
            await _own_author(repo, changes, current["owner_id"])
        merged = {**current, **changes}
        try:
            convert.check_complete(merged)
        except errors.InvalidArgument as error:
            raise _prefixed(error, "content") from None
        if {"title", "text_content"} & fields:
            changes["content_hash"] = convert.content_hash(merged["title"], merged["text_content"])
        if fields & set(CONTENT_NATURAL_KEY) and await repo.natural_key_taken(merged, content_id):
            raise errors.AlreadyExists(
                "content with this platform, platform_id and published_at already exists"
            )
        entry = audit.entry_params(caller, "content.update", {"fields": sorted(fields)})
        row = await repo.update(content_id, changes, entry)
        assert row is not None
        return convert.to_proto(row)

    async def set_deleted(
        self, uow: UnitOfWork, caller: Principal, content_id: uuid.UUID, deleted: bool
    ) -> content_pb2.Content:
        repo = ContentRepository(uow)
        action = "content.delete" if deleted else "content.undelete"
        entry = audit.entry_params(caller, action)
        row = await repo.set_deleted(content_id, owner_scope(caller), deleted, entry)
        if row is None:
            if deleted or await repo.get(content_id, owner_scope(caller)) is None:
                raise errors.NotFound(f"content {content_id} not found")
            raise errors.AlreadyExists(f"content {content_id} is not deleted")
        return convert.to_proto(row)

    async def search(self, uow: UnitOfWork, page: PageRequest) -> content_pb2.SearchContentResponse:
        rows = await ContentRepository(uow).search(
            page.query,
            after=page.after,
            limit=page.size + 1,
        )
        size = _page_rows(rows, page.size)
        response = content_pb2.SearchContentResponse()
        for row in rows[:size]:
            result = response.results.add(rank=row["rank"], snippet=row["snippet"] or "")
            convert.to_proto(row, result.content)
        response.next_page_token = pagination.next_page_token(
            rows[: size + 1], size, page.token_query, lambda row: (row["rank"], row["id"])
        )
        return response

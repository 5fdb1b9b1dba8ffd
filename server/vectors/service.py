"""VectorService rules. Each public method is one unit of work.

Searches run on a bare driver connection (`Database.lookup()`) in one
read-only transaction whose settings (`hnsw.ef_search`,
`hnsw.iterative_scan`) are SET LOCAL, so they never outlive the search. The
hits are fetched whole (top_k is at most 1000) and the connection goes back to
the pool before the first hit is sent: a slow or vanished reader never holds
a connection.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from cachetools import LRUCache
from observatory.v1 import common_pb2, vector_pb2
from sqlalchemy.ext.asyncio import AsyncConnection

from server import bulk, errors, idempotency, pagination
from server.audit import AuditRepository
from server.auth import Principal
from server.db import Database
from server.urls import normalize_url
from server.vectors import convert
from server.vectors.repository import (
    CollectionRepository,
    CollectionSpec,
    Hits,
    ItemSearch,
    lookup_collection,
    with_vector_codecs,
)

UPSERT_BATCH_ITEMS = 5000
MAX_DELETE_IDS = 10_000
# A filter matching fewer items than this is searched exactly: every match is
# scored, so a selective filter can never starve the index scan of hits.
EXACT_FILTER_LIMIT = 10_000
# Each ranking HybridSearch fuses contributes at least this many candidates.
HYBRID_CANDIDATES = 100
DEFAULT_RRF_K = 60
DEFAULT_DUPLICATE_THRESHOLD = 0.85
SPEC_CACHE_SIZE = 10_000
# pgvector's default bound on an iterative scan, and how far we raise it.
DEFAULT_MAX_SCAN_TUPLES = 20_000
MAX_SCAN_TUPLES = 2_000_000


def _resource(spec: CollectionSpec) -> str:
    return f"vector_collections/{spec.id}"


class VectorService:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._specs: LRUCache[tuple[uuid.UUID, str], CollectionSpec] = LRUCache(SPEC_CACHE_SIZE)

    # -- collections ------------------------------------------------------------------

    async def create_collection(
        self, caller: Principal, message: vector_pb2.Collection, request_id: str
    ) -> vector_pb2.Collection:
        values = convert.collection_values(message)
        digest = idempotency.request_hash("CreateCollection", message)
        async with self._db.write() as conn:

            async def work() -> vector_pb2.Collection:
                repo = CollectionRepository(conn)
                spec = await repo.insert({**values, "owner_id": caller.user_id})
                if spec is None:
                    raise errors.AlreadyExists(f"collection {message.name!r} already exists")
                await repo.create_storage(spec)
                self._specs.pop((caller.user_id, spec.name), None)
                await AuditRepository(conn).record(
                    caller, "vectors.collection.create", _resource(spec), {"name": spec.name}
                )
                return convert.collection_to_proto(spec, 0)

            return await idempotency.once(
                conn, caller, request_id, "CreateCollection", digest, vector_pb2.Collection, work
            )

    async def get_collection(self, caller: Principal, name: str) -> vector_pb2.Collection:
        convert.check_name(name, "name")
        async with self._db.read() as conn:
            repo = CollectionRepository(conn)
            spec = await repo.get(caller.user_id, name)
            if spec is None:
                raise _not_found(name)
            counts = await repo.count_items([spec.id])
        return convert.collection_to_proto(spec, counts.get(spec.id, 0))

    async def delete_collection(self, caller: Principal, name: str) -> None:
        convert.check_name(name, "name")
        async with self._db.write() as conn:
            repo = CollectionRepository(conn)
            spec = await repo.delete(caller.user_id, name)
            self._specs.pop((caller.user_id, name), None)
            if spec is None:
                raise _not_found(name)
            await repo.drop_storage(spec)
            await AuditRepository(conn).record(
                caller, "vectors.collection.delete", _resource(spec), {"name": spec.name}
            )

    async def list_collections(
        self, caller: Principal, request: vector_pb2.ListCollectionsRequest
    ) -> vector_pb2.ListCollectionsResponse:
        size = pagination.page_size(request.page_size)
        token_query = pagination.fingerprint("ListCollections", str(caller.user_id))
        after = pagination.decode_token(request.page_token, token_query, str, uuid.UUID)
        async with self._db.read() as conn:
            repo = CollectionRepository(conn)
            rows = await repo.page(caller.user_id, after=after, limit=size + 1)
            specs = [CollectionSpec.from_row(row) for row in rows[:size]]
            counts = await repo.count_items([spec.id for spec in specs]) if specs else {}
        response = vector_pb2.ListCollectionsResponse(
            collections=[convert.collection_to_proto(s, counts.get(s.id, 0)) for s in specs]
        )
        response.next_page_token = pagination.next_page_token(
            rows, size, token_query, lambda row: (row["name"], row["id"])
        )
        return response

    # -- items ------------------------------------------------------------------------

    async def upsert_items(
        self, caller: Principal, stream: AsyncIterator[vector_pb2.UpsertItemsRequest]
    ) -> vector_pb2.UpsertItemsResponse:
        first = await anext(stream, None)
        if first is None:
            return vector_pb2.UpsertItemsResponse()
        name = convert.check_name(first.collection, "collection")
        async with self._db.write() as conn:
            # Key-share: concurrent upserts pass, DeleteCollection waits for us.
            spec = await CollectionRepository(conn).get(caller.user_id, name, lock=True)
            if spec is None:
                raise _not_found(name)
            return await _Upsert(conn, caller, spec).run(first, stream)

    async def get_item(
        self, caller: Principal, request: vector_pb2.GetItemRequest
    ) -> vector_pb2.Item:
        item_id = convert.check_item_id(request.id, "id")
        async with self._searching(caller, request.collection) as search:
            hits = Hits(with_vector=request.with_vector)
            row = await search.get(item_id, hits)
            spec = search.spec
        if row is None:
            raise errors.NotFound(f"item {item_id!r} not found in {request.collection!r}")
        item = vector_pb2.Item()
        convert.item_to_proto(row, spec, hits, item)
        return item

    async def delete_items(
        self, caller: Principal, request: vector_pb2.DeleteItemsRequest
    ) -> vector_pb2.DeleteItemsResponse:
        name = convert.check_name(request.collection, "collection")
        if not 1 <= len(request.ids) <= MAX_DELETE_IDS:
            raise errors.InvalidArgument("ids", f"must list 1 to {MAX_DELETE_IDS} item ids")
        ids = [convert.check_item_id(value, f"ids[{i}]") for i, value in enumerate(request.ids)]
        async with self._db.write() as conn:
            repo = CollectionRepository(conn)
            spec = await repo.get(caller.user_id, name, lock=True)
            if spec is None:
                raise _not_found(name)
            deleted = await repo.delete_items(spec, ids)
            await AuditRepository(conn).record(
                caller,
                "vectors.items.delete",
                _resource(spec),
                {"name": spec.name, "requested": len(ids), "deleted": deleted},
            )
        return vector_pb2.DeleteItemsResponse(deleted=deleted)

    # -- searches ---------------------------------------------------------------------

    @asynccontextmanager
    async def _searching(self, caller: Principal, name: str) -> AsyncIterator[ItemSearch]:
        """A pooled driver connection with the vector codecs, and the caller's
        collection `name` (NOT_FOUND when it is not theirs).

        Collections never change, so their rows are cached per process: a
        search then costs no lookup. A collection deleted by another process
        shows as its partition missing; the entry is then dropped and the call
        answered as the database now stands."""
        convert.check_name(name, "collection")
        key = (caller.user_id, name)
        try:
            async with self._db.lookup() as driver:
                await with_vector_codecs(driver)
                spec = self._specs.get(key)
                if spec is None:
                    spec = await lookup_collection(driver, caller.user_id, name)
                    if spec is None:
                        raise _not_found(name)
                    self._specs[key] = spec
                yield ItemSearch(driver, spec)
        except asyncpg.UndefinedTableError:
            self._specs.pop(key, None)
            async with self._db.lookup() as driver:
                if await lookup_collection(driver, caller.user_id, name) is None:
                    raise _not_found(name) from None
            raise errors.Aborted(f"collection {name!r} was re-created meanwhile; retry") from None

    async def search_similar(
        self, caller: Principal, request: vector_pb2.SearchSimilarRequest
    ) -> AsyncIterator[vector_pb2.ScoredItem]:
        top_k = convert.top_k(request.top_k)
        ef_search = convert.ef_search(request)
        threshold = convert.score_threshold(request)
        filter_json = convert.filter_json(request.filter)
        hits = Hits(with_vector=request.with_vector, with_metadata=request.with_metadata)
        async with self._searching(caller, request.collection) as search:
            vector = convert.vector_value(request.vector, search.spec, "vector")
            plan = await _plan(search, filter_json, top_k, exact=request.exact)
            async with search.transaction(
                index=not plan.exact, ef_search=ef_search, max_scan_tuples=plan.max_scan_tuples
            ):
                rows = await search.similar(vector, top_k, filter_json, exact=plan.exact, hits=hits)
            spec = search.spec
        for row in rows:
            distance = row["distance"]
            score = convert.score(spec, distance)
            if threshold is not None and score < threshold:
                break  # best first: every later hit scores lower still
            hit = vector_pb2.ScoredItem(score=score, distance=distance)
            convert.item_to_proto(row, spec, hits, hit.item)
            yield hit

    async def search_text(
        self, caller: Principal, request: vector_pb2.SearchTextRequest
    ) -> AsyncIterator[vector_pb2.ScoredItem]:
        query = _query(request.query, required=True)
        top_k = convert.top_k(request.top_k)
        filter_json = convert.filter_json(request.filter)
        async with self._searching(caller, request.collection) as search:
            hits = Hits()
            rows = await search.text(query, top_k, filter_json, hits)
            spec = search.spec
        for row in rows:
            hit = vector_pb2.ScoredItem(score=row["score"])
            convert.item_to_proto(row, spec, hits, hit.item)
            yield hit

    async def hybrid_search(
        self, caller: Principal, request: vector_pb2.HybridSearchRequest
    ) -> AsyncIterator[vector_pb2.ScoredItem]:
        query = _query(request.query, required=True)
        top_k = convert.top_k(request.top_k)
        rrf_k = request.rrf_k or DEFAULT_RRF_K
        if not 1 <= rrf_k <= 10_000:
            raise errors.InvalidArgument("rrf_k", "must be between 1 and 10000")
        filter_json = convert.filter_json(request.filter)
        hits = Hits()
        async with self._searching(caller, request.collection) as search:
            vector = convert.vector_value(request.vector, search.spec, "vector")
            candidates = max(top_k, HYBRID_CANDIDATES)
            plan = await _plan(search, filter_json, candidates, exact=False)
            async with search.transaction(
                index=not plan.exact, max_scan_tuples=plan.max_scan_tuples
            ):
                rows = await search.hybrid(
                    vector,
                    query,
                    top_k,
                    candidates,
                    rrf_k,
                    filter_json,
                    exact=plan.exact,
                    hits=hits,
                )
            spec = search.spec
        for row in rows:
            hit = vector_pb2.ScoredItem(score=row["score"], distance=row["distance"])
            convert.item_to_proto(row, spec, hits, hit.item)
            yield hit

    async def check_duplicate(
        self, caller: Principal, request: vector_pb2.CheckDuplicateRequest
    ) -> vector_pb2.CheckDuplicateResponse:
        if "\x00" in request.url:
            raise errors.InvalidArgument("url", "must not contain NUL characters")
        url = normalize_url(request.url)
        threshold = (
            request.threshold if request.HasField("threshold") else DEFAULT_DUPLICATE_THRESHOLD
        )
        if not -1.0 <= threshold <= 1.0:
            raise errors.InvalidArgument("threshold", "must be between -1 and 1")
        if url is None and not request.vector:
            raise errors.InvalidArgument("vector", "give a vector, a url, or both")
        async with self._searching(caller, request.collection) as search:
            vector = (
                convert.vector_value(request.vector, search.spec, "vector")
                if request.vector
                else None
            )
            if url is not None:
                match = await search.by_url(url)
                if match is not None:
                    return vector_pb2.CheckDuplicateResponse(
                        is_duplicate=True,
                        kind=common_pb2.DUPLICATE_KIND_URL,
                        match_id=match,
                        score=1.0,
                    )
            nearest = None if vector is None else await search.nearest_by_cosine(vector)
        if nearest is None:
            return vector_pb2.CheckDuplicateResponse()
        similarity = 1.0 - nearest["distance"]
        duplicate = similarity >= threshold
        return vector_pb2.CheckDuplicateResponse(
            is_duplicate=duplicate,
            kind=(
                common_pb2.DUPLICATE_KIND_SEMANTIC
                if duplicate
                else common_pb2.DUPLICATE_KIND_UNSPECIFIED
            ),
            match_id=nearest["id"],
            score=similarity,
        )


def _not_found(name: str) -> errors.NotFound:
    return errors.NotFound(f"collection {name!r} not found")


@dataclass(frozen=True, slots=True)
class _ScanPlan:
    exact: bool
    max_scan_tuples: int | None = None


async def _plan(
    search: ItemSearch, filter_json: str | None, wanted: int, *, exact: bool
) -> _ScanPlan:
    """Exact when asked, or when the filter is so selective that scoring every
    match beats walking the graph (and cannot miss). Otherwise an iterative
    index scan, allowed to visit enough tuples to meet `wanted` matches twice
    over at the filter's selectivity."""
    if exact:
        return _ScanPlan(exact=True)
    if filter_json is None:
        return _ScanPlan(exact=False)
    matches, total = await search.count_matching(filter_json, EXACT_FILTER_LIMIT)
    if matches < EXACT_FILTER_LIMIT:
        return _ScanPlan(exact=True)
    needed = math.ceil(2 * wanted * max(total, matches) / matches)
    return _ScanPlan(
        exact=False,
        max_scan_tuples=max(DEFAULT_MAX_SCAN_TUPLES, min(needed, MAX_SCAN_TUPLES)),
    )


def _query(value: str, *, required: bool) -> str:
    if "\x00" in value:
        raise errors.InvalidArgument("query", "must not contain NUL characters")
    if required and not value.strip():
        raise errors.InvalidArgument("query", "is required")
    return value


class _Upsert:
    """One UpsertItems stream: validate each item, COPY good ones in batches,
    move each batch into the collection with one upsert, report bad items by
    their index in the whole stream."""

    def __init__(self, conn: AsyncConnection, caller: Principal, spec: CollectionSpec) -> None:
        self._conn = conn
        self._caller = caller
        self._spec = spec
        self._repo = CollectionRepository(conn)
        self._errors = bulk.ItemErrors()
        self._received = 0
        self._valid = 0

    def _absorb(self, message: vector_pb2.UpsertItemsRequest, batch: list[tuple[Any, ...]]) -> None:
        for item in message.items:
            index = self._received
            self._received += 1
            try:
                record = convert.item_record(item, self._spec)
            except errors.InvalidArgument as error:
                self._errors.add(index, error.field, error.field_violations[0][1])
                continue
            self._valid += 1
            batch.append((index, *record))

    async def _flush(self, batch: list[tuple[Any, ...]]) -> None:
        await self._repo.stage(batch)
        repeated = len({record[1] for record in batch}) < len(batch)
        await bulk.move_in_halves(
            self._conn,
            lambda first, last: self._repo.move_staged(
                self._spec, first, last, repeated_ids=repeated
            ),
            batch[0][0],
            batch[-1][0],
            self._errors,
        )
        await self._repo.clear_staging()

    async def run(
        self,
        first: vector_pb2.UpsertItemsRequest,
        rest: AsyncIterator[vector_pb2.UpsertItemsRequest],
    ) -> vector_pb2.UpsertItemsResponse:
        await self._repo.create_staging()
        batch: list[tuple[Any, ...]] = []
        self._absorb(first, batch)
        async for message in rest:
            self._absorb(message, batch)
            if len(batch) >= UPSERT_BATCH_ITEMS:
                await self._flush(batch)
                batch = []
        if batch:
            await self._flush(batch)
        upserted = self._valid - self._errors.refused
        await AuditRepository(self._conn).record(
            self._caller,
            "vectors.items.upsert",
            _resource(self._spec),
            {
                "name": self._spec.name,
                "received": self._received,
                "upserted": upserted,
                "errors": self._errors.count,
            },
        )
        response = vector_pb2.UpsertItemsResponse(
            upserted=upserted, received=self._received, error_count=self._errors.count
        )
        response.errors.extend(self._errors.messages())
        return response

"""VectorService rules, applied inside the unit of work the servicer opened.

Searches run on a read unit: one statement each, no BEGIN/COMMIT, with the
hnsw settings they need kept on the pooled connection (see
repository.index_search_settings). Their hits are fetched whole (top_k is at
most 1000), so the connection goes back to the pool before the first hit is
sent: a slow or vanished reader never holds one.

Collections never change once made, so their rows are cached per process: a
search then costs no look-up. A collection deleted by another process shows
as its partition missing; the entry is then dropped and the call answered as
the database now stands.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import asyncpg
from cachetools import TTLCache
from observatory.v1 import common_pb2, vector_pb2

from server import deadlines, errors, idempotency, pagination, validate
from server.audit import AuditRepository
from server.auth import Principal
from server.coalesce import Batches, PointReads
from server.db import classify_database_error
from server.uow import Database, UnitOfWork
from server.urls import normalize_url
from server.vectors import convert, filters
from server.vectors.filters import Params
from server.vectors.repository import (
    CollectionRepository,
    CollectionSpec,
    Hits,
    Settings,
    SimilarSearch,
    collections_by_key,
    item_search,
    items_by_key,
    shared_shape,
)

MAX_DELETE_IDS = 10_000
# Each ranking HybridSearch fuses contributes at least this many candidates.
HYBRID_CANDIDATES = 100
DEFAULT_RRF_K = 60
DEFAULT_DUPLICATE_THRESHOLD = 0.85
SPEC_CACHE_SIZE = 10_000
# A collection's row changes only when CreateMetadataIndex adds an index: other
# processes see the index this long after (searches answer the same meanwhile,
# only without it).
SPEC_CACHE_SECONDS = 30.0
# Collection DDL waits at most repository.DDL_LOCK_TIMEOUT for its lock per
# attempt, then gives way and tries again after a backoff (doubled each time).
DDL_ATTEMPTS = 5
DDL_FIRST_BACKOFF_S = 0.2
# Errors a partition of a collection deleted (or an index function dropped) by
# another process shows as.
_VANISHED = (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError)
_ITEM_HITS = Hits(with_vector=False, with_metadata=True)
_ITEM_HITS_WITH_VECTOR = Hits(with_vector=True, with_metadata=True)
# Searches that can share a statement: of one collection, SQL and hnsw settings.
Shape = tuple[CollectionSpec, str, Settings]
# A shape's searches share statements of at most this many searches, with at
# most this many of its statements running at once: an index search costs the
# database far more than a point read, so a shape keeps a few connections
# (and the database's cores) busy rather than queueing behind one statement.
SEARCHES_PER_STATEMENT = 16
SEARCH_STATEMENTS_IN_FLIGHT = 4


def _resource(spec: CollectionSpec) -> str:
    return f"vector_collections/{spec.id}"


def _not_found(name: str) -> errors.NotFound:
    return errors.NotFound(f"collection {errors.quote(name)} not found")


async def retry_ddl(uow: UnitOfWork, ddl: Callable[[], Awaitable[None]]) -> None:
    """Runs `ddl` (which takes locks on vector_items) in a savepoint, again
    after a backoff while its lock wait times out, within the call's deadline;
    then ABORTED. Between attempts nothing waits in the lock queue, so other
    collections' statements pass."""
    delay = DDL_FIRST_BACKOFF_S
    for attempt in range(1, DDL_ATTEMPTS + 1):
        try:
            async with uow.savepoint():
                await ddl()
            return
        except Exception as exc:
            if not isinstance(classify_database_error(exc), errors.Aborted):
                raise
        pause = delay * (0.5 + random.random())  # noqa: S311
        left = deadlines.remaining()
        if attempt == DDL_ATTEMPTS or (left is not None and left < pause + 0.5):
            break
        await asyncio.sleep(pause)
        delay *= 2
    raise errors.Aborted("the collection's table is busy; retry")


class VectorService:
    def __init__(self, units: Database) -> None:
        self._specs: TTLCache[tuple[uuid.UUID, str], CollectionSpec] = TTLCache(
            SPEC_CACHE_SIZE, SPEC_CACHE_SECONDS
        )
        # GetItem's reads, coalesced across callers: the collection by (owner,
        # name) when it is not cached, then the item by (collection, id).
        self._collections: PointReads[tuple[uuid.UUID, str]] = PointReads(
            units, collections_by_key, lambda row: (row["owner_id"], row["name"])
        )
        self._items: PointReads[tuple[uuid.UUID, str]] = PointReads(
            units, items_by_key, lambda row: (row["collection_id"], row["id"])
        )
        # Similarity searches, coalesced across callers by shape: the searches
        # that arrive while one of their collection, SQL and settings is in
        # flight run together as one LATERAL statement.
        self._units = units
        self._searches: Batches[Shape, Params, list[asyncpg.Record]] = Batches(
            self._run_searches, SEARCHES_PER_STATEMENT, SEARCH_STATEMENTS_IN_FLIGHT
        )

    # -- collections ------------------------------------------------------------------

    async def create_collection(
        self, uow: UnitOfWork, caller: Principal, message: vector_pb2.Collection, request_id: str
    ) -> vector_pb2.Collection:
        values = convert.collection_values(message)
        digest = idempotency.request_hash("CreateCollection", message)

        async def work() -> vector_pb2.Collection:
            repo = CollectionRepository(uow)
            spec = await repo.insert({**values, "owner_id": caller.user_id})
            if spec is None:
                raise errors.AlreadyExists(
                    f"collection {errors.quote(message.name)} already exists"
                )
            await retry_ddl(uow, lambda: repo.create_storage(spec))
            self._specs.pop((caller.user_id, spec.name), None)
            await AuditRepository(uow.conn).record(
                caller, "vectors.collection.create", _resource(spec), {"name": spec.name}
            )
            return convert.collection_to_proto(spec, 0)

        return await idempotency.once(
            uow.conn, caller, request_id, "CreateCollection", digest, vector_pb2.Collection, work
        )

    async def get_collection(
        self, uow: UnitOfWork, caller: Principal, name: str
    ) -> vector_pb2.Collection:
        """The collection's row never changes, so with it cached (or looked
        up), its one mutable figure, the item count, is one statement."""
        spec = await self._spec(uow, caller, name, field="name")
        repo = CollectionRepository(uow)
        try:
            count = await repo.count_items(spec)
        except asyncpg.UndefinedTableError:
            # Deleted by another process, and maybe made anew: as it is now.
            self._specs.pop((caller.user_id, name), None)
            spec = await self._spec(uow, caller, name, field="name")
            count = await repo.count_items(spec)
        return convert.collection_to_proto(spec, count)

    async def delete_collection(self, uow: UnitOfWork, caller: Principal, name: str) -> None:
        convert.check_name(name, "name")
        repo = CollectionRepository(uow)
        spec = await repo.delete(caller.user_id, name)
        self._specs.pop((caller.user_id, name), None)
        if spec is None:
            raise _not_found(name)
        await retry_ddl(uow, lambda: repo.drop_storage(spec))
        await AuditRepository(uow.conn).record(
            caller, "vectors.collection.delete", _resource(spec), {"name": spec.name}
        )

    async def list_collections(
        self, uow: UnitOfWork, caller: Principal, request: vector_pb2.ListCollectionsRequest
    ) -> vector_pb2.ListCollectionsResponse:
        """A page and its item counts: two statements, on one snapshot."""
        size = pagination.page_size(request.page_size)
        token_query = pagination.fingerprint("ListCollections", str(caller.user_id))
        after = pagination.decode_token(request.page_token, token_query, str, uuid.UUID)
        repo = CollectionRepository(uow)
        page = await repo.page(caller.user_id, after=after, limit=size + 1)
        counts = await repo.count_items_of(page[:size]) if page else {}
        response = vector_pb2.ListCollectionsResponse(
            collections=[
                convert.collection_to_proto(spec, counts.get(spec.id, 0)) for spec in page[:size]
            ]
        )
        response.next_page_token = pagination.next_page_token(
            page, size, token_query, lambda spec: (spec.name, spec.id)
        )
        return response

    # -- items ------------------------------------------------------------------------

    async def upsert_target(self, uow: UnitOfWork, caller: Principal, name: str) -> CollectionSpec:
        """The collection an UpsertItems stream writes into, as the database has
        it now (not cached: the items are checked against it, and each batch
        then holds it locked and checks it is still the same collection; see
        server.vectors.upsert)."""
        convert.check_name(name, "collection")
        spec = await CollectionRepository(uow).find(caller.user_id, name)
        if spec is None:
            raise _not_found(name)
        return spec

    async def get_item(
        self, caller: Principal, request: vector_pb2.GetItemRequest
    ) -> vector_pb2.Item:
        """Through coalesced point reads: no unit of its own. The collection is
        the caller's (looked up by owner and name), so its items are too."""
        name = convert.check_name(request.collection, "collection")
        item_id = convert.check_item_id(request.id, "id")
        key = (caller.user_id, name)
        cached = self._specs.get(key)
        spec = cached or await self._look_up(key)
        row = await self._items.get((spec.id, item_id))
        if row is None and cached is not None:
            # Another process may have deleted or re-created the collection.
            self._specs.pop(key, None)
            spec = await self._look_up(key)
            if spec.id != cached.id:
                row = await self._items.get((spec.id, item_id))
        if row is None:
            raise errors.NotFound(f"item {errors.quote(item_id)} not found in {errors.quote(name)}")
        item = vector_pb2.Item()
        hits = _ITEM_HITS_WITH_VECTOR if request.with_vector else _ITEM_HITS
        convert.item_to_proto(row, spec, hits, item)
        return item

    async def _look_up(self, key: tuple[uuid.UUID, str]) -> CollectionSpec:
        row = await self._collections.get(key)
        if row is None:
            raise _not_found(key[1])
        spec = self._specs[key] = CollectionSpec.from_row(row)
        return spec

    async def delete_items(
        self, uow: UnitOfWork, caller: Principal, request: vector_pb2.DeleteItemsRequest
    ) -> vector_pb2.DeleteItemsResponse:
        name = convert.check_name(request.collection, "collection")
        if not 1 <= len(request.ids) <= MAX_DELETE_IDS:
            raise errors.InvalidArgument("ids", f"must list 1 to {MAX_DELETE_IDS} item ids")
        ids = [convert.check_item_id(value, f"ids[{i}]") for i, value in enumerate(request.ids)]
        repo = CollectionRepository(uow)
        spec = await repo.lock(caller.user_id, name)
        if spec is None:
            raise _not_found(name)
        deleted = await repo.delete_items(spec, ids)
        await AuditRepository(uow.conn).record(
            caller,
            "vectors.items.delete",
            _resource(spec),
            {"name": spec.name, "requested": len(ids), "deleted": deleted},
        )
        return vector_pb2.DeleteItemsResponse(deleted=deleted)

    # -- searches ---------------------------------------------------------------------

    async def _spec(
        self, uow: UnitOfWork, caller: Principal, name: str, *, field: str = "collection"
    ) -> CollectionSpec:
        """The caller's collection `name` (NOT_FOUND when it is not theirs),
        from the cache or looked up on `uow`."""
        convert.check_name(name, field)
        key = (caller.user_id, name)
        spec = self._specs.get(key)
        if spec is None:
            spec = await CollectionRepository(uow).find(caller.user_id, name)
            if spec is None:
                raise _not_found(name)
            self._specs[key] = spec
        return spec

    async def _vanished(self, caller: Principal, name: str) -> Exception:
        """The error for a search whose cached collection's partition is gone
        (another process deleted the collection, and maybe made it anew),
        looked up on a connection of its own (the search's unit may be
        unusable after the error)."""
        key = (caller.user_id, name)
        self._specs.pop(key, None)
        if await self._collections.get(key) is None:
            return _not_found(name)
        return errors.Aborted(f"collection {errors.quote(name)} was re-created meanwhile; retry")

    async def search_similar(
        self, caller: Principal, request: vector_pb2.SearchSimilarRequest
    ) -> list[vector_pb2.ScoredItem]:
        similar = convert.similar(request)
        spec = await self._cached_spec(caller, request.collection)
        search = replace(
            similar.search, vector=convert.vector_value(similar.vector, spec, "vector")
        )
        [rows] = await self._similar(caller, spec, [search])
        return convert.scored_items(rows, spec, search.hits, similar.threshold)

    async def search_similar_batch(
        self, caller: Principal, request: vector_pb2.SearchSimilarBatchRequest
    ) -> vector_pb2.SearchSimilarBatchResponse:
        """Every search as SearchSimilar would answer it, in as few statements
        as their shapes and settings allow."""
        if not 1 <= len(request.searches) <= convert.MAX_SEARCHES:
            raise errors.InvalidArgument(
                "searches", f"must hold 1 to {convert.MAX_SEARCHES} searches"
            )
        checked = [
            convert.similar(query, f"searches[{i}].") for i, query in enumerate(request.searches)
        ]
        spec = await self._cached_spec(caller, request.collection)
        searches = [
            replace(
                one.search,
                vector=convert.vector_value(one.vector, spec, f"searches[{i}].vector"),
            )
            for i, one in enumerate(checked)
        ]
        results = await self._similar(caller, spec, searches)
        response = vector_pb2.SearchSimilarBatchResponse()
        for rows, one, search in zip(results, checked, searches, strict=True):
            response.results.add().hits.extend(
                convert.scored_items(rows, spec, search.hits, one.threshold)
            )
        return response

    async def _similar(
        self, caller: Principal, spec: CollectionSpec, searches: list[SimilarSearch]
    ) -> list[list[asyncpg.Record]]:
        """The hits of each search. Those of a shared shape go through the
        coalesced batches (units of their own, see _run_searches); the others
        (grouped searches) run on a read unit of their own."""
        results: list[list[asyncpg.Record]] = [[] for _ in searches]
        shapes: dict[Shape, list[tuple[int, Params]]] = {}
        alone: list[int] = []
        for i, search in enumerate(searches):
            shape = shared_shape(spec, search)
            if shape is None:
                alone.append(i)
            else:
                sql, settings, params = shape
                shapes.setdefault((spec, sql, settings), []).append((i, params))
        try:
            for key, members in shapes.items():
                answered = await self._searches.submit(key, [params for _, params in members])
                for (i, _), rows in zip(members, answered, strict=True):
                    results[i] = rows
            if alone:
                async with self._units.read() as uow:
                    reads = await item_search(uow, spec)
                    for i in alone:
                        results[i] = await reads.similar(searches[i])
        except _VANISHED:
            raise await self._vanished(caller, spec.name) from None
        return results

    async def _run_searches(
        self, shape: Shape, searches: Sequence[Params]
    ) -> list[list[asyncpg.Record]]:
        spec, sql, settings = shape
        async with self._units.driver_read() as uow:
            reads = await item_search(uow, spec)
            return await reads.similar_shaped(sql, settings, searches)

    async def _cached_spec(self, caller: Principal, name: str) -> CollectionSpec:
        """The caller's collection `name`, cached or looked up through the
        coalesced reads (NOT_FOUND when it is not theirs)."""
        convert.check_name(name, "collection")
        key = (caller.user_id, name)
        return self._specs.get(key) or await self._look_up(key)

    async def search_text(
        self, uow: UnitOfWork, caller: Principal, request: vector_pb2.SearchTextRequest
    ) -> list[vector_pb2.ScoredItem]:
        query = _query(request.query, required=True)
        top_k = convert.top_k(request.top_k)
        filter_json = convert.filter_json(request.filter)
        where = filters.parse(request.where)
        hits = Hits()
        spec = await self._spec(uow, caller, request.collection)
        search = await item_search(uow, spec)
        try:
            rows = await search.text(query, top_k, filter_json, hits, where)
        except _VANISHED:
            raise await self._vanished(caller, request.collection) from None
        return convert.scored_items(rows, spec, hits)

    async def hybrid_search(
        self, uow: UnitOfWork, caller: Principal, request: vector_pb2.HybridSearchRequest
    ) -> list[vector_pb2.ScoredItem]:
        query = _query(request.query, required=True)
        top_k = convert.top_k(request.top_k)
        rrf_k = request.rrf_k or DEFAULT_RRF_K
        if not 1 <= rrf_k <= 10_000:
            raise errors.InvalidArgument("rrf_k", "must be between 1 and 10000")
        filter_json = convert.filter_json(request.filter)
        where = filters.parse(request.where)
        hits = Hits()
        spec = await self._spec(uow, caller, request.collection)
        vector = convert.vector_value(request.vector, spec, "vector")
        search = await item_search(uow, spec)
        candidates = max(top_k, HYBRID_CANDIDATES)
        try:
            rows = await search.hybrid(
                vector, query, top_k, candidates, rrf_k, filter_json, hits, where
            )
        except _VANISHED:
            raise await self._vanished(caller, request.collection) from None
        return convert.scored_items(rows, spec, hits)

    # -- scrolling, counting, metadata indexes ------------------------------------------

    async def list_items(
        self, uow: UnitOfWork, caller: Principal, request: vector_pb2.ListItemsRequest
    ) -> vector_pb2.ListItemsResponse:
        """A keyset page by id: one statement. A page ends early once its items
        hold PAGE_BYTES (a page of large vectors would pass what clients take)."""
        size = pagination.page_size(request.page_size)
        where = filters.parse(request.where)
        spec = await self._spec(uow, caller, request.collection)
        token_query = pagination.fingerprint(
            "ListItems", str(caller.user_id), request.collection, request.where
        )
        after = pagination.decode_token(request.page_token, token_query, str)
        hits = _ITEM_HITS_WITH_VECTOR if request.with_vector else _ITEM_HITS
        search = await item_search(uow, spec)
        try:
            rows = await search.page(where, None if after is None else after[0], size + 1, hits)
        except _VANISHED:
            raise await self._vanished(caller, request.collection) from None
        count = _page_rows(rows, size)
        response = vector_pb2.ListItemsResponse()
        for row in rows[:count]:
            convert.item_to_proto(row, spec, hits, response.items.add())
        response.next_page_token = pagination.next_page_token(
            rows[: count + 1], count, token_query, lambda row: (row["id"],)
        )
        return response

    async def count_items(
        self, uow: UnitOfWork, caller: Principal, request: vector_pb2.CountItemsRequest
    ) -> vector_pb2.CountItemsResponse:
        where = filters.parse(request.where)
        spec = await self._spec(uow, caller, request.collection)
        search = await item_search(uow, spec)
        try:
            count = await search.count(where)
        except _VANISHED:
            raise await self._vanished(caller, request.collection) from None
        return vector_pb2.CountItemsResponse(count=count)

    async def create_metadata_index(
        self, uow: UnitOfWork, caller: Principal, request: vector_pb2.CreateMetadataIndexRequest
    ) -> vector_pb2.Collection:
        """Records the index on the collection's row and builds it on the
        collection's partition, in one transaction; a second call for the same
        key and type finds it recorded and changes nothing."""
        name = convert.check_name(request.collection, "collection")
        filters.key_path(request.key, "key")
        kind = filters.INDEX_TYPES.get(request.type)
        if kind is None:
            raise errors.InvalidArgument(
                "type",
                "must be METADATA_INDEX_TYPE_KEYWORD, METADATA_INDEX_TYPE_NUMBER or "
                "METADATA_INDEX_TYPE_TIME",
            )
        repo = CollectionRepository(uow)
        added = await repo.add_metadata_index(caller.user_id, name, request.key, kind)
        if added is None:
            raise _not_found(name)
        spec, created = added
        self._specs.pop((caller.user_id, name), None)
        if created:
            await repo.create_metadata_index(spec, request.key, kind)
            await AuditRepository(uow.conn).record(
                caller,
                "vectors.metadata_index.create",
                _resource(spec),
                {"name": spec.name, "key": request.key, "type": kind},
            )
        return convert.collection_to_proto(spec, await repo.count_items(spec))

    async def check_duplicate(
        self, uow: UnitOfWork, caller: Principal, request: vector_pb2.CheckDuplicateRequest
    ) -> vector_pb2.CheckDuplicateResponse:
        validate.text(request.url, "url", max_bytes=validate.MAX_KEY_BYTES)
        url = normalize_url(request.url)
        threshold = (
            request.threshold if request.HasField("threshold") else DEFAULT_DUPLICATE_THRESHOLD
        )
        if not -1.0 <= threshold <= 1.0:
            raise errors.InvalidArgument("threshold", "must be between -1 and 1")
        if url is None and not request.vector:
            raise errors.InvalidArgument("vector", "give a vector, a url, or both")
        spec = await self._spec(uow, caller, request.collection)
        vector = convert.vector_value(request.vector, spec, "vector") if request.vector else None
        search = await item_search(uow, spec)
        try:
            match = None if url is None else await search.by_url(url)
            if match is not None:
                return vector_pb2.CheckDuplicateResponse(
                    is_duplicate=True, kind=common_pb2.DUPLICATE_KIND_URL, match_id=match, score=1.0
                )
            nearest = None if vector is None else await search.nearest_by_cosine(vector)
        except _VANISHED:
            raise await self._vanished(caller, request.collection) from None
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


# A page of ListItems ends early once its items hold this many bytes (clients
# receive 4 MiB by default).
PAGE_BYTES = 2_000_000


def _page_rows(rows: list[asyncpg.Record], size: int) -> int:
    """How many of `rows` (fetched with a limit of `size` + 1) a page holds: up
    to `size`, fewer when they pass PAGE_BYTES (never none)."""
    total = 0
    for i, row in enumerate(rows[:size]):
        total += row["page_bytes"]
        if total > PAGE_BYTES and i:
            return i
    return min(len(rows), size)


def _query(value: str, *, required: bool) -> str:
    validate.text(value, "query", max_chars=validate.MAX_QUERY_CHARS)
    if required and not value.strip():
        raise errors.InvalidArgument("query", "is required")
    return value

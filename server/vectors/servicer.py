"""VectorService over gRPC: proto in, one unit of work, service call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
from google.protobuf import empty_pb2
from observatory.v1 import vector_pb2, vector_pb2_grpc

from server import bulk
from server.auth import principal
from server.limits import Limits
from server.ops import metrics
from server.uow import Database
from server.vectors import wire
from server.vectors.service import VectorService
from server.vectors.upsert import Upsert

Context = grpc.aio.ServicerContext[Any, Any]


class VectorServicer(vector_pb2_grpc.VectorServiceServicer):
    def __init__(self, service: VectorService, units: Database, limits: Limits) -> None:
        self._service = service
        self._db = units
        self._limits = limits

    async def CreateCollection(
        self, request: vector_pb2.CreateCollectionRequest, context: Context
    ) -> vector_pb2.Collection:
        async with self._db.write() as uow:
            return await self._service.create_collection(
                uow, principal(), request.collection, request.request_id
            )

    async def GetCollection(
        self, request: vector_pb2.GetCollectionRequest, context: Context
    ) -> vector_pb2.Collection:
        async with self._db.read() as uow:
            return await self._service.get_collection(uow, principal(), request.name)

    async def DeleteCollection(
        self, request: vector_pb2.DeleteCollectionRequest, context: Context
    ) -> empty_pb2.Empty:
        async with self._db.write() as uow:
            await self._service.delete_collection(uow, principal(), request.name)
        return empty_pb2.Empty()

    async def ListCollections(
        self, request: vector_pb2.ListCollectionsRequest, context: Context
    ) -> vector_pb2.ListCollectionsResponse:
        async with self._db.snapshot() as uow:
            return await self._service.list_collections(uow, principal(), request)

    async def UpsertItems(
        self, request_iterator: AsyncIterator[vector_pb2.UpsertItemsRequest], context: Context
    ) -> vector_pb2.UpsertItemsResponse:
        caller = principal()
        # Decoded by wire.decode_upsert_items (the interceptor's decoder for
        # this method): each item's vector as its float32 bytes.
        requests = cast(AsyncIterator[wire.WireRequest], request_iterator)
        first = await anext(requests, None)
        if first is None:
            return vector_pb2.UpsertItemsResponse()
        # On the primary (a replica may not have the collection yet): one
        # statement, so an autocommit unit.
        async with self._db.autocommit() as uow:
            spec = await self._service.upsert_target(uow, caller, first.collection)
        # No unit for the stream: each batch is written in a unit of its own
        # (server.vectors.upsert), so no connection waits on the client.
        rest = bulk.whole_stream(requests, context)
        return await Upsert(self._db, self._limits.bulk, caller, spec).run(first, rest)

    async def GetItem(
        self, request: vector_pb2.GetItemRequest, context: Context
    ) -> vector_pb2.Item:
        # Coalesced point reads: they take their units themselves.
        return await self._service.get_item(principal(), request)

    async def DeleteItems(
        self, request: vector_pb2.DeleteItemsRequest, context: Context
    ) -> vector_pb2.DeleteItemsResponse:
        async with self._db.write() as uow:
            return await self._service.delete_items(uow, principal(), request)

    # Searches fetch their hits whole on a read unit and stream them after it
    # has given its connection back. Similarity searches are coalesced across
    # callers (like GetItem's reads): they take their units themselves.

    async def SearchSimilar(
        self, request: vector_pb2.SearchSimilarRequest, context: Context
    ) -> AsyncIterator[vector_pb2.ScoredItem]:
        hits = await self._service.search_similar(principal(), request)
        metrics.SEARCHES_SIMILAR.inc()
        for hit in hits:
            yield hit

    async def SearchText(
        self, request: vector_pb2.SearchTextRequest, context: Context
    ) -> AsyncIterator[vector_pb2.ScoredItem]:
        async with self._db.read() as uow:
            hits = await self._service.search_text(uow, principal(), request)
        metrics.SEARCHES_TEXT.inc()
        for hit in hits:
            yield hit

    async def HybridSearch(
        self, request: vector_pb2.HybridSearchRequest, context: Context
    ) -> AsyncIterator[vector_pb2.ScoredItem]:
        async with self._db.read() as uow:
            hits = await self._service.hybrid_search(uow, principal(), request)
        metrics.SEARCHES_HYBRID.inc()
        for hit in hits:
            yield hit

    async def CheckDuplicate(
        self, request: vector_pb2.CheckDuplicateRequest, context: Context
    ) -> vector_pb2.CheckDuplicateResponse:
        async with self._db.read() as uow:
            return await self._service.check_duplicate(uow, principal(), request)

    async def SearchSimilarBatch(
        self, request: vector_pb2.SearchSimilarBatchRequest, context: Context
    ) -> vector_pb2.SearchSimilarBatchResponse:
        response = await self._service.search_similar_batch(principal(), request)
        metrics.SEARCHES_SIMILAR.inc(len(request.searches))
        return response

    async def ListItems(
        self, request: vector_pb2.ListItemsRequest, context: Context
    ) -> vector_pb2.ListItemsResponse:
        async with self._db.read() as uow:
            return await self._service.list_items(uow, principal(), request)

    async def CountItems(
        self, request: vector_pb2.CountItemsRequest, context: Context
    ) -> vector_pb2.CountItemsResponse:
        async with self._db.read() as uow:
            return await self._service.count_items(uow, principal(), request)

    async def CreateMetadataIndex(
        self, request: vector_pb2.CreateMetadataIndexRequest, context: Context
    ) -> vector_pb2.Collection:
        async with self._db.write() as uow:
            return await self._service.create_metadata_index(uow, principal(), request)

"""VectorService over gRPC: proto in, service call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import empty_pb2
from observatory.v1 import vector_pb2, vector_pb2_grpc

from server.auth import principal
from server.vectors.service import VectorService

Context = grpc.aio.ServicerContext[Any, Any]


class VectorServicer(vector_pb2_grpc.VectorServiceServicer):
    def __init__(self, service: VectorService) -> None:
        self._service = service

    async def CreateCollection(
        self, request: vector_pb2.CreateCollectionRequest, context: Context
    ) -> vector_pb2.Collection:
        return await self._service.create_collection(
            principal(), request.collection, request.request_id
        )

    async def GetCollection(
        self, request: vector_pb2.GetCollectionRequest, context: Context
    ) -> vector_pb2.Collection:
        return await self._service.get_collection(principal(), request.name)

    async def DeleteCollection(
        self, request: vector_pb2.DeleteCollectionRequest, context: Context
    ) -> empty_pb2.Empty:
        await self._service.delete_collection(principal(), request.name)
        return empty_pb2.Empty()

    async def ListCollections(
        self, request: vector_pb2.ListCollectionsRequest, context: Context
    ) -> vector_pb2.ListCollectionsResponse:
        return await self._service.list_collections(principal(), request)

    async def UpsertItems(
        self, request_iterator: AsyncIterator[vector_pb2.UpsertItemsRequest], context: Context
    ) -> vector_pb2.UpsertItemsResponse:
        return await self._service.upsert_items(principal(), request_iterator)

    async def GetItem(
        self, request: vector_pb2.GetItemRequest, context: Context
    ) -> vector_pb2.Item:
        return await self._service.get_item(principal(), request)

    async def DeleteItems(
        self, request: vector_pb2.DeleteItemsRequest, context: Context
    ) -> vector_pb2.DeleteItemsResponse:
        return await self._service.delete_items(principal(), request)

    async def SearchSimilar(
        self, request: vector_pb2.SearchSimilarRequest, context: Context
    ) -> AsyncIterator[vector_pb2.ScoredItem]:
        async for hit in self._service.search_similar(principal(), request):
            yield hit

    async def SearchText(
        self, request: vector_pb2.SearchTextRequest, context: Context
    ) -> AsyncIterator[vector_pb2.ScoredItem]:
        async for hit in self._service.search_text(principal(), request):
            yield hit

    async def HybridSearch(
        self, request: vector_pb2.HybridSearchRequest, context: Context
    ) -> AsyncIterator[vector_pb2.ScoredItem]:
        async for hit in self._service.hybrid_search(principal(), request):
            yield hit

    async def CheckDuplicate(
        self, request: vector_pb2.CheckDuplicateRequest, context: Context
    ) -> vector_pb2.CheckDuplicateResponse:
        return await self._service.check_duplicate(principal(), request)

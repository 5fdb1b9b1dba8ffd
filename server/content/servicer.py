"""ContentService over gRPC: proto in, service call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from server.auth import principal
from server.content.duplicates import DuplicateService
from server.content.export import Export, check_format, export_fields
from server.content.service import ContentService, content_query
from server.content.stats import StatsService
from server.db import Database
from server.protoconv import parse_uuid

Context = grpc.aio.ServicerContext[Any, Any]


class ContentServicer(content_pb2_grpc.ContentServiceServicer):
    def __init__(self, service: ContentService, db: Database) -> None:
        self._service = service
        self._db = db
        self._duplicates = DuplicateService(db)
        self._stats = StatsService(db)

    async def CreateContent(
        self, request: content_pb2.CreateContentRequest, context: Context
    ) -> content_pb2.Content:
        return await self._service.create(principal(), request.content, request.request_id)

    async def GetContent(
        self, request: content_pb2.GetContentRequest, context: Context
    ) -> content_pb2.Content:
        return await self._service.get(principal(), parse_uuid(request.id, "id"))

    async def ListContent(
        self, request: content_pb2.ListContentRequest, context: Context
    ) -> content_pb2.ListContentResponse:
        return await self._service.list(principal(), request)

    async def UpdateContent(
        self, request: content_pb2.UpdateContentRequest, context: Context
    ) -> content_pb2.Content:
        return await self._service.update(principal(), request.content, request.update_mask)

    async def DeleteContent(
        self, request: content_pb2.DeleteContentRequest, context: Context
    ) -> content_pb2.Content:
        return await self._service.set_deleted(
            principal(), parse_uuid(request.id, "id"), deleted=True
        )

    async def UndeleteContent(
        self, request: content_pb2.UndeleteContentRequest, context: Context
    ) -> content_pb2.Content:
        return await self._service.set_deleted(
            principal(), parse_uuid(request.id, "id"), deleted=False
        )

    async def SearchContent(
        self, request: content_pb2.SearchContentRequest, context: Context
    ) -> content_pb2.SearchContentResponse:
        return await self._service.search(principal(), request)

    async def IngestContent(
        self, request_iterator: AsyncIterator[content_pb2.IngestContentRequest], context: Context
    ) -> content_pb2.IngestContentResponse:
        return await self._service.ingest(principal(), request_iterator)

    async def ExportContent(
        self, request: content_pb2.ExportContentRequest, context: Context
    ) -> AsyncIterator[content_pb2.ExportChunk]:
        export = Export(
            self._db,
            content_query(principal(), request.filter),
            export_fields(request.columns, request.include_metadata),
            check_format(request.format),
        )
        # However the RPC ends (also while the stream waits on the client), the
        # export stops and its connection goes back at once.
        # (The stubs type the callback as a class of their own; any callable works.)
        context.add_done_callback(lambda _: export.cancel())  # type: ignore[arg-type]
        async for chunk in export.chunks():
            yield chunk

    async def FindDuplicates(
        self, request: content_pb2.FindDuplicatesRequest, context: Context
    ) -> content_pb2.FindDuplicatesResponse:
        return await self._duplicates.find(principal(), request)

    async def MarkDuplicates(
        self, request: content_pb2.MarkDuplicatesRequest, context: Context
    ) -> content_pb2.MarkDuplicatesResponse:
        return await self._duplicates.mark(principal(), request)

    async def GetContentStats(
        self, request: content_pb2.GetContentStatsRequest, context: Context
    ) -> content_pb2.GetContentStatsResponse:
        return await self._stats.get(principal(), request)

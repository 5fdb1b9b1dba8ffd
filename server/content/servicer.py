"""ContentService over gRPC: proto in, checked, one unit of work per RPC
around the service call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from server import bulk
from server.auth import principal
from server.content import reports
from server.content.export import Export, check_format, export_fields
from server.content.ingest import Ingest
from server.content.service import (
    ContentService,
    content_query,
    create_request,
    list_request,
    search_request,
    update_request,
)
from server.limits import Limits
from server.ops import metrics
from server.protoconv import parse_uuid
from server.uow import Database

Context = grpc.aio.ServicerContext[Any, Any]


class ContentServicer(content_pb2_grpc.ContentServiceServicer):
    def __init__(self, service: ContentService, db: Database, limits: Limits) -> None:
        self._service = service
        self._db = db
        self._limits = limits

    async def CreateContent(
        self, request: content_pb2.CreateContentRequest, context: Context
    ) -> content_pb2.Content:
        caller = principal()
        new = create_request(caller, request)
        async with self._db.write() as uow:
            return await self._service.create(uow, caller, new)

    async def GetContent(
        self, request: content_pb2.GetContentRequest, context: Context
    ) -> content_pb2.Content:
        # A coalesced point read: the service's reads open their own units.
        return await self._service.get(principal(), parse_uuid(request.id, "id"))

    async def ListContent(
        self, request: content_pb2.ListContentRequest, context: Context
    ) -> content_pb2.ListContentResponse:
        page = list_request(principal(), request)
        async with self._db.read() as uow:
            return await self._service.list(uow, page)

    async def UpdateContent(
        self, request: content_pb2.UpdateContentRequest, context: Context
    ) -> content_pb2.Content:
        caller = principal()
        change = update_request(request)
        async with self._db.write() as uow:
            return await self._service.update(uow, caller, change)

    async def DeleteContent(
        self, request: content_pb2.DeleteContentRequest, context: Context
    ) -> content_pb2.Content:
        caller = principal()
        content_id = parse_uuid(request.id, "id")
        async with self._db.write() as uow:
            return await self._service.set_deleted(uow, caller, content_id, deleted=True)

    async def UndeleteContent(
        self, request: content_pb2.UndeleteContentRequest, context: Context
    ) -> content_pb2.Content:
        caller = principal()
        content_id = parse_uuid(request.id, "id")
        async with self._db.write() as uow:
            return await self._service.set_deleted(uow, caller, content_id, deleted=False)

    async def SearchContent(
        self, request: content_pb2.SearchContentRequest, context: Context
    ) -> content_pb2.SearchContentResponse:
        page = search_request(principal(), request)
        async with self._db.read() as uow:
            response = await self._service.search(uow, page)
        metrics.SEARCHES_CONTENT.inc()
        return response

    async def IngestContent(
        self, request_iterator: AsyncIterator[content_pb2.IngestContentRequest], context: Context
    ) -> content_pb2.IngestContentResponse:
        caller = principal()
        first = await anext(request_iterator, None)
        if first is None:
            return content_pb2.IngestContentResponse()
        # No unit for the stream: each batch is written in a unit of its own
        # (server.content.ingest), so no connection waits on the client.
        rest = bulk.whole_stream(request_iterator, context)
        return await Ingest(self._db, self._limits.bulk, caller).run(first, rest)

    async def ExportContent(
        self, request: content_pb2.ExportContentRequest, context: Context
    ) -> AsyncIterator[content_pb2.ExportChunk]:
        # The export reads in a snapshot unit of its own, in a task that the
        # end of the RPC cancels.
        export = Export(
            self._db,
            content_query(principal(), request.filter),
            export_fields(request.columns, request.include_metadata),
            check_format(request.format),
            idle_s=self._limits.export_idle_s,
            slots=self._limits.export_slots,
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
        query = content_query(principal(), request.filter)
        async with self._db.snapshot() as uow:
            return await reports.find_duplicates(uow, query)

    async def MarkDuplicates(
        self, request: content_pb2.MarkDuplicatesRequest, context: Context
    ) -> content_pb2.MarkDuplicatesResponse:
        caller = principal()
        marks = reports.mark_request(request)
        async with self._db.write() as uow:
            return await reports.mark_duplicates(uow, caller, marks)

    async def GetContentStats(
        self, request: content_pb2.GetContentStatsRequest, context: Context
    ) -> content_pb2.GetContentStatsResponse:
        stats = reports.stats_request(principal(), request)
        async with self._db.snapshot() as uow:
            return await reports.content_stats(uow, stats)

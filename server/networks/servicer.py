"""NetworkService over gRPC: proto in, checked, one unit of work per RPC
around the service call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from observatory.v1 import content_pb2, network_pb2, network_pb2_grpc

from server.auth import principal
from server.limits import Limits
from server.networks import service
from server.streams import Outlet, SnapshotExport
from server.uow import Database, UnitOfWork

Context = grpc.aio.ServicerContext[Any, Any]


class NetworkServicer(network_pb2_grpc.NetworkServiceServicer):
    def __init__(self, db: Database, limits: Limits) -> None:
        self._db = db
        self._limits = limits

    async def GetNetwork(
        self, request: network_pb2.GetNetworkRequest, context: Context
    ) -> network_pb2.GetNetworkResponse:
        query = service.network_query(
            principal(),
            request,
            default_nodes=service.GET_DEFAULT_NODES,
            most_nodes=service.GET_MAX_NODES,
        )
        async with self._db.read() as uow:
            return await service.get_network(uow, query)

    async def ExportNetwork(
        self, request: network_pb2.ExportNetworkRequest, context: Context
    ) -> AsyncIterator[content_pb2.ExportChunk]:
        query = service.network_query(
            principal(),
            request,
            default_nodes=service.EXPORT_DEFAULT_NODES,
            most_nodes=service.EXPORT_MAX_NODES,
        )
        writer = service.graph_writer(request.format, query.kind)
        # The export reads in a snapshot unit of its own, in a task that the
        # end of the RPC cancels, and ends when its client reads nothing for
        # OBSERVATORY_EXPORT_IDLE_S (server.streams).
        export = SnapshotExport(
            self._db, idle_s=self._limits.export_idle_s, slots=self._limits.export_slots
        )
        export.cancel_when_done(context)

        async def produce(uow: UnitOfWork, outlet: Outlet) -> None:
            await service.export_network(uow, query, writer, outlet)

        async for chunk in export.items(produce):
            yield chunk

    async def ListCrossPlatformActors(
        self, request: network_pb2.ListCrossPlatformActorsRequest, context: Context
    ) -> network_pb2.ListCrossPlatformActorsResponse:
        page = service.cross_platform_request(principal(), request)
        async with self._db.read() as uow:
            return await service.cross_platform_actors(uow, page)

"""AdminService over gRPC."""

from __future__ import annotations

from typing import Any

import grpc
from observatory.v1 import admin_pb2, admin_pb2_grpc

from server.admin.service import AdminService
from server.auth import principal

Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, service: AdminService) -> None:
        self._service = service

    async def ListAuditLog(
        self, request: admin_pb2.ListAuditLogRequest, context: Context
    ) -> admin_pb2.ListAuditLogResponse:
        return await self._service.list_audit_log(principal(), request)

    async def VerifyLedger(
        self, request: admin_pb2.VerifyLedgerRequest, context: Context
    ) -> admin_pb2.VerifyLedgerResponse:
        return await self._service.verify_ledger(principal(), request)

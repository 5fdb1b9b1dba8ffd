"""AdminService over gRPC: checks each request's shape, opens the RPC's unit
of work (each RPC is one statement: a `read()` unit), calls the service."""

from __future__ import annotations

from typing import Any

import grpc
from observatory.v1 import admin_pb2, admin_pb2_grpc

from server import errors, pagination, validate
from server.admin.service import AdminService
from server.auth import principal
from server.protoconv import optional_uuid, timestamp_field
from server.uow import Database

Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, service: AdminService, db: Database) -> None:
        self._service = service
        self._db = db

    async def ListAuditLog(
        self, request: admin_pb2.ListAuditLogRequest, context: Context
    ) -> admin_pb2.ListAuditLogResponse:
        caller = principal()
        user_id = optional_uuid(request.user_id, "user_id")
        validate.text(request.action, "action", max_bytes=validate.MAX_NAME_BYTES)
        after = timestamp_field(request, "after")
        before = timestamp_field(request, "before")
        if after is not None and before is not None and after >= before:
            raise errors.InvalidArgument("before", "must be later than after")
        size = pagination.page_size(request.page_size)
        async with self._db.read() as uow:
            return await self._service.list_audit_log(
                uow, caller, request, user_id=user_id, after=after, before=before, size=size
            )

    async def VerifyLedger(
        self, request: admin_pb2.VerifyLedgerRequest, context: Context
    ) -> admin_pb2.VerifyLedgerResponse:
        caller = principal()
        user_id = optional_uuid(request.user_id, "user_id")
        async with self._db.read() as uow:
            return await self._service.verify_ledger(uow, caller, user_id)

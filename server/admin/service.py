"""Operator tools: the audit log and the credit ledger's check."""

from __future__ import annotations

import uuid
from datetime import datetime

from observatory.v1 import admin_pb2

from server import pagination
from server.audit import AuditRepository
from server.auth import Principal
from server.credits.service import verify_ledger
from server.db import Database
from server.protoconv import dict_to_struct, optional_uuid, set_timestamp, timestamp_field


class AdminService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def list_audit_log(
        self, caller: Principal, request: admin_pb2.ListAuditLogRequest
    ) -> admin_pb2.ListAuditLogResponse:
        caller.require_admin()
        user_id = optional_uuid(request.user_id, "user_id")
        after = timestamp_field(request, "after")
        before = timestamp_field(request, "before")
        size = pagination.page_size(request.page_size)
        token_query = pagination.fingerprint(
            "ListAuditLog", request.user_id, request.action, str(after), str(before)
        )
        page_after = pagination.decode_token(
            request.page_token, token_query, datetime.fromisoformat, uuid.UUID
        )
        async with self._db.read() as conn:
            rows = await AuditRepository(conn).list(
                user_id=user_id,
                action=request.action or None,
                after=after,
                before=before,
                page_after=page_after,
                limit=size + 1,
            )
        response = admin_pb2.ListAuditLogResponse()
        for row in rows[:size]:
            entry = response.entries.add(
                id=str(row["id"]),
                user_id=str(row["user_id"]),
                action=row["action"],
                resource=row["resource"],
            )
            dict_to_struct(row["detail"], entry.detail)
            set_timestamp(entry.create_time, row["create_time"])
        response.next_page_token = pagination.next_page_token(
            rows, size, token_query, lambda row: (row["create_time"], row["id"])
        )
        return response

    async def verify_ledger(
        self, caller: Principal, request: admin_pb2.VerifyLedgerRequest
    ) -> admin_pb2.VerifyLedgerResponse:
        caller.require_admin()
        return await verify_ledger(self._db, request)

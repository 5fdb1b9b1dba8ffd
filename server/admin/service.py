"""Operator tools: the audit log and the credit ledger's check. Admins only."""

from __future__ import annotations

import uuid
from datetime import datetime

from observatory.v1 import admin_pb2

from server import pagination
from server.audit import AuditRepository
from server.auth import Principal
from server.credits.service import CreditService
from server.protoconv import dict_to_struct, set_timestamp
from server.uow import UnitOfWork


class AdminService:
    def __init__(self, credits: CreditService) -> None:
        self._credits = credits

    async def list_audit_log(
        self,
        uow: UnitOfWork,
        caller: Principal,
        request: admin_pb2.ListAuditLogRequest,
        *,
        user_id: uuid.UUID | None,
        after: datetime | None,
        before: datetime | None,
        size: int,
    ) -> admin_pb2.ListAuditLogResponse:
        """A page of entries newest first, filtered by `request`'s user,
        action and [after, before) window (parsed into the keyword arguments)."""
        caller.require_admin()
        token_query = pagination.fingerprint(
            "ListAuditLog", request.user_id, request.action, str(after), str(before)
        )
        page_after = pagination.decode_token(
            request.page_token, token_query, datetime.fromisoformat, uuid.UUID
        )
        rows = await AuditRepository(uow.conn).list(
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
        self, uow: UnitOfWork, caller: Principal, user_id: uuid.UUID | None
    ) -> admin_pb2.VerifyLedgerResponse:
        caller.require_admin()
        return await self._credits.verify_ledger(uow, user_id)

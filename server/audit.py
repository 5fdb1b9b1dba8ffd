"""The audit trail: one entry per mutation, written in the mutation's transaction."""

from __future__ import annotations

import contextvars
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select, tuple_
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from server.auth import Principal
from server.tables import audit_log

current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class AuditRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def record(
        self, actor: Principal, action: str, resource: str, detail: dict[str, Any] | None = None
    ) -> None:
        await self._conn.execute(
            audit_log.insert().values(
                user_id=actor.user_id,
                action=action,
                resource=resource,
                detail=detail or {},
                request_id=current_request_id.get() or None,
            )
        )

    async def list(
        self,
        *,
        user_id: uuid.UUID | None,
        action: str | None,
        after: datetime | None,
        before: datetime | None,
        page_after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[RowMapping]:
        query: Select[Any] = select(audit_log)
        if user_id is not None:
            query = query.where(audit_log.c.user_id == user_id)
        if action:
            query = query.where(audit_log.c.action == action)
        if after is not None:
            query = query.where(audit_log.c.create_time >= after)
        if before is not None:
            query = query.where(audit_log.c.create_time < before)
        if page_after is not None:
            query = query.where(
                tuple_(audit_log.c.create_time, audit_log.c.id) < tuple_(*page_after)
            )
        query = query.order_by(audit_log.c.create_time.desc(), audit_log.c.id.desc()).limit(limit)
        return list((await self._conn.execute(query)).mappings())

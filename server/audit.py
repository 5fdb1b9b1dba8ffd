"""The audit trail: one entry per mutation, written in the mutation's transaction."""

from __future__ import annotations

import contextvars
import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, Select, Text, bindparam, cast, select, tuple_
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import ColumnElement, FromClause

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


def entry_insert(source: FromClause, resource: ColumnElement[str]) -> Insert:
    """An INSERT of one audit entry per row of `source` (`resource` an
    expression over it), to run as a data-modifying CTE of the statement that
    makes the change, so both cost one round trip. Its parameters are named
    by `entry_params`."""
    return audit_log.insert().from_select(
        ["user_id", "action", "resource", "detail", "request_id"],
        select(
            bindparam("audit_user_id", type_=audit_log.c.user_id.type),
            bindparam("audit_action", type_=audit_log.c.action.type),
            resource,
            # JSON text, so that the driver and SQLAlchemy take the same value.
            cast(bindparam("audit_detail", type_=Text), audit_log.c.detail.type),
            bindparam("audit_request_id", type_=audit_log.c.request_id.type),
        ).select_from(source),
    )


def entry_params(
    actor: Principal, action: str, detail: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The parameters of an `entry_insert` statement (for the driver or SQLAlchemy)."""
    return {
        "audit_user_id": actor.user_id,
        "audit_action": action,
        "audit_detail": json.dumps(detail or {}),
        "audit_request_id": current_request_id.get() or None,
    }

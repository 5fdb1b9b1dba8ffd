"""SQL for the whole-set content RPCs: ExportContent, FindDuplicates,
MarkDuplicates and GetContentStats. Filters come from
`repository.filter_conditions`; nothing here commits."""

from __future__ import annotations

import functools
import json
import operator
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from observatory.v1 import content_pb2
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Select,
    Text,
    case,
    cast,
    distinct,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID, aggregate_order_by
from sqlalchemy.types import TypeEngine

from server.content.repository import ContentQuery, filter_conditions
from server.content.tables import content, finite_time
from server.db import compile_for_driver
from server.uow import UnitOfWork

# Every Content field an export can hold (all of them), in the message's order,
# and the kinds of value that each format renders differently, by column type.
EXPORT_FIELDS = tuple(field.name for field in content_pb2.Content.DESCRIPTOR.fields)


def _fields_of_type(kind: type[TypeEngine[Any]]) -> frozenset[str]:
    return frozenset(f for f in EXPORT_FIELDS if isinstance(content.c[f].type, kind))


TIME_FIELDS = _fields_of_type(DateTime)
COUNT_FIELDS = _fields_of_type(BigInteger)
LIST_FIELDS = _fields_of_type(ARRAY)
JSON_FIELDS = _fields_of_type(JSONB)
# The timestamps a client writes (the others the database sets): only these can
# hold the ends of the range, stored as ±infinity (see tables.finite_time).
CLIENT_TIME_FIELDS = frozenset({"published_at", "collected_at"})


def _text_value(field: str) -> ColumnElement[Any]:
    """A field as CSV shows it: lists as JSON, the rest as PostgreSQL prints it
    (timestamps in ISO 8601, in the export's UTC session)."""
    column = content.c[field]
    if field in LIST_FIELDS:
        return cast(func.array_to_json(column), Text)
    if field in JSON_FIELDS:
        return cast(column, Text)
    if field in CLIENT_TIME_FIELDS:
        return finite_time(column)
    return column


def csv_select(q: ContentQuery, fields: Sequence[str]) -> Select[Any]:
    return select(*(_text_value(f).label(f) for f in fields)).where(*filter_conditions(q))


def _json_value(field: str) -> ColumnElement[Any]:
    """A field as JSON text, as row_to_json prints it ('null' when NULL)."""
    column = content.c[field]
    kind = column.type
    if isinstance(kind, BigInteger | JSONB):
        value: ColumnElement[Any] = cast(column, Text)
    elif isinstance(kind, UUID):  # no character of a UUID needs escaping
        value = literal('"') + cast(column, Text) + literal('"')
    elif isinstance(kind, ARRAY):
        value = cast(func.array_to_json(column), Text)
    else:
        value = cast(
            func.to_json(finite_time(column) if field in CLIENT_TIME_FIELDS else column), Text
        )
    return func.coalesce(value, literal("null"))


def ndjson_select(q: ContentQuery, fields: Sequence[str]) -> Select[Any]:
    """One column: each row as one line of JSON text (JSON escapes every control
    character, so a line never holds a raw newline), exactly as row_to_json
    prints it (keys named after the fields, timestamps in ISO 8601) but put
    together with `||`, which PostgreSQL does in about two thirds of the time."""
    pieces = [
        literal(("," if i else "{") + json.dumps(field) + ":") + _json_value(field)
        for i, field in enumerate(fields)
    ]
    line = functools.reduce(operator.add, pieces) + literal("}")
    return select(line).where(*filter_conditions(q))


def count_select(q: ContentQuery) -> Select[Any]:
    return select(func.count()).select_from(content).where(*filter_conditions(q))


class ExportReader:
    """Reads one export's rows, in the export's snapshot unit."""

    def __init__(self, uow: UnitOfWork) -> None:
        self._driver = uow.driver

    async def lift_statement_timeout(self) -> None:
        """No statement_timeout for the rest of the export's transaction: its
        COPY lasts as long as the client keeps reading (the export's idle
        bound and the client's deadline end one that stalls), and the setting
        goes back to the session's when the transaction ends."""
        await self._driver.execute("SELECT set_config('statement_timeout', '0', true)")

    async def count(self, q: ContentQuery) -> int:
        sql, args = compile_for_driver(count_select(q))
        return int(await self._driver.fetchval(sql, *args))

    async def copy_csv(
        self, statement: Select[Any], sink: Callable[[bytes], Awaitable[None]], *, header: bool
    ) -> None:
        """COPY of `statement` in CSV, pushed into `sink` as PostgreSQL sends
        it; the COPY waits while `sink` does."""
        sql, args = compile_for_driver(statement)
        await self._driver.copy_from_query(
            sql, *args, output=sink, format="csv", header=header or None
        )

    async def copy_lines(
        self, statement: Select[Any], sink: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """COPY of a one-column text `statement`, each value as it is plus a
        newline: CSV with quote and delimiter characters no value holds, so
        nothing is quoted or escaped."""
        sql, args = compile_for_driver(statement)
        await self._driver.copy_from_query(
            sql, *args, output=sink, format="csv", quote="\x01", delimiter="\x02"
        )


# -- duplicates ------------------------------------------------------------------

MAX_GROUPS = 10_000
# The canonical order of a group: earliest published, then earliest collected.
_CANONICAL_ORDER = (
    content.c.published_at.asc(),
    content.c.collected_at.asc().nulls_last(),
    content.c.id.asc(),
)


class DuplicateRepository:
    def __init__(self, uow: UnitOfWork) -> None:
        self._conn = uow.conn

    async def url_groups(self, q: ContentQuery) -> list[tuple[str, list[uuid.UUID]]]:
        """(normalised URL, IDs in canonical order) of each URL shared by two or
        more rows of one owner."""
        key = content.c.url_normalized
        return await self._groups(q, key, key.isnot(None), having=func.count() > 1)

    async def hash_groups(self, q: ContentQuery) -> list[tuple[str, list[uuid.UUID]]]:
        """(content_hash, IDs in canonical order) of each hash held by rows of one
        owner on more than one (platform, arena)."""
        key = content.c.content_hash
        places = func.count(
            distinct(tuple_(content.c.platform, func.coalesce(content.c.arena, "")))
        )
        return await self._groups(q, key, key.isnot(None), having=places > 1)

    async def _groups(
        self,
        q: ContentQuery,
        key: ColumnElement[Any],
        present: ColumnElement[bool],
        having: ColumnElement[bool],
    ) -> list[tuple[str, list[uuid.UUID]]]:
        ids = func.array_agg(aggregate_order_by(content.c.id, *_CANONICAL_ORDER))
        query = (
            select(key, ids)
            .where(*filter_conditions(q), present)
            .group_by(content.c.owner_id, key)
            .having(having)
            .order_by(func.count().desc(), key)
            .limit(MAX_GROUPS)
        )
        rows = (await self._conn.execute(query)).all()
        return [(row[0], list(row[1])) for row in rows]

    async def lock_scoped(
        self, ids: Sequence[uuid.UUID], owner_id: uuid.UUID | None
    ) -> list[tuple[uuid.UUID, uuid.UUID, uuid.UUID | None]]:
        """(id, owner_id, duplicate_of) of those of `ids` in scope, locked."""
        conditions: list[ColumnElement[bool]] = [content.c.id.in_(ids)]
        if owner_id is not None:
            conditions.append(content.c.owner_id == owner_id)
        query = (
            select(content.c.id, content.c.owner_id, content.c.duplicate_of)
            .where(*conditions)
            .with_for_update()
        )
        return [(row[0], row[1], row[2]) for row in (await self._conn.execute(query)).all()]

    async def mark(self, canonical_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> int:
        """Points each of `ids` at `canonical_id`; returns how many changed."""
        statement = (
            content.update()
            .where(content.c.id.in_(ids), content.c.duplicate_of.is_distinct_from(canonical_id))
            .values(duplicate_of=canonical_id, update_time=func.now())
        )
        return int((await self._conn.execute(statement)).rowcount)


# -- statistics --------------------------------------------------------------------


def engagement_expression() -> ColumnElement[Any]:
    c = content.c
    return (
        func.coalesce(c.likes_count, 0)
        + func.coalesce(c.shares_count, 0)
        + func.coalesce(c.comments_count, 0)
    )


class StatsRepository:
    def __init__(self, uow: UnitOfWork) -> None:
        self._conn = uow.conn

    async def volume(self, q: ContentQuery, granularity: str) -> list[Any]:
        """(period_start, arena or '', count) per period and arena, oldest first."""
        published = finite_time(content.c.published_at)
        period = func.date_trunc(granularity, published, "UTC").label("period")
        arena = func.coalesce(content.c.arena, "").label("arena")
        query = (
            select(period, arena, func.count())
            .where(*filter_conditions(q))
            .group_by(period, arena)
            .order_by(period, arena)
        )
        return list((await self._conn.execute(query)).all())

    async def top_actors(self, q: ContentQuery, limit: int) -> list[Any]:
        """(author_id, platform, author_platform_id, display name, count), most
        first. Linked rows count per author_id; unlinked ones per (platform,
        author_platform_id)."""
        c = content.c
        linked = c.author_id.isnot(None)
        plat = _when_unlinked(linked, c.platform).label("g_platform")
        account = _when_unlinked(linked, c.author_platform_id).label("g_account")
        count = func.count().label("n")
        query = (
            select(c.author_id, plat, account, func.max(c.author_display_name), count)
            .where(*filter_conditions(q), linked | c.author_platform_id.isnot(None))
            .group_by(c.author_id, plat, account)
            .order_by(count.desc(), c.author_id, plat, account)
            .limit(limit)
        )
        return list((await self._conn.execute(query)).all())

    async def top_terms(self, q: ContentQuery, limit: int) -> list[Any]:
        term = func.unnest(content.c.search_terms_matched).table_valued("term").render_derived()
        count = func.count().label("n")
        query = (
            select(term.c.term, count)
            .select_from(content)
            .join(term, literal(True))
            .where(*filter_conditions(q))
            .group_by(term.c.term)
            .order_by(count.desc(), term.c.term)
            .limit(limit)
        )
        return list((await self._conn.execute(query)).all())

    async def engagement(self, q: ContentQuery) -> Any:
        """(total, median, p95, mean) of engagement over the filtered rows."""
        value = engagement_expression()
        query = select(
            func.count(),
            func.percentile_cont(0.5).within_group(value),
            func.percentile_cont(0.95).within_group(value),
            func.avg(value),
        ).where(*filter_conditions(q))
        return (await self._conn.execute(query)).one()


def _when_unlinked(linked: ColumnElement[bool], column: ColumnElement[Any]) -> ColumnElement[Any]:
    return case((linked, None), else_=column)

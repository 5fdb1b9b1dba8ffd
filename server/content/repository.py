"""All SQL for content. Never commits: the caller's unit of work does."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg
from sqlalchemy import (
    ColumnElement,
    Float,
    Select,
    bindparam,
    cast,
    func,
    literal_column,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import REGCONFIG, insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from server import errors
from server.actors.tables import actor_presences, actors
from server.content.convert import INSERT_COLUMNS
from server.db import PreparedStatement, driver_connection, rows_affected
from server.tables import CONTENT_NATURAL_KEY, CONTENT_TS_CONFIG, content

# Everything but the (large, derived) full-text vector.
COLUMNS = [column for column in content.c if column.name != "search_vector"]
STAGING_TABLE = "content_ingest"
_GET_OWNED = PreparedStatement(
    select(*COLUMNS).where(
        content.c.id == bindparam("id"), content.c.owner_id == bindparam("owner_id")
    )
)
_GET_ANY_OWNER = PreparedStatement(select(*COLUMNS).where(content.c.id == bindparam("id")))

# The actors that staged ingest rows with a stream index in [$1, $2] and no
# author_id get through their author's account.
_STAGED_AUTHORS = (
    f"SELECT p.actor_id FROM {STAGING_TABLE} s JOIN actor_presences p "
    "ON p.owner_id = s.owner_id AND p.platform = s.platform "
    "AND p.platform_user_id = s.author_platform_id "
    "WHERE s.stream_index BETWEEN $1 AND $2 AND s.author_id IS NULL"
)
_LOCK_STAGED_AUTHORS = (
    f"SELECT id FROM actors WHERE id IN ({_STAGED_AUTHORS}) ORDER BY id FOR KEY SHARE"
)
_LOCK_ROUNDS = 5

ActorIds = Callable[[], Awaitable[Iterable[uuid.UUID]]]


async def _hold_linked_actors(lock: ActorIds, linked: ActorIds) -> None:
    """Holds FOR KEY SHARE, until commit, on every actor that rows are about to
    be linked to (`lock` locks them in ID order, as merges do; `linked` reads
    which they are now), so that a merge or split of those actors (FOR UPDATE)
    waits for this transaction and then re-points its rows too, instead of the
    rows ending up on an actor the merge removed. When a merge committed in
    the meantime, the account has moved to another actor: the next round
    locks that one."""
    locked: set[uuid.UUID] = set()
    for _ in range(_LOCK_ROUNDS):
        locked.update(await lock())
        if set(await linked()) <= locked:
            return
    raise errors.Aborted("the authors' actors kept being merged; retry")


async def lookup_content(
    driver: asyncpg.Connection, content_id: uuid.UUID, owner_id: uuid.UUID | None
) -> asyncpg.Record | None:
    """One row by ID (within `owner_id`'s rows unless None), as a prepared
    statement: GetContent's hot path, on a `Database.lookup()` connection."""
    if owner_id is None:
        return await _GET_ANY_OWNER.fetchrow(driver, id=content_id)
    return await _GET_OWNED.fetchrow(driver, id=content_id, owner_id=owner_id)


@dataclass(frozen=True, slots=True)
class ContentQuery:
    """A validated ContentFilter plus the caller's scope (owner None: all owners)."""

    owner_id: uuid.UUID | None
    platforms: Sequence[str] = ()
    arenas: Sequence[str] = ()
    languages: Sequence[str] = ()
    published_after: datetime | None = None
    published_before: datetime | None = None
    author_ids: Sequence[uuid.UUID] = ()
    collection_run_id: str | None = None
    search_term: str | None = None
    query: str | None = None
    show_deleted: bool = False


def _tsquery(query: str) -> ColumnElement[Any]:
    return func.websearch_to_tsquery(cast(CONTENT_TS_CONFIG, REGCONFIG), query)


def filter_conditions(q: ContentQuery) -> list[ColumnElement[bool]]:
    c = content.c
    conditions: list[ColumnElement[bool]] = []
    if q.owner_id is not None:
        conditions.append(c.owner_id == q.owner_id)
    if not q.show_deleted:
        conditions.append(c.delete_time.is_(None))
    if q.platforms:
        conditions.append(c.platform.in_(q.platforms))
    if q.arenas:
        conditions.append(c.arena.in_(q.arenas))
    if q.languages:
        conditions.append(c.language.in_(q.languages))
    if q.published_after is not None:
        conditions.append(c.published_at >= q.published_after)
    if q.published_before is not None:
        conditions.append(c.published_at < q.published_before)
    if q.author_ids:
        conditions.append(c.author_id.in_(q.author_ids))
    if q.collection_run_id:
        conditions.append(c.collection_run_id == q.collection_run_id)
    if q.search_term:
        conditions.append(c.search_terms_matched.contains([q.search_term]))
    if q.query:
        conditions.append(c.search_vector.bool_op("@@")(_tsquery(q.query)))
    return conditions


class ContentRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    def _scoped(
        self, content_id: uuid.UUID, owner_id: uuid.UUID | None
    ) -> list[ColumnElement[bool]]:
        conditions = [content.c.id == content_id]
        if owner_id is not None:
            conditions.append(content.c.owner_id == owner_id)
        return conditions

    async def get(
        self, content_id: uuid.UUID, owner_id: uuid.UUID | None, *, for_update: bool = False
    ) -> Mapping[Any, Any] | None:
        if for_update:
            query = select(*COLUMNS).where(*self._scoped(content_id, owner_id)).with_for_update()
            return (await self._conn.execute(query)).mappings().first()
        return await lookup_content(await driver_connection(self._conn), content_id, owner_id)

    async def insert(self, values: dict[str, Any]) -> RowMapping | None:
        """The new row, or None when the natural key is taken. Without an
        author_id, it gets the actor whose presence is its author's account."""
        if values.get("author_id") is None and values.get("author_platform_id"):
            p = actor_presences.c
            author = select(p.actor_id).where(
                p.owner_id == values["owner_id"],
                p.platform == values["platform"],
                p.platform_user_id == values["author_platform_id"],
            )
            lock = (
                select(actors.c.id)
                .where(actors.c.id.in_(author))
                .order_by(actors.c.id)
                .with_for_update(read=True, key_share=True)
            )

            async def locked() -> Iterable[uuid.UUID]:
                return (await self._conn.execute(lock)).scalars().all()

            async def linked() -> Iterable[uuid.UUID]:
                return (await self._conn.execute(author)).scalars().all()

            await _hold_linked_actors(locked, linked)
            values = {**values, "author_id": author.scalar_subquery()}
        statement = (
            insert(content)
            .values(**values)
            .on_conflict_do_nothing(index_elements=CONTENT_NATURAL_KEY)
            .returning(*COLUMNS)
        )
        return (await self._conn.execute(statement)).mappings().first()

    async def update(
        self, content_id: uuid.UUID, owner_id: uuid.UUID | None, values: dict[str, Any]
    ) -> RowMapping | None:
        statement = (
            content.update()
            .where(*self._scoped(content_id, owner_id))
            .values(**values, update_time=func.now())
            .returning(*COLUMNS)
        )
        return (await self._conn.execute(statement)).mappings().first()

    async def natural_key_taken(self, key: Mapping[str, Any], other_than: uuid.UUID) -> bool:
        """Whether another row holds the natural key in `key` (a mapping with
        every CONTENT_NATURAL_KEY column). Without a platform_id there is none."""
        if key["platform_id"] is None:
            return False
        query: Select[Any] = select(literal_column("1")).where(
            *(content.c[column] == key[column] for column in CONTENT_NATURAL_KEY),
            content.c.id != other_than,
        )
        return (await self._conn.execute(query)).first() is not None

    async def set_deleted(
        self, content_id: uuid.UUID, owner_id: uuid.UUID | None, deleted: bool
    ) -> RowMapping | None:
        """Soft-deletes (or restores) a live (or deleted) row; None when no row
        in that state exists."""
        state = content.c.delete_time.is_(None) if deleted else content.c.delete_time.isnot(None)
        statement = (
            content.update()
            .where(*self._scoped(content_id, owner_id), state)
            .values(delete_time=func.now() if deleted else None, update_time=func.now())
            .returning(*COLUMNS)
        )
        return (await self._conn.execute(statement)).mappings().first()

    async def find_page(
        self, q: ContentQuery, *, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[RowMapping]:
        query: Select[Any] = select(*COLUMNS).where(*filter_conditions(q))
        if after is not None:
            query = query.where(tuple_(content.c.published_at, content.c.id) < tuple_(*after))
        query = query.order_by(content.c.published_at.desc(), content.c.id.desc()).limit(limit)
        return list((await self._conn.execute(query)).mappings())

    async def search(
        self, q: ContentQuery, *, after: tuple[float, uuid.UUID] | None, limit: int
    ) -> list[RowMapping]:
        """Rows matching q.query with `rank` and `snippet`, best rank first."""
        assert q.query
        tsquery = _tsquery(q.query)
        rank = cast(func.ts_rank_cd(content.c.search_vector, tsquery), Float).label("rank")
        ranked = select(*COLUMNS, rank).where(*filter_conditions(q)).subquery("ranked")
        query = select(
            *ranked.c,
            func.ts_headline(
                cast(CONTENT_TS_CONFIG, REGCONFIG),
                # Title and text both: a match in either one is highlighted.
                func.concat_ws(
                    " — ", func.nullif(ranked.c.title, ""), func.nullif(ranked.c.text_content, "")
                ),
                tsquery,
                "StartSel=<b>, StopSel=</b>, MaxWords=35, MinWords=15, MaxFragments=2",
            ).label("snippet"),
        )
        if after is not None:
            query = query.where(tuple_(ranked.c.rank, ranked.c.id) < tuple_(*after))
        query = query.order_by(ranked.c.rank.desc(), ranked.c.id.desc()).limit(limit)
        return list((await self._conn.execute(query)).mappings())

    async def ensure_partitions(self, first_month: date, months: int) -> int:
        result = await self._conn.execute(
            select(func.content_ensure_partitions(first_month, months))
        )
        return int(result.scalar_one())

    # -- bulk ingest -------------------------------------------------------------
    # A stream is COPYed batch by batch into STAGING_TABLE and moved into content
    # from there with one INSERT per batch (see server.content.service._Ingest).

    async def create_staging(self) -> None:
        """A session-private COPY target, dropped when the transaction ends. Each
        row carries its index in the stream, so a refused row can be named."""
        columns = ", ".join(INSERT_COLUMNS)
        await self._conn.execute(
            text(
                f"CREATE TEMP TABLE {STAGING_TABLE} ON COMMIT DROP AS "
                f"SELECT {columns}, 0::bigint AS stream_index FROM content WITH NO DATA"
            )
        )

    async def stage(self, records: Sequence[tuple[Any, ...]]) -> None:
        """COPYs `records` (INSERT_COLUMNS, then the stream index), in binary."""
        driver = await driver_connection(self._conn)
        await driver.copy_records_to_table(
            STAGING_TABLE, records=records, columns=(*INSERT_COLUMNS, "stream_index")
        )

    async def move_staged(self, first: int, last: int) -> int:
        """Inserts the staged rows with a stream index in [first, last] into
        content in one statement; returns how many were new (the rest clashed on
        the natural key). Raises the database's error when any row is refused."""
        driver = await driver_connection(self._conn)

        async def locked() -> Iterable[uuid.UUID]:
            return [row["id"] for row in await driver.fetch(_LOCK_STAGED_AUTHORS, first, last)]

        async def linked() -> Iterable[uuid.UUID]:
            return [row["actor_id"] for row in await driver.fetch(_STAGED_AUTHORS, first, last)]

        await _hold_linked_actors(locked, linked)
        columns = ", ".join(INSERT_COLUMNS)
        # A row with no author_id gets the actor whose presence is its author's account.
        values = ", ".join(
            "coalesce(s.author_id, p.actor_id)" if column == "author_id" else f"s.{column}"
            for column in INSERT_COLUMNS
        )
        status = await driver.execute(
            f"INSERT INTO content ({columns}) SELECT {values} FROM {STAGING_TABLE} s "
            "LEFT JOIN actor_presences p ON p.owner_id = s.owner_id "
            "AND p.platform = s.platform AND p.platform_user_id = s.author_platform_id "
            "WHERE s.stream_index BETWEEN $1 AND $2 "
            f"ON CONFLICT ({', '.join(CONTENT_NATURAL_KEY)}) DO NOTHING",
            first,
            last,
        )
        return rows_affected(status)

    async def clear_staging(self) -> None:
        driver = await driver_connection(self._conn)
        await driver.execute(f"TRUNCATE {STAGING_TABLE}")

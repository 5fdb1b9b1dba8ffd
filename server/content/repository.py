"""All SQL for content's own rows. Built from the caller's unit of work; never
commits. A mutation, its audit entry and (for CreateContent) its request-ID
claim go to PostgreSQL as one statement with data-modifying CTEs."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import (
    Boolean,
    ColumnElement,
    Float,
    LargeBinary,
    Select,
    Text,
    any_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal_column,
    null,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY, REGCONFIG, UUID, insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.sql.elements import BindParameter

from server import audit, errors, idempotency
from server.actors.tables import actor_presences, actors
from server.content.convert import INSERT_COLUMNS
from server.content.tables import CONTENT_NATURAL_KEY, CONTENT_TS_CONFIG, content
from server.db import PreparedStatement, rows_affected
from server.uow import UnitOfWork

# Everything but the (large, derived) full-text vector.
COLUMNS = [column for column in content.c if column.name != "search_vector"]
STAGING_TABLE = "content_ingest"
CREATE_METHOD = "CreateContent"
_UUIDS = ARRAY(UUID(as_uuid=True))


def _param(column: str) -> BindParameter[Any]:
    """A driver parameter named and typed after a content column."""
    return bindparam(column, type_=content.c[column].type)


def _resource(content_id: ColumnElement[Any]) -> ColumnElement[str]:
    return literal_column("'contents/'", Text) + cast(content_id, Text)


# The caller's scope: the owner's rows, or every owner's when the parameter is NULL.
_OWNER_SCOPE = bindparam("owner_scope", type_=UUID(as_uuid=True))
_IN_SCOPE = or_(_OWNER_SCOPE.is_(None), content.c.owner_id == _OWNER_SCOPE)

# Rows by ID through content_by_ids (migration 0010): one plan per session
# instead of one per execution, since an ID prunes no partition.
_ROWS_BY_IDS = func.content_by_ids(bindparam("ids", type_=_UUIDS)).table_valued(
    *(column.name for column in content.c), name="by_id"
)
_BY_IDS = PreparedStatement(select(*(_ROWS_BY_IDS.c[column.name] for column in COLUMNS)))
_OWNED_IDS = PreparedStatement(
    select(_ROWS_BY_IDS.c.id).where(
        _ROWS_BY_IDS.c.owner_id == bindparam("owner_id", type_=UUID(as_uuid=True))
    )
)
_GET = select(*COLUMNS).where(content.c.id == _param("id"), _IN_SCOPE)
_GET_IN_SCOPE = PreparedStatement(_GET)
_GET_FOR_UPDATE = PreparedStatement(_GET.with_for_update())

_LOCK_ACTORS = PreparedStatement(
    select(actors.c.id)
    .where(actors.c.id == any_(bindparam("ids", type_=_UUIDS)))
    .order_by(actors.c.id)
    .with_for_update(read=True, key_share=True)
)
# The same, only for actors of one owner: a row's given author_id must name one
# of its owner's actors.
_LOCK_OWN_ACTORS = PreparedStatement(
    select(actors.c.id)
    .where(
        actors.c.id == any_(bindparam("ids", type_=_UUIDS)),
        actors.c.owner_id == bindparam("owner_id", type_=UUID(as_uuid=True)),
    )
    .order_by(actors.c.id)
    .with_for_update(read=True, key_share=True)
)


def _create_statement() -> Select[Any]:
    """CreateContent in one statement: resolve the author, claim the request ID
    (when there is one), insert the row (unless its natural key is taken), write
    the audit entry, and read back the stored answer of an earlier call with the
    same request ID.

    A row with no author_id but an author account gets the actor whose presence
    is that account; it may do so only while holding FOR KEY SHARE on that actor
    (see `_hold_linked_actors`), taken by the caller beforehand and passed in
    `locked`. When the account's actor is not among them, nothing is written and
    `ready` is false: the caller locks `linked_author` and runs it again."""
    p = actor_presences.c
    given = _param("author_id")
    linked = (
        select(p.actor_id)
        .where(
            p.owner_id == _param("owner_id"),
            p.platform == _param("platform"),
            p.platform_user_id == _param("author_platform_id"),
        )
        .scalar_subquery()
    )
    author = select(given.label("given"), linked.label("linked")).cte("author")
    gate = select(
        func.coalesce(author.c.given, author.c.linked).label("author_id"),
        author.c.linked.label("linked_author"),
        or_(
            author.c.given.isnot(None),
            author.c.linked.is_(None),
            author.c.linked == any_(bindparam("locked", type_=_UUIDS)),
        ).label("ready"),
    ).cte("gate")
    request_id = bindparam("claim_request_id", type_=UUID(as_uuid=True))
    claim = idempotency.claim_insert(
        select(gate.c.ready).where(gate.c.ready, request_id.isnot(None)).subquery("claimable"),
        null().cast(LargeBinary),  # the answer is stored once the row exists
    ).cte("claim")
    claimed = exists(select(claim.c.request_id))
    row = [gate.c.author_id if name == "author_id" else _param(name) for name in INSERT_COLUMNS]
    new = (
        insert(content)
        .from_select(
            list(INSERT_COLUMNS),
            select(*row).where(gate.c.ready, or_(request_id.is_(None), claimed)),
        )
        .on_conflict_do_nothing(index_elements=CONTENT_NATURAL_KEY)
        .returning(*COLUMNS)
        .cte("new")
    )
    entry = audit.entry_insert(new, _resource(new.c.id)).cte("entry")
    prior = idempotency.stored_select().cte("prior")
    return (
        select(
            *new.c,
            gate.c.ready,
            gate.c.linked_author,
            claimed.label("claimed"),
            prior.c.method.label("prior_method"),
            prior.c.request_hash.label("prior_request_hash"),
            prior.c.response.label("prior_response"),
        )
        .select_from(gate.outerjoin(new, true()).outerjoin(prior, true()))
        .add_cte(entry)
    )


_CREATE = PreparedStatement(_create_statement())


def _set_deleted_statement() -> Select[Any]:
    """Soft-deletes (`deleted` true) a live row or restores a deleted one, with
    its audit entry; no row when none in that state is in scope."""
    deleted = bindparam("deleted", type_=Boolean)
    changed = (
        content.update()
        .where(
            content.c.id == _param("id"),
            _IN_SCOPE,
            (content.c.delete_time.is_(None)) == deleted,
        )
        .values(delete_time=case((deleted, func.now()), else_=null()), update_time=func.now())
        .returning(*COLUMNS)
        .cte("changed")
    )
    entry = audit.entry_insert(changed, _resource(changed.c.id)).cte("entry")
    return select(*changed.c).add_cte(entry)


_SET_DELETED = PreparedStatement(_set_deleted_statement())


@functools.lru_cache(maxsize=64)
def _update_statement(columns: tuple[str, ...]) -> PreparedStatement:
    """Sets `columns` (parameters `set_<column>`) on the row `id`, with its
    audit entry, in one statement; compiled once per set of columns."""
    changes: dict[str, Any] = {
        name: bindparam(f"set_{name}", type_=content.c[name].type) for name in columns
    }
    changed = (
        content.update()
        .where(content.c.id == _param("id"))
        .values({**changes, "update_time": func.now()})
        .returning(*COLUMNS)
        .cte("changed")
    )
    entry = audit.entry_insert(changed, _resource(changed.c.id)).cte("entry")
    return PreparedStatement(select(*changed.c).add_cte(entry))


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
LOCK_ROUNDS = 5

_OWNER_HAS_PRESENCES = "SELECT EXISTS (SELECT 1 FROM actor_presences WHERE owner_id = $1)"
# The actors of the accounts ($2 platforms, $3 platform_user_ids) of owner $1.
_ACCOUNT_AUTHORS = (
    "SELECT p.platform, p.platform_user_id, p.actor_id FROM actor_presences p "
    "JOIN unnest($2::text[], $3::text[]) AS k(platform, account) "
    "ON p.platform = k.platform AND p.platform_user_id = k.account WHERE p.owner_id = $1"
)
_LOCK_ACCOUNT_AUTHORS = (
    "SELECT id FROM actors WHERE id IN "
    f"(SELECT actor_id FROM ({_ACCOUNT_AUTHORS}) a) ORDER BY id FOR KEY SHARE"
)

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
    for _ in range(LOCK_ROUNDS):
        locked.update(await lock())
        if set(await linked()) <= locked:
            return
    raise errors.Aborted("the authors' actors kept being merged; retry")


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


def _driver_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Column values as the driver takes them (JSONB as JSON text)."""
    if "raw_metadata" not in values:
        return dict(values)
    return {**values, "raw_metadata": json.dumps(values["raw_metadata"])}


_PLATFORM_AT, _PLATFORM_ID_AT, _PUBLISHED_AT = (
    INSERT_COLUMNS.index(column) for column in ("platform", "platform_id", "published_at")
)


def _natural_order(record: tuple[Any, ...]) -> tuple[Any, ...]:
    """An INSERT_COLUMNS record's place in the order rows of one owner are
    written in: by platform, platform_id (byte order, NULL last) and
    published_at, as ORDER BY platform COLLATE "C", platform_id COLLATE "C"
    NULLS LAST, published_at sorts them. (UTF-8's byte order is the code
    points' order, Python's for str.)"""
    platform_id = record[_PLATFORM_ID_AT]
    return (
        record[_PLATFORM_AT],
        platform_id is None,
        platform_id or "",
        record[_PUBLISHED_AT],
    )


class ContentRepository:
    def __init__(self, uow: UnitOfWork) -> None:
        self._conn = uow.conn
        self._driver = uow.driver

    async def by_ids(self, ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
        """The rows with these IDs, whoever owns them (the caller checks)."""
        return await _BY_IDS.fetch(self._driver, ids=list(ids))

    async def owned_ids(self, ids: Sequence[uuid.UUID], owner_id: uuid.UUID) -> set[uuid.UUID]:
        """Those of `ids` that are content rows of `owner_id` (deleted or not):
        for other domains that refer to content (a vector item's content_id)."""
        rows = await _OWNED_IDS.fetch(self._driver, ids=list(ids), owner_id=owner_id)
        return {row["id"] for row in rows}

    async def get(
        self, content_id: uuid.UUID, owner_id: uuid.UUID | None, *, for_update: bool = False
    ) -> asyncpg.Record | None:
        """One row by ID within `owner_id`'s rows (None: anyone's)."""
        statement = _GET_FOR_UPDATE if for_update else _GET_IN_SCOPE
        return await statement.fetchrow(self._driver, id=content_id, owner_scope=owner_id)

    async def create(
        self,
        values: Mapping[str, Any],
        *,
        locked: Sequence[uuid.UUID],
        request_id: uuid.UUID | None,
        digest: bytes,
        entry: Mapping[str, Any],
    ) -> asyncpg.Record:
        """Runs the CreateContent statement (see `_create_statement`): the new
        row's columns (all NULL when nothing was inserted), then `ready`,
        `linked_author`, `claimed` and the `prior_*` stored answer."""
        row = await _CREATE.fetchrow(
            self._driver,
            **_driver_values(values),
            locked=list(locked),
            claim_owner_id=values["owner_id"],
            claim_request_id=request_id,
            claim_method=CREATE_METHOD,
            claim_request_hash=digest,
            **entry,
        )
        assert row is not None
        return row

    async def lock_actors(self, ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """Takes FOR KEY SHARE on those of the actors `ids` that exist, in ID
        order (as merges lock them); returns their IDs."""
        return [row["id"] for row in await _LOCK_ACTORS.fetch(self._driver, ids=list(ids))]

    async def lock_own_actors(
        self, ids: Sequence[uuid.UUID], owner_id: uuid.UUID
    ) -> list[uuid.UUID]:
        """Like `lock_actors`, but only the actors of `owner_id`: those of `ids`
        that are not (another owner's, or none at all) are left out."""
        rows = await _LOCK_OWN_ACTORS.fetch(self._driver, ids=list(ids), owner_id=owner_id)
        return [row["id"] for row in rows]

    async def update(
        self, content_id: uuid.UUID, values: Mapping[str, Any], entry: Mapping[str, Any]
    ) -> asyncpg.Record | None:
        """Sets `values` on a row (locked by `get(for_update=True)`) and writes
        the audit entry `entry` (`audit.entry_params`), in one statement."""
        params = {f"set_{name}": value for name, value in _driver_values(values).items()}
        return await _update_statement(tuple(sorted(values))).fetchrow(
            self._driver, id=content_id, **params, **entry
        )

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
        self,
        content_id: uuid.UUID,
        owner_id: uuid.UUID | None,
        deleted: bool,
        entry: Mapping[str, Any],
    ) -> asyncpg.Record | None:
        """Soft-deletes (or restores) a live (or deleted) row in scope and writes
        the audit entry `entry`; None when no row in that state is in scope."""
        return await _SET_DELETED.fetchrow(
            self._driver, id=content_id, owner_scope=owner_id, deleted=deleted, **entry
        )

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

    # -- bulk ingest -------------------------------------------------------------
    # Each batch of a stream is COPYed straight into content when it can be (see
    # server.content.ingest); a batch the database refuses is COPYed into
    # STAGING_TABLE and moved into content from there, skipping natural-key
    # duplicates and isolating refused rows.

    async def owner_has_presences(self, owner_id: uuid.UUID) -> bool:
        """Whether any account of `owner_id` belongs to an actor (only then can
        an ingested row be linked to its author's actor)."""
        found: bool = await self._driver.fetchval(_OWNER_HAS_PRESENCES, owner_id)
        return found

    async def link_authors(
        self, owner_id: uuid.UUID, platforms: Sequence[str], accounts: Sequence[str]
    ) -> dict[tuple[str, str], uuid.UUID]:
        """The actor of each (platform, platform_user_id) account given that has
        one, holding FOR KEY SHARE on those actors until commit (see
        `_hold_linked_actors`)."""
        driver = self._driver
        found: dict[tuple[str, str], uuid.UUID] = {}
        args = (owner_id, list(platforms), list(accounts))

        async def locked() -> Iterable[uuid.UUID]:
            return [row["id"] for row in await driver.fetch(_LOCK_ACCOUNT_AUTHORS, *args)]

        async def linked() -> Iterable[uuid.UUID]:
            found.clear()
            for row in await driver.fetch(_ACCOUNT_AUTHORS, *args):
                found[(row["platform"], row["platform_user_id"])] = row["actor_id"]
            return found.values()

        await _hold_linked_actors(locked, linked)
        return found

    async def copy_in(self, records: Sequence[tuple[Any, ...]]) -> None:
        """COPYs `records` (INSERT_COLUMNS order, one owner's) straight into
        content, in binary. The database refuses the whole COPY for any row it
        refuses, a natural-key duplicate included. The rows go in by natural
        key, in the order `move_staged` writes: two writers of the same keys
        then wait for each other in one order instead of deadlocking."""
        await self._driver.copy_records_to_table(
            "content", records=sorted(records, key=_natural_order), columns=INSERT_COLUMNS
        )

    async def create_staging(self) -> None:
        """A session-private COPY target, dropped when the transaction ends. Each
        row carries its index in the stream, so a refused row can be named."""
        columns = ", ".join(INSERT_COLUMNS)
        await self._driver.execute(
            f"CREATE TEMP TABLE {STAGING_TABLE} ON COMMIT DROP AS "
            f"SELECT {columns}, 0::bigint AS stream_index FROM content WITH NO DATA"
        )

    async def stage(self, records: Sequence[tuple[Any, ...]]) -> None:
        """COPYs `records` (INSERT_COLUMNS, then the stream index), in binary."""
        await self._driver.copy_records_to_table(
            STAGING_TABLE, records=records, columns=(*INSERT_COLUMNS, "stream_index")
        )

    async def move_staged(self, first: int, last: int) -> int:
        """Inserts the staged rows with a stream index in [first, last] into
        content in one statement; returns how many were new (the rest clashed on
        the natural key). Raises the database's error when any row is refused."""
        driver = self._driver

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
            # In copy_in's order (see _natural_order).
            'ORDER BY s.platform COLLATE "C", s.platform_id COLLATE "C" NULLS LAST, '
            "s.published_at "
            f"ON CONFLICT ({', '.join(CONTENT_NATURAL_KEY)}) DO NOTHING",
            first,
            last,
        )
        return rows_affected(status)

    async def clear_staging(self) -> None:
        await self._driver.execute(f"TRUNCATE {STAGING_TABLE}")

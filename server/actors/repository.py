"""All SQL for actors. Never commits: the caller's unit of work does."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import (
    ColumnElement,
    Float,
    Integer,
    Select,
    Text,
    bindparam,
    column,
    func,
    literal,
    literal_column,
    select,
    text,
    tuple_,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID, aggregate_order_by, insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from server.actors.tables import PRESENCE_ACCOUNT_KEY, actor_aliases, actor_presences, actors
from server.db import PreparedStatement
from server.tables import content

_PRESENCE_COLUMNS = (
    "id",
    "actor_id",
    "platform",
    "platform_user_id",
    "username",
    "profile_url",
    "verified",
    "follower_count",
)


def _details(table: Any = actors) -> list[ColumnElement[Any]]:
    """An actor's columns plus its aliases (array) and presences (JSON array),
    each gathered by a correlated subquery on an index."""
    aliases = (
        select(actor_aliases.c.alias)
        .where(actor_aliases.c.actor_id == table.c.id)
        .order_by(func.lower(actor_aliases.c.alias), actor_aliases.c.alias)
    )
    pairs: list[ColumnElement[Any]] = []
    for name in _PRESENCE_COLUMNS:
        pairs += (literal_column(f"'{name}'"), actor_presences.c[name])
    presence_json = func.jsonb_build_object(*pairs)
    presences = (
        select(
            func.coalesce(
                func.jsonb_agg(
                    aggregate_order_by(
                        presence_json,
                        actor_presences.c.platform,
                        actor_presences.c.platform_user_id,
                    )
                ),
                literal_column("'[]'::jsonb"),
            )
        )
        .where(actor_presences.c.actor_id == table.c.id)
        .scalar_subquery()
    )
    return [
        *table.c,
        func.array(aliases.scalar_subquery()).label("aliases"),
        presences.label("presences"),
    ]


DETAILS = _details()

_GET_OWNED = PreparedStatement(
    select(*DETAILS).where(actors.c.id == bindparam("id"), actors.c.owner_id == bindparam("owner"))
)
_GET_ANY = PreparedStatement(select(*DETAILS).where(actors.c.id == bindparam("id")))


def _resolve_statement(*, by_username: bool, owned: bool) -> PreparedStatement:
    p = actor_presences.c
    match = (
        func.lower(p.username) == func.lower(bindparam("key"))
        if by_username
        else p.platform_user_id == bindparam("key")
    )
    account = select(p.actor_id).where(p.platform == bindparam("platform"), match)
    if owned:
        account = account.where(p.owner_id == bindparam("owner"))
    account = account.order_by(p.create_time.desc(), p.id.desc()).limit(literal_column("1"))
    return PreparedStatement(select(*DETAILS).where(actors.c.id == account.scalar_subquery()))


_RESOLVE = {
    (by_username, owned): _resolve_statement(by_username=by_username, owned=owned)
    for by_username in (False, True)
    for owned in (False, True)
}


async def lookup_actor(
    driver: asyncpg.Connection, actor_id: uuid.UUID, owner_id: uuid.UUID | None
) -> asyncpg.Record | None:
    """One actor with its aliases and presences, within `owner_id`'s rows
    unless None: GetActor's hot path, on a `Database.lookup()` connection."""
    if owner_id is None:
        return await _GET_ANY.fetchrow(driver, id=actor_id)
    return await _GET_OWNED.fetchrow(driver, id=actor_id, owner=owner_id)


async def resolve_actor(
    driver: asyncpg.Connection,
    owner_id: uuid.UUID | None,
    platform: str,
    *,
    platform_user_id: str | None = None,
    username: str | None = None,
) -> asyncpg.Record | None:
    """The actor behind an account, by its platform ID or else its username."""
    by_username = platform_user_id is None
    statement = _RESOLVE[(by_username, owner_id is not None)]
    params: dict[str, Any] = {
        "platform": platform,
        "key": username if by_username else platform_user_id,
    }
    if owner_id is not None:
        params["owner"] = owner_id
    return await statement.fetchrow(driver, **params)


async def find_candidates(
    driver: asyncpg.Connection,
    actor_id: uuid.UUID,
    owner_id: uuid.UUID | None,
    threshold: float,
    limit: int,
) -> list[asyncpg.Record]:
    """The best `limit` candidates (actor details, strategy 1..3, similarity,
    platforms); none when the actor is not visible to `owner_id`. Runs inside
    the caller's transaction, which the threshold setting is local to."""
    await driver.execute(SET_THRESHOLD_SQL, str(threshold))
    return await CANDIDATES.fetch(driver, actor_id=actor_id, owner=owner_id, limit=limit)


def escape_like(value: str) -> str:
    """`value` as a LIKE pattern that matches it literally (backslash escapes)."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True, slots=True)
class ActorQuery:
    """A validated ListActors filter plus the caller's scope (None: all owners)."""

    owner_id: uuid.UUID | None
    name_query: str | None = None
    actor_types: Sequence[str] = ()
    show_deleted: bool = False


# FindCandidateMatches: the best candidates of one actor (visible to :owner
# unless it is NULL), by strategy then similarity. The trigram strategy uses
# pg_trgm's % operator, which the GIN indexes on lower(canonical_name) and
# lower(alias) serve; its threshold is pg_trgm.similarity_threshold, set for
# the transaction just before (SET_THRESHOLD).
_CANDIDATES_SQL = """
WITH target AS (
  SELECT id, owner_id, lower(canonical_name) AS name FROM actors
   WHERE id = :actor_id AND (CAST(:owner AS uuid) IS NULL OR owner_id = CAST(:owner AS uuid))
),
names AS (
  SELECT name FROM target
  UNION
  SELECT lower(al.alias) FROM target t JOIN actor_aliases al ON al.actor_id = t.id
),
handles AS (
  SELECT DISTINCT lower(p.username) AS username
    FROM target t JOIN actor_presences p ON p.actor_id = t.id
   WHERE p.username IS NOT NULL
),
matches AS (
  SELECT a.id AS actor_id, 1 AS strategy, 1.0::real AS similarity
    FROM target t JOIN actors a ON a.owner_id = t.owner_id
   WHERE lower(a.canonical_name) IN (SELECT name FROM names)
  UNION ALL
  SELECT al.actor_id, 1, 1.0::real
    FROM target t JOIN actor_aliases al ON al.owner_id = t.owner_id
   WHERE lower(al.alias) IN (SELECT name FROM names)
  UNION ALL
  SELECT p.actor_id, 2, similarity(lower(a.canonical_name), t.name)
    FROM target t
    JOIN actor_presences p ON p.owner_id = t.owner_id
    JOIN actors a ON a.id = p.actor_id
   WHERE p.username IS NOT NULL AND lower(p.username) IN (SELECT username FROM handles)
  UNION ALL
  SELECT a.id, 3, similarity(lower(a.canonical_name), n.name)
    FROM target t CROSS JOIN names n
    JOIN actors a ON lower(a.canonical_name) % n.name
   WHERE a.owner_id = t.owner_id
  UNION ALL
  SELECT al.actor_id, 3, similarity(lower(al.alias), n.name)
    FROM target t CROSS JOIN names n
    JOIN actor_aliases al ON lower(al.alias) % n.name
   WHERE al.owner_id = t.owner_id
),
best AS (
  SELECT DISTINCT ON (m.actor_id) m.actor_id, m.strategy, m.similarity
    FROM matches m
   WHERE m.actor_id <> :actor_id
   ORDER BY m.actor_id, m.strategy, m.similarity DESC
)
SELECT b.actor_id, b.strategy, b.similarity,
       ARRAY(
         SELECT DISTINCT p.platform FROM actor_presences p
          WHERE p.actor_id = b.actor_id
            AND (b.strategy <> 2 OR lower(p.username) IN (SELECT username FROM handles))
          ORDER BY 1
       ) AS platforms
  FROM best b
 -- A subplan, not a join: one primary-key probe per candidate, never a scan.
 WHERE (SELECT a.delete_time IS NULL FROM actors a WHERE a.id = b.actor_id)
 ORDER BY b.strategy, b.similarity DESC, b.actor_id
 LIMIT :limit
"""
_candidates = (
    text(_CANDIDATES_SQL)
    .columns(
        column("actor_id", UUID(as_uuid=True)),
        column("strategy", Integer),
        column("similarity", Float),
        column("platforms", ARRAY(Text)),
    )
    .subquery("candidates")
)
# The candidates with their details, best first; parameters actor_id, owner, limit.
CANDIDATES = PreparedStatement(
    select(
        *DETAILS,
        _candidates.c.strategy,
        _candidates.c.similarity,
        _candidates.c.platforms.label("platforms"),
    )
    .join_from(actors, _candidates, actors.c.id == _candidates.c.actor_id)
    .order_by(_candidates.c.strategy, _candidates.c.similarity.desc(), actors.c.id)
)
SET_THRESHOLD_SQL = "SELECT set_config('pg_trgm.similarity_threshold', $1, true)"


class ActorRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    def _scoped(self, actor_id: uuid.UUID, owner_id: uuid.UUID | None) -> list[ColumnElement[bool]]:
        conditions = [actors.c.id == actor_id]
        if owner_id is not None:
            conditions.append(actors.c.owner_id == owner_id)
        return conditions

    async def get(
        self, actor_id: uuid.UUID, owner_id: uuid.UUID | None
    ) -> Mapping[Any, Any] | None:
        """The actor with aliases and presences, as this transaction sees it."""
        query = select(*DETAILS).where(*self._scoped(actor_id, owner_id))
        return (await self._conn.execute(query)).mappings().first()

    async def get_many(self, actor_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, RowMapping]:
        query = select(*DETAILS).where(actors.c.id.in_(actor_ids))
        return {row["id"]: row for row in (await self._conn.execute(query)).mappings()}

    async def lock(
        self,
        actor_ids: Sequence[uuid.UUID],
        owner_id: uuid.UUID | None,
        *,
        relinking: bool = False,
    ) -> list[RowMapping]:
        """Locks the visible actors among `actor_ids` for this transaction, in
        ID order (so overlapping lockers queue instead of deadlocking); an actor
        removed meanwhile by another transaction is simply not returned.

        `relinking` (merge, split: presences change hands and content is
        re-pointed) takes FOR UPDATE, which waits for content writers holding
        FOR KEY SHARE on the actors they link rows to; other changes take FOR
        NO KEY UPDATE, which does not."""
        query = select(
            actors.c.id,
            actors.c.owner_id,
            actors.c.canonical_name,
            actors.c.actor_type,
            actors.c.delete_time,
        ).where(actors.c.id.in_(actor_ids))
        if owner_id is not None:
            query = query.where(actors.c.owner_id == owner_id)
        query = query.order_by(actors.c.id).with_for_update(key_share=not relinking)
        return list((await self._conn.execute(query)).mappings())

    async def touch(self, actor_id: uuid.UUID) -> None:
        await self._conn.execute(
            actors.update().where(actors.c.id == actor_id).values(update_time=func.now())
        )

    async def insert(self, values: dict[str, Any]) -> uuid.UUID:
        statement = actors.insert().values(**values).returning(actors.c.id)
        return (await self._conn.execute(statement)).scalar_one()  # type: ignore[no-any-return]

    async def update(self, actor_id: uuid.UUID, values: dict[str, Any]) -> None:
        await self._conn.execute(
            actors.update().where(actors.c.id == actor_id).values(**values, update_time=func.now())
        )

    async def set_deleted(
        self, actor_id: uuid.UUID, owner_id: uuid.UUID | None, deleted: bool
    ) -> bool:
        """Soft-deletes (or restores) a live (or deleted) actor; False when no
        actor in that state exists."""
        state = actors.c.delete_time.is_(None) if deleted else actors.c.delete_time.isnot(None)
        statement = (
            actors.update()
            .where(*self._scoped(actor_id, owner_id), state)
            .values(delete_time=func.now() if deleted else None, update_time=func.now())
            .returning(actors.c.id)
        )
        return (await self._conn.execute(statement)).first() is not None

    async def find_page(
        self, q: ActorQuery, *, after: tuple[str, uuid.UUID] | None, limit: int
    ) -> list[RowMapping]:
        query: Select[Any] = select(*DETAILS)
        if q.owner_id is not None:
            query = query.where(actors.c.owner_id == q.owner_id)
        if not q.show_deleted:
            query = query.where(actors.c.delete_time.is_(None))
        if q.actor_types:
            query = query.where(actors.c.actor_type.in_(q.actor_types))
        if q.name_query:
            pattern = "%" + escape_like(q.name_query) + "%"
            query = query.where(func.lower(actors.c.canonical_name).like(func.lower(pattern)))
        if after is not None:
            query = query.where(tuple_(actors.c.canonical_name, actors.c.id) > tuple_(*after))
        query = query.order_by(actors.c.canonical_name, actors.c.id).limit(limit)
        return list((await self._conn.execute(query)).mappings())

    # -- aliases and presences ---------------------------------------------------

    async def add_alias(self, actor_id: uuid.UUID, owner_id: uuid.UUID, alias: str) -> bool:
        """False when the actor already had the alias (in any case)."""
        statement = (
            insert(actor_aliases)
            .values(actor_id=actor_id, owner_id=owner_id, alias=alias)
            .on_conflict_do_nothing(
                index_elements=[actor_aliases.c.actor_id, func.lower(actor_aliases.c.alias)]
            )
            .returning(actor_aliases.c.actor_id)
        )
        return (await self._conn.execute(statement)).first() is not None

    async def upsert_presence(self, values: dict[str, Any]) -> RowMapping | None:
        """Adds the account to values["actor_id"], or refreshes it when that
        actor has it already; None when another actor of the owner has it."""
        statement = insert(actor_presences).values(**values)
        changes = {
            name: statement.excluded[name]
            for name in ("username", "profile_url", "verified", "follower_count")
        }
        upsert = statement.on_conflict_do_update(
            index_elements=PRESENCE_ACCOUNT_KEY,
            set_={**changes, "update_time": func.now()},
            where=actor_presences.c.actor_id == statement.excluded.actor_id,
        ).returning(*(actor_presences.c[name] for name in _PRESENCE_COLUMNS))
        return (await self._conn.execute(upsert)).mappings().first()

    async def presence_actor(
        self, presence_id: uuid.UUID, owner_id: uuid.UUID | None
    ) -> uuid.UUID | None:
        query = select(actor_presences.c.actor_id).where(actor_presences.c.id == presence_id)
        if owner_id is not None:
            query = query.where(actor_presences.c.owner_id == owner_id)
        return (await self._conn.execute(query)).scalar()

    async def delete_presence(self, presence_id: uuid.UUID, actor_id: uuid.UUID) -> bool:
        result = await self._conn.execute(
            actor_presences.delete().where(
                actor_presences.c.id == presence_id, actor_presences.c.actor_id == actor_id
            )
        )
        return bool(result.rowcount)

    async def presences_of(
        self, actor_id: uuid.UUID, presence_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]:
        """Which of `presence_ids` belong to the actor."""
        query = select(actor_presences.c.id).where(
            actor_presences.c.actor_id == actor_id, actor_presences.c.id.in_(presence_ids)
        )
        return set((await self._conn.execute(query)).scalars())

    # -- entity resolution -------------------------------------------------------

    # -- merge and split ---------------------------------------------------------

    async def copy_names_as_aliases(
        self, canonical_id: uuid.UUID, owner_id: uuid.UUID, sources: Sequence[uuid.UUID]
    ) -> None:
        """The sources' canonical names and aliases become the canonical's
        aliases (except its own name; existing aliases are kept as they are)."""
        names = union_all(
            select(actors.c.canonical_name.label("name")).where(actors.c.id.in_(sources)),
            select(actor_aliases.c.alias).where(actor_aliases.c.actor_id.in_(sources)),
        ).subquery("names")
        own_name = (
            select(func.lower(actors.c.canonical_name))
            .where(actors.c.id == canonical_id)
            .scalar_subquery()
        )
        statement = (
            insert(actor_aliases)
            .from_select(
                ["actor_id", "owner_id", "alias"],
                select(literal(canonical_id), literal(owner_id), names.c.name).where(
                    func.lower(names.c.name) != own_name
                ),
            )
            .on_conflict_do_nothing(
                index_elements=[actor_aliases.c.actor_id, func.lower(actor_aliases.c.alias)]
            )
        )
        await self._conn.execute(statement)

    async def move_presences(
        self,
        to_actor: uuid.UUID,
        *,
        from_actors: Sequence[uuid.UUID] = (),
        presence_ids: Sequence[uuid.UUID] = (),
    ) -> int:
        condition = (
            actor_presences.c.actor_id.in_(from_actors)
            if from_actors
            else actor_presences.c.id.in_(presence_ids)
        )
        result = await self._conn.execute(
            actor_presences.update()
            .where(condition)
            .values(actor_id=to_actor, update_time=func.now())
        )
        return int(result.rowcount)

    async def repoint_content(
        self,
        owner_id: uuid.UUID,
        from_actors: Sequence[uuid.UUID],
        to_actor: uuid.UUID,
        *,
        accounts_of: Sequence[uuid.UUID] = (),
    ) -> int:
        """Sets author_id to `to_actor` on the owner's content by `from_actors`;
        with `accounts_of` (presence IDs), only on content by those accounts."""
        statement = content.update().where(
            content.c.owner_id == owner_id, content.c.author_id.in_(from_actors)
        )
        if accounts_of:
            accounts = select(actor_presences.c.platform, actor_presences.c.platform_user_id).where(
                actor_presences.c.id.in_(accounts_of)
            )
            statement = statement.where(
                tuple_(content.c.platform, content.c.author_platform_id).in_(accounts)
            )
        result = await self._conn.execute(
            statement.values(author_id=to_actor, update_time=func.now())
        )
        return int(result.rowcount)

    async def delete_for_good(self, actor_ids: Sequence[uuid.UUID]) -> None:
        """Removes the actors, their aliases and any presences left on them."""
        await self._conn.execute(actors.delete().where(actors.c.id.in_(actor_ids)))

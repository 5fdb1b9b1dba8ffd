"""All SQL for actors. Never commits: the caller's unit of work does.

The hot statements (the point reads, the lock, the create, the candidate
search) are prepared driver statements; the rest go through SQLAlchemy Core on
the same connection and transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import (
    ColumnElement,
    Float,
    Integer,
    LargeBinary,
    Select,
    Text,
    any_,
    bindparam,
    cast,
    column,
    exists,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
    tuple_,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID, aggregate_order_by, insert
from sqlalchemy.engine import RowMapping

from server import audit, idempotency
from server.actors.tables import (
    ALIAS_KEY,
    PRESENCE_ACCOUNT_KEY,
    actor_aliases,
    actor_presences,
    actors,
)
from server.db import PreparedStatement
from server.uow import UnitOfWork

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
_UUIDS = ARRAY(UUID(as_uuid=True))


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

# The actors of :ids with their details, whoever owns them (GetActor's
# coalesced read; the service checks tenancy), and the one of :id. A batch of
# one key has a statement of its own: PostgreSQL plans `= ANY($1)` anew for
# every call whose array has one element (its generic plan assumes ten, so it
# looks dearer than a custom one), while `= $1` is planned once per connection.
_BY_IDS = PreparedStatement(
    select(*DETAILS).where(actors.c.id == any_(bindparam("ids", type_=_UUIDS)))
)
_BY_ID = PreparedStatement(select(*DETAILS).where(actors.c.id == bindparam("id")))


class AccountKey(NamedTuple):
    """ResolveActor's question: the actor behind an account of `platform`, by
    its platform user ID or else its username, among `owner_id`'s actors (None:
    among everyone's)."""

    owner_id: uuid.UUID | None
    platform: str
    platform_user_id: str | None
    username: str | None


# For each key (the four arrays, element by element) the actor of its latest
# matching account. Each branch is one index probe; the owner's branches find
# nothing when the owner is NULL and the others run only then, so the key's
# owner scope is part of the question, not a filter applied afterwards.
_ACCOUNTS_SQL = """
SELECT k.owner_id AS key_owner_id, k.platform AS key_platform,
       k.platform_user_id AS key_platform_user_id, k.username AS key_username,
       m.actor_id
  FROM unnest(CAST(:owners AS uuid[]), CAST(:platforms AS text[]),
              CAST(:platform_user_ids AS text[]), CAST(:usernames AS text[]))
       AS k(owner_id, platform, platform_user_id, username)
 CROSS JOIN LATERAL (
   SELECT p.actor_id, p.create_time, p.id FROM actor_presences p
    WHERE p.owner_id = k.owner_id AND p.platform = k.platform
      AND p.platform_user_id = k.platform_user_id
   UNION ALL
   SELECT p.actor_id, p.create_time, p.id FROM actor_presences p
    WHERE p.owner_id = k.owner_id AND p.username IS NOT NULL
      AND lower(p.username) = lower(k.username) AND p.platform = k.platform
   UNION ALL
   SELECT p.actor_id, p.create_time, p.id FROM actor_presences p
    WHERE k.owner_id IS NULL AND p.platform = k.platform
      AND p.platform_user_id = k.platform_user_id
   UNION ALL
   SELECT p.actor_id, p.create_time, p.id FROM actor_presences p
    WHERE k.owner_id IS NULL AND p.username IS NOT NULL
      AND lower(p.username) = lower(k.username) AND p.platform = k.platform
   ORDER BY create_time DESC, id DESC
   LIMIT 1
 ) m
"""
_accounts = (
    text(_ACCOUNTS_SQL)
    .columns(
        column("key_owner_id", UUID(as_uuid=True)),
        column("key_platform", Text),
        column("key_platform_user_id", Text),
        column("key_username", Text),
        column("actor_id", UUID(as_uuid=True)),
    )
    .subquery("accounts")
)
_BY_ACCOUNTS = PreparedStatement(
    select(
        *DETAILS,
        _accounts.c.key_owner_id,
        _accounts.c.key_platform,
        _accounts.c.key_platform_user_id,
        _accounts.c.key_username,
    ).join_from(actors, _accounts, actors.c.id == _accounts.c.actor_id)
)


def _account_statement(*, by_username: bool, owned: bool) -> PreparedStatement:
    """_BY_ACCOUNTS for one key of one kind (see _BY_ID for why): the one branch
    that can match, so that its plan is made once per connection."""
    p = actor_presences.c
    platform = bindparam("platform", type_=Text)
    owner = bindparam("owner_id", type_=UUID(as_uuid=True)) if owned else null()
    platform_user_id = null() if by_username else bindparam("platform_user_id", type_=Text)
    username = bindparam("username", type_=Text) if by_username else null()
    account = select(p.actor_id).where(p.platform == platform)
    if owned:
        account = account.where(p.owner_id == owner)
    if by_username:
        account = account.where(
            p.username.isnot(None), func.lower(p.username) == func.lower(username)
        )
    else:
        account = account.where(p.platform_user_id == platform_user_id)
    account = account.order_by(p.create_time.desc(), p.id.desc()).limit(literal_column("1"))
    return PreparedStatement(
        select(
            *DETAILS,
            cast(owner, UUID(as_uuid=True)).label("key_owner_id"),
            platform.label("key_platform"),
            cast(platform_user_id, Text).label("key_platform_user_id"),
            cast(username, Text).label("key_username"),
        ).where(actors.c.id == account.scalar_subquery())
    )


_BY_ACCOUNT = {
    (by_username, owned): _account_statement(by_username=by_username, owned=owned)
    for by_username in (False, True)
    for owned in (False, True)
}


def account_statement(key: AccountKey) -> PreparedStatement:
    """The statement that answers `key` alone (its parameters: the key's fields)."""
    return _BY_ACCOUNT[(key.platform_user_id is None, key.owner_id is not None)]


def account_key(row: asyncpg.Record) -> AccountKey:
    """The question a `by_accounts` row answers."""
    return AccountKey(
        row["key_owner_id"], row["key_platform"], row["key_platform_user_id"], row["key_username"]
    )


# FindCandidateMatches: the best candidates of one actor (visible to :owner
# unless it is NULL), by strategy then similarity. The trigram strategy uses
# pg_trgm's % operator, which the GIN indexes on lower(canonical_name) and
# lower(alias) serve; its threshold is the session's
# pg_trgm.similarity_threshold (THRESHOLD_SETTING). No row at all when the actor
# is not visible; one row of NULLs when it is but nothing matches.
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
SELECT c.actor_id, c.strategy, c.similarity, c.platforms
  FROM target
  LEFT JOIN LATERAL (
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
  ) c ON true
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
# Its trigram threshold is the session setting THRESHOLD_SETTING.
THRESHOLD_SETTING = "pg_trgm.similarity_threshold"
CANDIDATES = PreparedStatement(
    select(
        *DETAILS,
        _candidates.c.strategy,
        _candidates.c.similarity,
        _candidates.c.platforms.label("platforms"),
    )
    .select_from(_candidates.outerjoin(actors, actors.c.id == _candidates.c.actor_id))
    .order_by(_candidates.c.strategy, _candidates.c.similarity.desc(), _candidates.c.actor_id)
)


def _lock_statement(*, relinking: bool) -> PreparedStatement:
    owner = bindparam("owner", type_=UUID(as_uuid=True))
    return PreparedStatement(
        select(
            actors.c.id,
            actors.c.owner_id,
            actors.c.canonical_name,
            actors.c.actor_type,
            actors.c.delete_time,
        )
        .where(
            actors.c.id == any_(bindparam("ids", type_=_UUIDS)),
            or_(owner.is_(None), actors.c.owner_id == owner),
        )
        .order_by(actors.c.id)
        .with_for_update(key_share=not relinking)
    )


_LOCK = {relinking: _lock_statement(relinking=relinking) for relinking in (False, True)}


def _create_statement(*, claimed: bool) -> PreparedStatement:
    """CreateActor in one statement: the actor and its audit entry and, when
    `claimed`, the claim of the request ID with its stored answer (the new ID
    and create time, as JSON); the actor is inserted only when the claim is.
    Returns the new actor's id and create_time, or nothing when the request ID
    was taken."""
    fresh = select(func.uuidv7().label("id")).cte("fresh")
    values = select(
        fresh.c.id,
        bindparam("new_owner", type_=UUID(as_uuid=True)),
        bindparam("new_name", type_=Text),
        bindparam("new_type", type_=Text),
        bindparam("new_description", type_=Text),
        bindparam("new_metadata", type_=JSONB),
    )
    if claimed:
        answer = func.convert_to(
            cast(
                func.json_build_object(
                    literal_column("'id'"),
                    fresh.c.id,
                    literal_column("'create_time'"),
                    func.now(),
                ),
                Text,
            ),
            literal_column("'UTF8'"),
            type_=LargeBinary,
        )
        claim = idempotency.claim_insert(fresh, answer).cte("claim")
        values = values.where(exists(select(claim.c.request_id)))
    created = (
        actors.insert()
        .from_select(
            ["id", "owner_id", "canonical_name", "actor_type", "description", "metadata"], values
        )
        .returning(actors.c.id, actors.c.create_time)
        .cte("created")
    )
    entry = audit.entry_insert(
        created, literal_column("'actors/'", Text) + cast(created.c.id, Text)
    ).cte("audit")
    return PreparedStatement(select(created.c.id, created.c.create_time).add_cte(entry))


_CREATE = {claimed: _create_statement(claimed=claimed) for claimed in (False, True)}


def read_create_answer(answer: bytes) -> tuple[uuid.UUID, datetime]:
    """The new actor's id and create_time from the answer `create` stored."""
    first = json.loads(answer)
    return uuid.UUID(first["id"]), datetime.fromisoformat(first["create_time"])


def _scope(owner_id: uuid.UUID | None) -> list[ColumnElement[bool]]:
    """The rows `owner_id` may see (None: an admin, everyone's)."""
    return [] if owner_id is None else [actors.c.owner_id == owner_id]


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


class ActorRepository:
    def __init__(self, uow: UnitOfWork) -> None:
        self._uow = uow
        self._conn = uow.conn
        self._driver = uow.driver

    # -- reads -------------------------------------------------------------------

    async def by_ids(self, actor_ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
        """The actors of `actor_ids` that exist, with aliases and presences,
        whoever owns them."""
        if len(actor_ids) == 1:
            return await _BY_ID.fetch(self._driver, id=actor_ids[0])
        return await _BY_IDS.fetch(self._driver, ids=actor_ids)

    async def get(self, actor_id: uuid.UUID) -> asyncpg.Record | None:
        """One actor with aliases and presences, as this unit sees it."""
        return await _BY_ID.fetchrow(self._driver, id=actor_id)

    async def by_accounts(self, keys: Sequence[AccountKey]) -> list[asyncpg.Record]:
        """For each key that has one, the actor of its latest matching account
        (with aliases and presences, and the key's fields: see `account_key`)."""
        if len(keys) == 1:
            return await account_statement(keys[0]).fetch(self._driver, **keys[0]._asdict())
        return await _BY_ACCOUNTS.fetch(
            self._driver,
            owners=[key.owner_id for key in keys],
            platforms=[key.platform for key in keys],
            platform_user_ids=[key.platform_user_id for key in keys],
            usernames=[key.username for key in keys],
        )

    async def candidates(
        self, actor_id: uuid.UUID, owner_id: uuid.UUID | None, threshold: float, limit: int
    ) -> list[asyncpg.Record] | None:
        """The best `limit` candidates (actor details, strategy 1..3, similarity,
        platforms), or None when the actor is not visible to `owner_id`."""
        await self._uow.use_settings({THRESHOLD_SETTING: str(threshold)})
        rows = await CANDIDATES.fetch(self._driver, actor_id=actor_id, owner=owner_id, limit=limit)
        if not rows:
            return None
        return [row for row in rows if row["id"] is not None]

    async def find_page(
        self, q: ActorQuery, *, after: tuple[str, uuid.UUID] | None, limit: int
    ) -> list[RowMapping]:
        query: Select[Any] = select(*DETAILS).where(*_scope(q.owner_id))
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

    # -- actors ------------------------------------------------------------------

    async def lock(
        self,
        actor_ids: Sequence[uuid.UUID],
        owner_id: uuid.UUID | None,
        *,
        relinking: bool = False,
    ) -> list[asyncpg.Record]:
        """Locks the visible actors among `actor_ids` for this transaction, in
        ID order (so overlapping lockers queue instead of deadlocking); an actor
        removed meanwhile by another transaction is simply not returned.

        `relinking` (merge, split: presences change hands and content is
        re-pointed) takes FOR UPDATE, which waits for content writers holding
        FOR KEY SHARE on the actors they link rows to; other changes take FOR
        NO KEY UPDATE, which does not."""
        return await _LOCK[relinking].fetch(self._driver, ids=actor_ids, owner=owner_id)

    async def create(
        self,
        values: Mapping[str, Any],
        audit_params: Mapping[str, Any],
        claim_params: Mapping[str, Any] | None,
    ) -> asyncpg.Record | None:
        """Inserts an actor (`values`: owner_id and the writable columns) with
        its audit entry; with `claim_params` (see idempotency.claim_params) only
        when that request ID is free, storing the answer with the claim. The new
        actor's id and create_time, or None when the request ID was taken."""
        return await _CREATE[claim_params is not None].fetchrow(
            self._driver,
            new_owner=values["owner_id"],
            new_name=values["canonical_name"],
            new_type=values["actor_type"],
            new_description=values["description"],
            new_metadata=json.dumps(values["metadata"]),
            **audit_params,
            **(claim_params or {}),
        )

    async def touch(self, actor_id: uuid.UUID) -> None:
        await self._conn.execute(
            actors.update().where(actors.c.id == actor_id).values(update_time=func.now())
        )

    async def insert(self, values: dict[str, Any]) -> uuid.UUID:
        statement = actors.insert().values(**values).returning(actors.c.id)
        return (await self._conn.execute(statement)).scalar_one()  # type: ignore[no-any-return]

    async def update(
        self,
        actor_id: uuid.UUID,
        owner_id: uuid.UUID | None,
        values: Mapping[str, Any],
        audit_params: Mapping[str, Any],
    ) -> RowMapping | None:
        """Changes the columns in `values` of a live actor visible to
        `owner_id` (None: anyone's) and writes its audit entry (see
        audit.entry_params), in one statement. The changed actor with aliases
        and presences, or None when no such live actor is there."""
        return await self._change(
            [actors.c.id == actor_id, actors.c.delete_time.is_(None), *_scope(owner_id)],
            {**values, "update_time": func.now()},
            audit_params,
        )

    async def set_deleted(
        self,
        actor_id: uuid.UUID,
        owner_id: uuid.UUID | None,
        deleted: bool,
        audit_params: Mapping[str, Any],
    ) -> RowMapping | None:
        """Soft-deletes (or restores) a live (or deleted) actor visible to
        `owner_id`, with its audit entry, in one statement; None when no actor
        in that state is there."""
        state = actors.c.delete_time.is_(None) if deleted else actors.c.delete_time.isnot(None)
        return await self._change(
            [actors.c.id == actor_id, state, *_scope(owner_id)],
            {"delete_time": func.now() if deleted else None, "update_time": func.now()},
            audit_params,
        )

    async def _change(
        self,
        conditions: Sequence[ColumnElement[bool]],
        values: Mapping[str, Any],
        audit_params: Mapping[str, Any],
    ) -> RowMapping | None:
        changed = (
            actors.update().where(*conditions).values(**values).returning(*actors.c).cte("changed")
        )
        entry = audit.entry_insert(
            changed, literal_column("'actors/'", Text) + cast(changed.c.id, Text)
        ).cte("audit")
        statement = select(*_details(changed)).add_cte(entry)
        return (await self._conn.execute(statement, dict(audit_params))).mappings().first()

    # -- aliases and presences ---------------------------------------------------

    async def add_alias(self, actor_id: uuid.UUID, owner_id: uuid.UUID, alias: str) -> bool:
        """False when the actor already had the alias (in any case)."""
        statement = (
            insert(actor_aliases)
            .values(actor_id=actor_id, owner_id=owner_id, alias=alias)
            .on_conflict_do_nothing(index_elements=ALIAS_KEY)
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

    async def accounts_of(
        self, actor_id: uuid.UUID, presence_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[str, str]]:
        """Which of `presence_ids` belong to the actor, with their accounts
        (platform, platform user ID)."""
        query = select(
            actor_presences.c.id, actor_presences.c.platform, actor_presences.c.platform_user_id
        ).where(actor_presences.c.actor_id == actor_id, actor_presences.c.id.in_(presence_ids))
        return {
            row.id: (row.platform, row.platform_user_id) for row in await self._conn.execute(query)
        }

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
            .on_conflict_do_nothing(index_elements=ALIAS_KEY)
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

    async def delete_for_good(self, actor_ids: Sequence[uuid.UUID]) -> None:
        """Removes the actors, their aliases and any presences left on them."""
        await self._conn.execute(actors.delete().where(actors.c.id.in_(actor_ids)))

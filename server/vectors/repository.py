"""All SQL for vectors, run on the caller's unit of work; nothing here begins
or commits.

Storage: `vector_items` is LIST-partitioned by collection. CreateCollection
makes the collection's partition and, on it, an HNSW index over the
expression `(embedding::vector(D))` (or `(embedding_half::halfvec(D))`) with
the collection's operator class, m and ef_construction. Every search names
the partition itself, and index searches order by exactly that expression, so
PostgreSQL uses the collection's own index (tests/vectors/test_search.py
checks the plan). Exact searches order by the bare column instead, which no
index matches. Partition and index names derive from the collection's
server-generated UUID; dimensions, m and ef_construction are validated ints;
no client text ever reaches the SQL other than as a bind parameter.
"""

from __future__ import annotations

import json
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import asyncpg
from pgvector import HalfVector, Vector
from sqlalchemy import bindparam, select, tuple_
from sqlalchemy.dialects.postgresql import insert

from server.db import PreparedStatement, rows_affected
from server.uow import UnitOfWork
from server.vectors.tables import vector_collections

# pgvector's operator and HNSW operator-class suffix per metric.
_OPERATORS = {"cosine": "<=>", "l2": "<->", "inner_product": "<#>"}
_OPCLASS_SUFFIX = {"cosine": "cosine_ops", "l2": "l2_ops", "inner_product": "ip_ops"}
# The column and SQL type per precision.
_STORAGE = {"float32": ("embedding", "vector"), "float16": ("embedding_half", "halfvec")}

STAGING_TABLE = "vector_upsert"
STAGED_COLUMNS = (
    "id",
    "embedding",
    "embedding_half",
    "text",
    "metadata",
    "content_id",
    "url",
    "url_normalized",
)
# What a hit carries besides its distance; vector and metadata on request.
_HIT_COLUMNS = ("id", "text", "content_id", "url")

# The session settings every index search states (the pooled connection keeps
# them, see UnitOfWork.use_settings; only ef_search varies, so consecutive
# searches on a connection cost no extra round trip). Iterative scans let a
# filter that discards candidates still yield top_k: the scan goes on, in
# relaxed order (hits are sorted again outside), until it has top_k or has
# visited MAX_SCAN_TUPLES tuples; a search that comes up short then falls back
# to scoring every match exactly (see `nearest_sql`), so the bound caps only
# the index scan's wasted work, never the answer.
DEFAULT_EF_SEARCH = 40
MAX_SCAN_TUPLES = 20_000
SCAN_MEM_MULTIPLIER = 2
_SCAN_SETTINGS = {
    "hnsw.iterative_scan": "relaxed_order",
    "hnsw.max_scan_tuples": str(MAX_SCAN_TUPLES),
    "hnsw.scan_mem_multiplier": str(SCAN_MEM_MULTIPLIER),
}


@lru_cache(maxsize=64)
def index_search_settings(ef_search: int = DEFAULT_EF_SEARCH) -> Mapping[str, str]:
    """Every hnsw setting an index search depends on, for `use_settings`."""
    return {"hnsw.ef_search": str(int(ef_search)), **_SCAN_SETTINGS}


@dataclass(frozen=True, slots=True)
class CollectionSpec:
    """A collection's row: everything the SQL for its items is derived from."""

    id: uuid.UUID
    owner_id: uuid.UUID
    name: str
    dimension: int
    metric: str
    precision: str
    hnsw_m: int
    hnsw_ef_construction: int
    create_time: datetime

    @classmethod
    def from_row(cls, row: Any) -> CollectionSpec:
        return cls(**{name: row[name] for name in cls.__slots__})

    @property
    def partition(self) -> str:
        """The quoted name of the collection's items partition."""
        return f'"vector_items_{self.id.hex}"'

    @property
    def index_name(self) -> str:
        return f'"vector_items_{self.id.hex}_hnsw"'

    @property
    def column(self) -> str:
        return _STORAGE[self.precision][0]

    @property
    def indexed_expression(self) -> str:
        """The expression the HNSW index is built on; searches order by it."""
        column, sql_type = _STORAGE[self.precision]
        return f"({column}::{sql_type}({int(self.dimension)}))"

    @property
    def operator(self) -> str:
        return _OPERATORS[self.metric]

    @property
    def operator_class(self) -> str:
        return f"{_STORAGE[self.precision][1]}_{_OPCLASS_SUFFIX[self.metric]}"


# Connections that have pgvector's binary codecs (they live as long as it).
_codecs_ready: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()


async def with_vector_codecs(uow: UnitOfWork) -> UnitOfWork:
    """`uow` with binary codecs for vector and halfvec on its connection:
    registered once per pooled connection (two type look-ups), a set
    membership test afterwards."""
    driver = uow.driver
    if driver not in _codecs_ready:
        await driver.set_type_codec(
            "vector",
            schema="public",
            encoder=lambda v: (v if isinstance(v, Vector) else Vector(v)).to_binary(),
            decoder=Vector.from_binary,
            format="binary",
        )
        await driver.set_type_codec(
            "halfvec",
            schema="public",
            encoder=lambda v: (v if isinstance(v, HalfVector) else HalfVector(v)).to_binary(),
            decoder=HalfVector.from_binary,
            format="binary",
        )
        _codecs_ready.add(driver)
    return uow


_FIND_COLLECTION = PreparedStatement(
    select(vector_collections).where(
        vector_collections.c.owner_id == bindparam("owner_id"),
        vector_collections.c.name == bindparam("name"),
    )
)
# Items per collection, pruned to those collections' partitions.
COUNT_ITEMS = (
    "SELECT collection_id, count(*) AS count FROM vector_items "
    "WHERE collection_id = ANY($1::uuid[]) GROUP BY collection_id"
)
# Coalesced look-ups (server.coalesce.PointReads): by (owner_id, name) pairs.
_COLLECTIONS_BY_KEY = (
    "SELECT c.* FROM unnest($1::uuid[], $2::text[]) AS k(owner_id, name) "
    "JOIN vector_collections AS c ON c.owner_id = k.owner_id AND c.name = k.name"
)
# Items by (collection_id, id) pairs across collections: `collection_id =
# ANY` prunes to those collections' partitions (a join would scan them all);
# the rows of other pairs of the cross product are ignored by the caller. Both
# vector columns (one of them null): the caller picks what the request asked for.
ITEMS_BY_KEY = (
    "SELECT collection_id, id, text, metadata, content_id, url, embedding, embedding_half "
    "FROM vector_items WHERE collection_id = ANY($1::uuid[]) AND id = ANY($2::text[])"
)


async def collections_by_key(
    uow: UnitOfWork, keys: Sequence[tuple[uuid.UUID, str]]
) -> list[asyncpg.Record]:
    """The collections of those (owner_id, name) pairs that exist."""
    return list(
        await uow.driver.fetch(
            _COLLECTIONS_BY_KEY, [owner for owner, _ in keys], [name for _, name in keys]
        )
    )


async def items_by_key(
    uow: UnitOfWork, keys: Sequence[tuple[uuid.UUID, str]]
) -> list[asyncpg.Record]:
    """The items of those (collection_id, id) pairs that exist (and maybe
    others of the same collections and ids), any owner's: the caller knows the
    collection is theirs."""
    await with_vector_codecs(uow)
    collections = list({collection for collection, _ in keys})
    return list(await uow.driver.fetch(ITEMS_BY_KEY, collections, [item for _, item in keys]))


class CollectionRepository:
    """Collections, their partitions and indexes, and item writes."""

    def __init__(self, uow: UnitOfWork) -> None:
        self._uow = uow

    async def insert(self, values: dict[str, Any]) -> CollectionSpec | None:
        """The new collection, or None when the owner already has that name."""
        statement = (
            insert(vector_collections)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["owner_id", "name"])
            .returning(*vector_collections.c)
        )
        row = (await self._uow.conn.execute(statement)).mappings().first()
        return None if row is None else CollectionSpec.from_row(row)

    async def find(self, owner_id: uuid.UUID, name: str) -> CollectionSpec | None:
        row = await _FIND_COLLECTION.fetchrow(self._uow.driver, owner_id=owner_id, name=name)
        return None if row is None else CollectionSpec.from_row(row)

    async def count_items(self, spec: CollectionSpec) -> int:
        """How many items the collection holds (one statement on its partition)."""
        count: int = await self._uow.driver.fetchval(f"SELECT count(*) FROM {spec.partition}")
        return count

    async def count_items_of(self, specs: Sequence[CollectionSpec]) -> dict[uuid.UUID, int]:
        """Items per collection, for those of `specs` that have any (one
        statement, pruned to their partitions)."""
        rows = await self._uow.driver.fetch(COUNT_ITEMS, [spec.id for spec in specs])
        return {row["collection_id"]: row["count"] for row in rows}

    async def lock(self, owner_id: uuid.UUID, name: str) -> CollectionSpec | None:
        """One collection, key-share locked until the transaction ends: it
        cannot be deleted meanwhile, while concurrent writers still pass."""
        query = (
            select(vector_collections)
            .where(vector_collections.c.owner_id == owner_id, vector_collections.c.name == name)
            .with_for_update(key_share=True)
        )
        row = (await self._uow.conn.execute(query)).mappings().first()
        return None if row is None else CollectionSpec.from_row(row)

    async def delete(self, owner_id: uuid.UUID, name: str) -> CollectionSpec | None:
        statement = (
            vector_collections.delete()
            .where(vector_collections.c.owner_id == owner_id, vector_collections.c.name == name)
            .returning(*vector_collections.c)
        )
        row = (await self._uow.conn.execute(statement)).mappings().first()
        return None if row is None else CollectionSpec.from_row(row)

    async def page(
        self, owner_id: uuid.UUID, *, after: tuple[str, uuid.UUID] | None, limit: int
    ) -> list[CollectionSpec]:
        """A page of the owner's collections by (name, id)."""
        c = vector_collections.c
        query = select(vector_collections).where(c.owner_id == owner_id)
        if after is not None:
            query = query.where(tuple_(c.name, c.id) > tuple_(*after))
        query = query.order_by(c.name, c.id).limit(limit)
        return [
            CollectionSpec.from_row(row) for row in (await self._uow.conn.execute(query)).mappings()
        ]

    async def create_storage(self, spec: CollectionSpec) -> None:
        """The collection's partition and its HNSW index (both empty, so quick),
        in one round trip. Partition DDL locks vector_items briefly; rather fail
        (ABORTED, retry) than queue every other collection's writes behind a
        long wait: the lock timeout is local to the transaction."""
        await self._uow.driver.execute(
            "SELECT set_config('lock_timeout', '10s', true); "
            f"CREATE TABLE {spec.partition} PARTITION OF vector_items "
            f"FOR VALUES IN ('{spec.id}'); "
            f"CREATE INDEX {spec.index_name} ON {spec.partition} USING hnsw "
            f"({spec.indexed_expression} {spec.operator_class}) "
            f"WITH (m = {int(spec.hnsw_m)}, ef_construction = {int(spec.hnsw_ef_construction)})"
        )

    async def drop_storage(self, spec: CollectionSpec) -> None:
        await self._uow.driver.execute(
            f"SELECT set_config('lock_timeout', '10s', true); DROP TABLE IF EXISTS {spec.partition}"
        )

    # -- items ----------------------------------------------------------------------
    # An UpsertItems stream is COPYed batch by batch into STAGING_TABLE and moved
    # into the partition from there with one INSERT ... ON CONFLICT per batch.

    async def create_staging(self) -> None:
        """A session-private COPY target, dropped when the transaction ends."""
        await with_vector_codecs(self._uow)
        await self._uow.driver.execute(
            f"CREATE TEMP TABLE {STAGING_TABLE} (stream_index bigint, id text, "
            "embedding vector, embedding_half halfvec, text text, metadata jsonb, "
            "content_id uuid, url text, url_normalized text) ON COMMIT DROP"
        )

    async def stage(self, records: Sequence[tuple[Any, ...]]) -> None:
        """COPYs `records` (the stream index, then STAGED_COLUMNS), in binary."""
        await self._uow.driver.copy_records_to_table(
            STAGING_TABLE, records=records, columns=("stream_index", *STAGED_COLUMNS)
        )

    async def move_staged(
        self, spec: CollectionSpec, first: int, last: int, *, repeated_ids: bool = True
    ) -> int:
        """Upserts the staged rows with a stream index in [first, last] into the
        collection in one statement; returns how many rows were written. With
        `repeated_ids` the last of each id wins (one row may not be upserted
        twice in one statement); without, the rows go in unsorted."""
        columns = ", ".join(STAGED_COLUMNS)
        updates = ", ".join(f"{name} = excluded.{name}" for name in STAGED_COLUMNS[1:])
        distinct, order = (
            ("DISTINCT ON (id) ", " ORDER BY id, stream_index DESC") if repeated_ids else ("", "")
        )
        status = await self._uow.driver.execute(
            f"INSERT INTO {spec.partition} (collection_id, owner_id, {columns}) "
            f"SELECT {distinct}'{spec.id}'::uuid, '{spec.owner_id}'::uuid, {columns} "
            f"FROM {STAGING_TABLE} WHERE stream_index BETWEEN $1 AND $2{order} "
            "ON CONFLICT (collection_id, id, owner_id) "
            f"DO UPDATE SET {updates}, update_time = now()",
            first,
            last,
        )
        return rows_affected(status)

    async def clear_staging(self) -> None:
        await self._uow.driver.execute(f"TRUNCATE {STAGING_TABLE}")

    async def delete_items(self, spec: CollectionSpec, ids: Sequence[str]) -> int:
        status = await self._uow.driver.execute(
            f"DELETE FROM {spec.partition} WHERE id = ANY($1::text[])", list(ids)
        )
        return rows_affected(status)


@dataclass(frozen=True, slots=True)
class Hits:
    """What a search returns per hit besides id, text, content_id and url."""

    with_vector: bool = False
    with_metadata: bool = True

    def columns(self, spec: CollectionSpec, table: str = "") -> str:
        prefix = f"{table}." if table else ""
        names = [*_HIT_COLUMNS]
        if self.with_metadata:
            names.append("metadata")
        if self.with_vector:
            names.append(spec.column)
        return ", ".join(f"{prefix}{name}" for name in names)


def _filter_sql(filtered: bool, parameter: int) -> str:
    return f"metadata @> ${parameter}::jsonb" if filtered else "true"


def _distance(spec: CollectionSpec, exact: bool) -> str:
    target = spec.column if exact else spec.indexed_expression
    return f"{target} {spec.operator} $1"


def nearest_sql(
    spec: CollectionSpec,
    name: str,
    columns: str,
    *,
    exact: bool,
    filter_param: int | None,
    limit: str,
) -> str:
    """The CTE `name`: the `limit` items nearest $1 (columns `columns` and
    `distance`) that pass the filter, unordered.

    Exact: every matching item scored. Index: an (iterative) scan of the
    collection's HNSW index; a filtered one that comes up short of `limit`
    (the filter is so selective that the scan hit MAX_SCAN_TUPLES, or fewer
    items match at all) is answered by scoring every match exactly instead,
    in the same statement: the fallback costs nothing unless it runs, and no
    search counts the collection."""
    where = _filter_sql(filter_param is not None, filter_param or 0)
    part = spec.partition

    def scan(exact: bool, extra: str = "") -> str:
        return (
            f"SELECT {columns}, {_distance(spec, exact)} AS distance FROM {part} "
            f"WHERE {where}{extra} ORDER BY distance LIMIT {limit}"
        )

    if exact or filter_param is None:
        return f"{name} AS MATERIALIZED ({scan(exact)})"
    short = f"(SELECT count(*) FROM {name}_index) < {limit}"
    return (
        f"{name}_index AS MATERIALIZED ({scan(False)}), "
        f"{name} AS MATERIALIZED ("
        f"SELECT * FROM {name}_index WHERE NOT {short} "
        f"UNION ALL ({scan(True, f' AND {short}')}))"
    )


@lru_cache(maxsize=4096)
def similar_sql(spec: CollectionSpec, *, exact: bool, filtered: bool, hits: Hits) -> str:
    """Nearest first, ties by id. $1 the query vector, $2 the limit, $3 the
    filter. Relaxed-order index scans may return hits slightly out of order,
    so the (few) hits are sorted again outside."""
    cte = nearest_sql(
        spec,
        "hits",
        hits.columns(spec),
        exact=exact,
        filter_param=3 if filtered else None,
        limit="$2",
    )
    return f"WITH {cte} SELECT * FROM hits ORDER BY distance, id"


class ItemSearch:
    """Reads of one collection's items on a unit of work whose connection has
    the vector codecs (see `item_search`). Index searches first make the
    connection's hnsw settings what they need (`index_search_settings`)."""

    def __init__(self, uow: UnitOfWork, spec: CollectionSpec) -> None:
        self._uow = uow
        self._driver = uow.driver
        self.spec = spec

    async def similar(
        self,
        vector: Any,
        top_k: int,
        filter_json: str | None,
        *,
        exact: bool,
        hits: Hits,
        ef_search: int | None = None,
    ) -> list[asyncpg.Record]:
        if not exact:
            await self._uow.use_settings(index_search_settings(ef_search or DEFAULT_EF_SEARCH))
        sql = similar_sql(self.spec, exact=exact, filtered=filter_json is not None, hits=hits)
        args = (vector, top_k) if filter_json is None else (vector, top_k, filter_json)
        return list(await self._driver.fetch(sql, *args))

    async def text(
        self, query: str, top_k: int, filter_json: str | None, hits: Hits
    ) -> list[asyncpg.Record]:
        """Best ts_rank_cd first. Language-agnostic ('simple': no stemming)."""
        rows = await self._driver.fetch(
            f"SELECT {hits.columns(self.spec, 'i')}, "
            "ts_rank_cd(i.text_search, q)::float8 AS score "
            f"FROM {self.spec.partition} AS i, websearch_to_tsquery('simple', $1) AS q "
            f"WHERE i.text_search @@ q AND {_filter_sql(filter_json is not None, 3)} "
            "ORDER BY score DESC, i.id LIMIT $2",
            *((query, top_k) if filter_json is None else (query, top_k, filter_json)),
        )
        return list(rows)

    async def hybrid(
        self,
        vector: Any,
        query: str,
        top_k: int,
        candidates: int,
        rrf_k: int,
        filter_json: str | None,
        hits: Hits,
    ) -> list[asyncpg.Record]:
        """Reciprocal-rank fusion: each of the vector ranking and the text
        ranking (their best `candidates` each) adds 1 / (rrf_k + rank)."""
        await self._uow.use_settings(index_search_settings())
        spec = self.spec
        part = spec.partition
        filtered = filter_json is not None
        by_vector = nearest_sql(
            spec, "by_vector", "id", exact=False, filter_param=6 if filtered else None, limit="$3"
        )
        sql = f"""
            WITH {by_vector},
            vector_ranks AS (
                SELECT id, distance, row_number() OVER (ORDER BY distance, id) AS r
                FROM by_vector),
            by_text AS MATERIALIZED (
                SELECT id, ts_rank_cd(text_search, q) AS rank
                FROM {part}, websearch_to_tsquery('simple', $2) AS q
                WHERE text_search @@ q AND {_filter_sql(filtered, 6)}
                ORDER BY rank DESC, id LIMIT $3),
            text_ranks AS (
                SELECT id, row_number() OVER (ORDER BY rank DESC, id) AS r FROM by_text),
            fused AS (
                SELECT coalesce(v.id, t.id) AS id, v.distance,
                       coalesce(1.0 / ($5 + v.r), 0) + coalesce(1.0 / ($5 + t.r), 0) AS score
                FROM vector_ranks AS v FULL JOIN text_ranks AS t ON t.id = v.id
                ORDER BY score DESC, id LIMIT $4)
            SELECT {hits.columns(spec, "i")}, f.score::float8 AS score,
                   coalesce(f.distance, 0)::float8 AS distance
            FROM fused AS f JOIN {part} AS i ON i.id = f.id
            ORDER BY f.score DESC, f.id"""
        args: tuple[Any, ...] = (vector, query, candidates, top_k, rrf_k)
        if filtered:
            args += (filter_json,)
        return list(await self._driver.fetch(sql, *args))

    async def by_url(self, url_normalized: str) -> str | None:
        item_id: str | None = await self._driver.fetchval(
            f"SELECT id FROM {self.spec.partition} WHERE url_normalized = $1 ORDER BY id LIMIT 1",
            url_normalized,
        )
        return item_id

    async def nearest_by_cosine(self, vector: Any) -> asyncpg.Record | None:
        """The item nearest to `vector` by cosine distance: through the index
        in a cosine collection, by an exact scan otherwise."""
        spec = self.spec
        exact = spec.metric != "cosine"
        if not exact:
            await self._uow.use_settings(index_search_settings())
        target = spec.column if exact else spec.indexed_expression
        return await self._driver.fetchrow(
            f"SELECT id, ({target} <=> $1)::float8 AS distance FROM {spec.partition} "
            "ORDER BY distance LIMIT 1",
            vector,
        )

    async def explain_similar(
        self,
        vector: Any,
        top_k: int,
        filter_json: str | None,
        *,
        exact: bool,
        ef_search: int | None = None,
        analyze: bool = False,
    ) -> str:
        """The plan of a similar() search with the same settings, for tests and
        diagnosis; with `analyze`, as it ran."""
        if not exact:
            await self._uow.use_settings(index_search_settings(ef_search or DEFAULT_EF_SEARCH))
        sql = similar_sql(self.spec, exact=exact, filtered=filter_json is not None, hits=Hits())
        args = (vector, top_k) if filter_json is None else (vector, top_k, filter_json)
        explain = "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " if analyze else "EXPLAIN "
        rows = await self._driver.fetch(explain + sql, *args)
        return "\n".join(row[0] for row in rows)


async def item_search(uow: UnitOfWork, spec: CollectionSpec) -> ItemSearch:
    """Searches of `spec`'s items on `uow` (its connection gets the codecs)."""
    return ItemSearch(await with_vector_codecs(uow), spec)


def dump_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

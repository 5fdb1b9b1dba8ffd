"""All SQL for vectors. Never commits: the caller's unit of work does.

Storage: `vector_items` is LIST-partitioned by collection. CreateCollection
makes the collection's partition and, on it, an HNSW index over the
expression `(embedding::vector(D))` (or `(embedding_half::halfvec(D))`) with
the collection's operator class, m and ef_construction. Every statement names
the partition itself, and index searches order by exactly that expression, so
PostgreSQL uses the collection's own index (tests/test_vector_search.py checks
the plan). Exact searches order by the bare column instead, which no index
matches. Partition and index names derive from the collection's
server-generated UUID; dimensions, m and ef_construction are validated ints;
no client text ever reaches the SQL other than as a bind parameter.
"""

from __future__ import annotations

import json
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from pgvector.asyncpg import register_vector
from sqlalchemy import bindparam, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from server import errors
from server.db import PreparedStatement, driver_connection, rows_affected
from server.vectors.tables import vector_collections, vector_items

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


_codecs_ready: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()


async def with_vector_codecs(driver: asyncpg.Connection) -> asyncpg.Connection:
    """`driver` with pgvector's binary codecs for vector and halfvec (registered
    once per connection: they need the extension, which the migration makes)."""
    if driver not in _codecs_ready:
        await register_vector(driver)
        _codecs_ready.add(driver)
    return driver


_GET_COLLECTION = PreparedStatement(
    select(vector_collections).where(
        vector_collections.c.owner_id == bindparam("owner_id"),
        vector_collections.c.name == bindparam("name"),
    )
)


async def lookup_collection(
    driver: asyncpg.Connection, owner_id: uuid.UUID, name: str
) -> CollectionSpec | None:
    row = await _GET_COLLECTION.fetchrow(driver, owner_id=owner_id, name=name)
    return None if row is None else CollectionSpec.from_row(row)


class CollectionRepository:
    """Collections, their partitions and indexes, and item writes."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def insert(self, values: dict[str, Any]) -> CollectionSpec | None:
        """The new collection, or None when the owner already has that name."""
        statement = (
            insert(vector_collections)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["owner_id", "name"])
            .returning(*vector_collections.c)
        )
        row = (await self._conn.execute(statement)).mappings().first()
        return None if row is None else CollectionSpec.from_row(row)

    async def get(
        self, owner_id: uuid.UUID, name: str, *, lock: bool = False
    ) -> CollectionSpec | None:
        """One collection; with `lock`, a key-share lock that keeps it from
        being deleted until the transaction ends (concurrent writers still pass)."""
        query = select(vector_collections).where(
            vector_collections.c.owner_id == owner_id, vector_collections.c.name == name
        )
        if lock:
            query = query.with_for_update(key_share=True)
        row = (await self._conn.execute(query)).mappings().first()
        return None if row is None else CollectionSpec.from_row(row)

    async def delete(self, owner_id: uuid.UUID, name: str) -> CollectionSpec | None:
        statement = (
            vector_collections.delete()
            .where(vector_collections.c.owner_id == owner_id, vector_collections.c.name == name)
            .returning(*vector_collections.c)
        )
        row = (await self._conn.execute(statement)).mappings().first()
        return None if row is None else CollectionSpec.from_row(row)

    async def count_items(self, collection_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
        """Items per collection (those of `collection_ids` that have any)."""
        query = (
            select(vector_items.c.collection_id, func.count())
            .where(vector_items.c.collection_id.in_(collection_ids))
            .group_by(vector_items.c.collection_id)
        )
        return {row[0]: row[1] for row in await self._conn.execute(query)}

    async def page(
        self, owner_id: uuid.UUID, *, after: tuple[str, uuid.UUID] | None, limit: int
    ) -> list[RowMapping]:
        c = vector_collections.c
        query = select(vector_collections).where(c.owner_id == owner_id)
        if after is not None:
            query = query.where(tuple_(c.name, c.id) > tuple_(*after))
        query = query.order_by(c.name, c.id).limit(limit)
        return list((await self._conn.execute(query)).mappings())

    async def _driver(self) -> asyncpg.Connection:
        return await with_vector_codecs(await driver_connection(self._conn))

    async def _ddl(self, *statements: str) -> None:
        # Partition DDL locks vector_items briefly; rather fail (ABORTED, retry)
        # than queue every other collection's writes behind a long wait.
        driver = await driver_connection(self._conn)
        await driver.execute("SELECT set_config('lock_timeout', '10s', true)")
        for statement in statements:
            await driver.execute(statement)

    async def create_storage(self, spec: CollectionSpec) -> None:
        """The collection's partition and its HNSW index (both empty, so quick)."""
        await self._ddl(
            f"CREATE TABLE {spec.partition} PARTITION OF vector_items FOR VALUES IN ('{spec.id}')",
            f"CREATE INDEX {spec.index_name} ON {spec.partition} USING hnsw "
            f"({spec.indexed_expression} {spec.operator_class}) "
            f"WITH (m = {int(spec.hnsw_m)}, ef_construction = {int(spec.hnsw_ef_construction)})",
        )

    async def drop_storage(self, spec: CollectionSpec) -> None:
        await self._ddl(f"DROP TABLE IF EXISTS {spec.partition}")

    # -- items ----------------------------------------------------------------------
    # An UpsertItems stream is COPYed batch by batch into STAGING_TABLE and moved
    # into the partition from there with one INSERT ... ON CONFLICT per batch.

    async def create_staging(self) -> None:
        """A session-private COPY target, dropped when the transaction ends."""
        driver = await self._driver()
        await driver.execute(
            f"CREATE TEMP TABLE {STAGING_TABLE} (stream_index bigint, id text, "
            "embedding vector, embedding_half halfvec, text text, metadata jsonb, "
            "content_id uuid, url text, url_normalized text) ON COMMIT DROP"
        )

    async def stage(self, records: Sequence[tuple[Any, ...]]) -> None:
        """COPYs `records` (the stream index, then STAGED_COLUMNS), in binary."""
        driver = await self._driver()
        await driver.copy_records_to_table(
            STAGING_TABLE, records=records, columns=("stream_index", *STAGED_COLUMNS)
        )

    async def move_staged(
        self, spec: CollectionSpec, first: int, last: int, *, repeated_ids: bool = True
    ) -> int:
        """Upserts the staged rows with a stream index in [first, last] into the
        collection in one statement; returns how many rows were written. With
        `repeated_ids` the last of each id wins (one row may not be upserted
        twice in one statement); without, the rows go in unsorted."""
        driver = await self._driver()
        columns = ", ".join(STAGED_COLUMNS)
        updates = ", ".join(f"{name} = excluded.{name}" for name in STAGED_COLUMNS[1:])
        distinct, order = (
            ("DISTINCT ON (id) ", " ORDER BY id, stream_index DESC") if repeated_ids else ("", "")
        )
        status = await driver.execute(
            f"INSERT INTO {spec.partition} (collection_id, {columns}) "
            f"SELECT {distinct}'{spec.id}'::uuid, {columns} FROM {STAGING_TABLE} "
            f"WHERE stream_index BETWEEN $1 AND $2{order} "
            f"ON CONFLICT (collection_id, id) DO UPDATE SET {updates}, update_time = now()",
            first,
            last,
        )
        return rows_affected(status)

    async def clear_staging(self) -> None:
        driver = await driver_connection(self._conn)
        await driver.execute(f"TRUNCATE {STAGING_TABLE}")

    async def delete_items(self, spec: CollectionSpec, ids: Sequence[str]) -> int:
        driver = await driver_connection(self._conn)
        status = await driver.execute(
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


def begin_search_sql(
    *, index: bool, ef_search: int | None = None, max_scan_tuples: int | None = None
) -> str:
    """BEGIN READ ONLY plus, for an index search, SET LOCAL of the HNSW
    candidate list size and of iterative scans (so that a filter that drops
    candidates still yields top_k), and how far such a scan may go (validated
    ints all): one round trip, and nothing outlives the transaction."""
    statements = ["BEGIN READ ONLY"]
    if index:
        statements.append("SET LOCAL hnsw.iterative_scan = relaxed_order")
        if ef_search is not None:
            statements.append(f"SET LOCAL hnsw.ef_search = {int(ef_search)}")
        if max_scan_tuples is not None:
            statements.append(f"SET LOCAL hnsw.max_scan_tuples = {int(max_scan_tuples)}")
            # The scan's memory grows with it (the multiplier is of work_mem).
            statements.append("SET LOCAL hnsw.scan_mem_multiplier = 8")
    return "; ".join(statements)


def _distance(spec: CollectionSpec, exact: bool) -> str:
    target = spec.column if exact else spec.indexed_expression
    return f"{target} {spec.operator} $1"


def similar_sql(spec: CollectionSpec, *, exact: bool, filtered: bool, hits: Hits) -> str:
    """Nearest first. $1 the query vector, $2 the limit, $3 the filter.
    Relaxed-order index scans may return hits slightly out of order, so the
    (few) hits are sorted again outside."""
    inner = (
        f"SELECT {hits.columns(spec)}, {_distance(spec, exact)} AS distance "
        f"FROM {spec.partition} WHERE {_filter_sql(filtered, 3)} "
        "ORDER BY distance LIMIT $2"
    )
    return f"WITH hits AS MATERIALIZED ({inner}) SELECT * FROM hits ORDER BY distance, id"


class ItemSearch:
    """Reads of one collection's items, on a bare driver connection. Index
    searches run inside `transaction()`, which carries their settings."""

    def __init__(self, driver: asyncpg.Connection, spec: CollectionSpec) -> None:
        self._driver = driver
        self._spec = spec

    @property
    def spec(self) -> CollectionSpec:
        return self._spec

    async def get(self, item_id: str, hits: Hits) -> asyncpg.Record | None:
        return await self._driver.fetchrow(
            f"SELECT {hits.columns(self._spec)} FROM {self._spec.partition} WHERE id = $1",
            item_id,
        )

    async def count_matching(self, filter_json: str, cap: int) -> tuple[int, int]:
        """How many items match the filter (counting no further than `cap`),
        and about how many the collection holds (the planner's estimate)."""
        row = await self._driver.fetchrow(
            f"SELECT (SELECT count(*) FROM (SELECT 1 FROM {self._spec.partition} "
            "WHERE metadata @> $1::jsonb LIMIT $2) AS matching) AS matches, "
            "(SELECT reltuples::bigint FROM pg_class "
            f"WHERE oid = '{self._spec.partition}'::regclass) AS total",
            filter_json,
            cap,
        )
        assert row is not None
        return int(row["matches"]), int(row["total"])

    @asynccontextmanager
    async def transaction(
        self, *, index: bool, ef_search: int | None = None, max_scan_tuples: int | None = None
    ) -> AsyncIterator[None]:
        """A read-only transaction for one search; see `begin_search_sql`."""
        await self._driver.execute(
            begin_search_sql(index=index, ef_search=ef_search, max_scan_tuples=max_scan_tuples)
        )
        try:
            yield
        except errors.ObservatoryError:
            await self._driver.execute("ROLLBACK")
            raise
        # Anything else discards the connection (Database.lookup), and its
        # transaction with it.
        await self._driver.execute("COMMIT")

    async def similar(
        self,
        vector: Any,
        top_k: int,
        filter_json: str | None,
        *,
        exact: bool,
        hits: Hits,
    ) -> list[asyncpg.Record]:
        sql = similar_sql(self._spec, exact=exact, filtered=filter_json is not None, hits=hits)
        args = (vector, top_k) if filter_json is None else (vector, top_k, filter_json)
        return list(await self._driver.fetch(sql, *args))

    async def text(
        self, query: str, top_k: int, filter_json: str | None, hits: Hits
    ) -> list[asyncpg.Record]:
        """Best ts_rank_cd first. Language-agnostic ('simple': no stemming)."""
        rows = await self._driver.fetch(
            f"SELECT {hits.columns(self._spec, 'i')}, "
            "ts_rank_cd(i.text_search, q)::float8 AS score "
            f"FROM {self._spec.partition} AS i, websearch_to_tsquery('simple', $1) AS q "
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
        *,
        exact: bool,
        hits: Hits,
    ) -> list[asyncpg.Record]:
        """Reciprocal-rank fusion: each of the vector ranking and the text
        ranking (their best `candidates` each) adds 1 / (rrf_k + rank)."""
        part = self._spec.partition
        where = _filter_sql(filter_json is not None, 6)
        sql = f"""
            WITH by_vector AS MATERIALIZED (
                SELECT id, {_distance(self._spec, exact)} AS distance FROM {part}
                WHERE {where} ORDER BY distance LIMIT $3),
            vector_ranks AS (
                SELECT id, distance, row_number() OVER (ORDER BY distance, id) AS r
                FROM by_vector),
            by_text AS MATERIALIZED (
                SELECT id, ts_rank_cd(text_search, q) AS rank
                FROM {part}, websearch_to_tsquery('simple', $2) AS q
                WHERE text_search @@ q AND {where} ORDER BY rank DESC, id LIMIT $3),
            text_ranks AS (
                SELECT id, row_number() OVER (ORDER BY rank DESC, id) AS r FROM by_text),
            fused AS (
                SELECT coalesce(v.id, t.id) AS id, v.distance,
                       coalesce(1.0 / ($5 + v.r), 0) + coalesce(1.0 / ($5 + t.r), 0) AS score
                FROM vector_ranks AS v FULL JOIN text_ranks AS t ON t.id = v.id
                ORDER BY score DESC, id LIMIT $4)
            SELECT {hits.columns(self._spec, "i")}, f.score::float8 AS score,
                   coalesce(f.distance, 0)::float8 AS distance
            FROM fused AS f JOIN {part} AS i ON i.id = f.id
            ORDER BY f.score DESC, f.id"""
        args: tuple[Any, ...] = (vector, query, candidates, top_k, rrf_k)
        if filter_json is not None:
            args += (filter_json,)
        return list(await self._driver.fetch(sql, *args))

    async def by_url(self, url_normalized: str) -> str | None:
        item_id: str | None = await self._driver.fetchval(
            f"SELECT id FROM {self._spec.partition} WHERE url_normalized = $1 ORDER BY id LIMIT 1",
            url_normalized,
        )
        return item_id

    async def nearest_by_cosine(self, vector: Any) -> asyncpg.Record | None:
        """The item nearest to `vector` by cosine distance: through the index
        in a cosine collection, by an exact scan otherwise."""
        spec = self._spec
        target = spec.indexed_expression if spec.metric == "cosine" else spec.column
        return await self._driver.fetchrow(
            f"SELECT id, ({target} <=> $1)::float8 AS distance FROM {spec.partition} "
            "ORDER BY distance LIMIT 1",
            vector,
        )

    async def explain_similar(
        self, vector: Any, top_k: int, filter_json: str | None, *, exact: bool
    ) -> str:
        """The plan of a similar() search, for tests and diagnosis."""
        sql = similar_sql(self._spec, exact=exact, filtered=filter_json is not None, hits=Hits())
        args = (vector, top_k) if filter_json is None else (vector, top_k, filter_json)
        rows = await self._driver.fetch(f"EXPLAIN {sql}", *args)
        return "\n".join(row[0] for row in rows)


def dump_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

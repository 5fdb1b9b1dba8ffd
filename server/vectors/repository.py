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
import math
import re
import struct
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any

import asyncpg
import numpy as np
from pgvector import HalfVector, Vector
from sqlalchemy import bindparam, select, tuple_
from sqlalchemy.dialects.postgresql import insert

from server.db import PreparedStatement, rows_affected
from server.uow import UnitOfWork
from server.vectors.filters import Compiler, Params, Where, index_function
from server.vectors.tables import vector_collections

# pgvector's operator and HNSW operator-class suffix per metric.
_OPERATORS = {"cosine": "<=>", "l2": "<->", "inner_product": "<#>"}
_OPCLASS_SUFFIX = {"cosine": "cosine_ops", "l2": "l2_ops", "inner_product": "ip_ops"}
# The column and SQL type per precision.
_STORAGE = {"float32": ("embedding", "vector"), "float16": ("embedding_half", "halfvec")}
# HNSW indexes vector up to 2,000 dimensions and halfvec up to 4,000 (pgvector);
# bit (binary_quantize) up to 64,000.
MAX_VECTOR_INDEXED = 2_000
MAX_HALFVEC_INDEXED = 4_000

# How long collection DDL waits for its lock on vector_items per attempt.
DDL_LOCK_TIMEOUT = "200ms"

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
    quantization: str = "none"
    # (key, type) of each metadata index, in the order they were made.
    metadata_indexes: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_row(cls, row: Any) -> CollectionSpec:
        values = {name: row[name] for name in cls.__slots__ if name != "metadata_indexes"}
        indexes = row["metadata_indexes"]
        if isinstance(indexes, str):  # a connection without the JSON codecs
            indexes = json.loads(indexes)
        return cls(
            **values,
            metadata_indexes=tuple((entry["key"], entry["type"]) for entry in indexes),
        )

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
    def vector_type(self) -> str:
        return _STORAGE[self.precision][1]

    @property
    def index_kind(self) -> str:
        """How the HNSW index holds the vectors: "plain" (the vectors
        themselves), "half" (float32 above 2,000 dimensions, as halfvec) or
        "binary" (binary_quantize: asked for, or above 4,000 dimensions)."""
        if self.quantization == "binary" or self.dimension > MAX_HALFVEC_INDEXED:
            return "binary"
        if self.precision == "float32" and self.dimension > MAX_VECTOR_INDEXED:
            return "half"
        return "plain"

    @property
    def reranked(self) -> bool:
        """True when the index holds reduced vectors, so its candidates are
        re-ranked by exact distance."""
        return self.index_kind != "plain"

    @property
    def indexed_expression(self) -> str:
        """The expression the HNSW index is built on; searches order by it."""
        column, sql_type = _STORAGE[self.precision]
        dimension = int(self.dimension)
        kind = self.index_kind
        if kind == "binary":
            return f"(binary_quantize({column})::bit({dimension}))"
        if kind == "half":
            return f"({column}::halfvec({dimension}))"
        return f"({column}::{sql_type}({dimension}))"

    def query_expression(self, vector: str) -> str:
        """The query vector `vector` (a placeholder) as the index compares it."""
        dimension = int(self.dimension)
        kind = self.index_kind
        if kind == "binary":
            return f"binary_quantize({vector})::bit({dimension})"
        if kind == "half":
            return f"{vector}::halfvec({dimension})"
        return vector

    @property
    def operator(self) -> str:
        """The exact distance operator of the metric."""
        return _OPERATORS[self.metric]

    @property
    def index_operator(self) -> str:
        return "<~>" if self.index_kind == "binary" else _OPERATORS[self.metric]

    @property
    def operator_class(self) -> str:
        kind = self.index_kind
        if kind == "binary":
            return "bit_hamming_ops"
        sql_type = "halfvec" if kind == "half" else _STORAGE[self.precision][1]
        return f"{sql_type}_{_OPCLASS_SUFFIX[self.metric]}"

    @property
    def indexed_keys(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.metadata_indexes)

    def metadata_index_names(self, key: str, kind: str) -> tuple[str, str]:
        """The function and the index of a metadata index (unquoted)."""
        function = index_function(self.id.hex, key, kind)
        return function, function.replace("vector_mi_", "vector_items_mi_", 1)


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


class _BinaryVector(Vector):
    """A vector already in PostgreSQL's binary form, which the codec sends as is."""

    def __init__(self, binary: bytes) -> None:
        self._binary = binary

    def to_binary(self) -> bytes:
        return self._binary


class _BinaryHalfVector(HalfVector):
    """A halfvec already in PostgreSQL's binary form, which the codec sends as is."""

    def __init__(self, binary: bytes) -> None:
        self._binary = binary

    def to_binary(self) -> bytes:
        return self._binary


def binary_vectors(matrix: np.ndarray[Any, Any], precision: str) -> list[Vector | HalfVector]:
    """Each row of `matrix` (float32, one vector a row) as a value for the
    collection's column (`precision`), already in pgvector's binary form: one
    pass over the whole matrix instead of a conversion per vector."""
    rows, dimension = matrix.shape
    kind: type[_BinaryVector] | type[_BinaryHalfVector] = (
        _BinaryVector if precision == "float32" else _BinaryHalfVector
    )
    value_type = ">f4" if precision == "float32" else ">f2"
    if not rows:
        return []
    width = 4 + dimension * np.dtype(value_type).itemsize
    encoded = np.empty((rows, width), np.uint8)
    encoded[:, :4] = np.frombuffer(struct.pack(">HH", dimension, 0), np.uint8)
    # The values converted straight into place (no temporary matrix), and
    # each row copied out once: at 1,000 x 384, 0.5 ms instead of 2.2 ms.
    # (Rows the caller refused may not fit a float16: they are never sent.)
    with np.errstate(over="ignore", invalid="ignore"):
        encoded[:, 4:].view(value_type)[...] = matrix
    flat = encoded.reshape(-1).data
    return [kind(flat[start : start + width].tobytes()) for start in range(0, rows * width, width)]


_by_id = itemgetter(0)  # a STAGED_COLUMNS record's id


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
# Adds {"key", "type"} to a collection's metadata_indexes unless present; the
# row either way (None: no such collection). `before` tells whether it was there.
_ADD_METADATA_INDEX = """
WITH target AS (
  SELECT * FROM vector_collections WHERE owner_id = $1 AND name = $2 FOR NO KEY UPDATE
), changed AS (
  UPDATE vector_collections AS c
     SET metadata_indexes = c.metadata_indexes || jsonb_build_array(
           jsonb_build_object('key', $3::text, 'type', $4::text))
    FROM target AS t
   WHERE c.id = t.id AND c.owner_id = t.owner_id
     AND NOT t.metadata_indexes @> jsonb_build_array(
           jsonb_build_object('key', $3::text, 'type', $4::text))
  RETURNING c.*
)
SELECT *, true AS created FROM changed
UNION ALL
SELECT *, false FROM target WHERE NOT EXISTS (SELECT FROM changed)
"""
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
            # FOR KEY SHARE (key_share alone would be FOR NO KEY UPDATE, which
            # queues every writer of the collection behind the one before).
            .with_for_update(key_share=True, read=True)
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
        in one round trip. Partition DDL locks vector_items, and while it waits
        for that lock every statement on vector_items queues behind it: it
        waits at most DDL_LOCK_TIMEOUT (local to the transaction) and the
        caller retries (see service.retry_ddl)."""
        await self._uow.driver.execute(
            f"SELECT set_config('lock_timeout', '{DDL_LOCK_TIMEOUT}', true); "
            f"CREATE TABLE {spec.partition} PARTITION OF vector_items "
            f"FOR VALUES IN ('{spec.id}'); "
            f"CREATE INDEX {spec.index_name} ON {spec.partition} USING hnsw "
            f"({spec.indexed_expression} {spec.operator_class}) "
            f"WITH (m = {int(spec.hnsw_m)}, ef_construction = {int(spec.hnsw_ef_construction)})"
        )

    async def drop_storage(self, spec: CollectionSpec) -> None:
        """Drops the partition (its indexes with it) and the functions of its
        metadata indexes; the lock wait is bounded as in create_storage."""
        functions = "".join(
            f"; DROP FUNCTION IF EXISTS {spec.metadata_index_names(key, kind)[0]}(jsonb)"
            for key, kind in spec.metadata_indexes
        )
        await self._uow.driver.execute(
            f"SELECT set_config('lock_timeout', '{DDL_LOCK_TIMEOUT}', true); "
            f"DROP TABLE IF EXISTS {spec.partition}{functions}"
        )

    async def add_metadata_index(
        self, owner_id: uuid.UUID, name: str, key: str, kind: str
    ) -> tuple[CollectionSpec, bool] | None:
        """Records the index (key, kind) on the owner's collection `name` unless
        it is there, locking the row (concurrent makers of one index wait for
        each other). Returns the collection as it is now and whether this call
        recorded the index; None when there is no such collection."""
        row = await self._uow.driver.fetchrow(_ADD_METADATA_INDEX, owner_id, name, key, kind)
        return None if row is None else (CollectionSpec.from_row(row), row["created"])

    async def create_metadata_index(self, spec: CollectionSpec, key: str, kind: str) -> None:
        """The index's function and the index on the collection's partition (the
        key goes in as a bind parameter: the database quotes it)."""
        function, index = spec.metadata_index_names(key, kind)
        await self._uow.driver.execute(
            "SELECT vector_create_metadata_index($1::regclass, $2, $3, $4::text[], $5)",
            spec.partition,
            function,
            index,
            list(key.split(".")),
            kind,
        )

    # -- items ----------------------------------------------------------------------
    # UpsertItems writes batch by batch, each in a transaction of its own
    # (server.vectors.upsert): a batch of ids the collection does not hold yet is
    # COPYed straight into the partition; any other is COPYed into STAGING_TABLE
    # and moved into the partition from there with one INSERT ... ON CONFLICT.

    async def holds_any(self, spec: CollectionSpec, ids: Sequence[str]) -> bool:
        """Whether the collection holds an item with one of `ids` (one look-up
        of each in the primary key)."""
        found: bool = await self._uow.driver.fetchval(
            f"SELECT EXISTS (SELECT FROM {spec.partition} WHERE collection_id = $1 "
            "AND id = ANY($2::text[]) AND owner_id = $3)",
            spec.id,
            list(ids),
            spec.owner_id,
        )
        return found

    async def copy_items(self, spec: CollectionSpec, records: Sequence[tuple[Any, ...]]) -> None:
        """COPYs `records` (STAGED_COLUMNS, distinct ids) into the collection's
        partition, in binary: the load's fastest path, for ids it does not hold
        yet. They go in by id in byte order (Python's order of str), as
        `move_staged` writes: two writers of the same ids then wait for each
        other in one order instead of deadlocking."""
        await with_vector_codecs(self._uow)
        collection, owner = spec.id, spec.owner_id
        await self._uow.driver.copy_records_to_table(
            f"vector_items_{spec.id.hex}",
            records=[(collection, owner, *record) for record in sorted(records, key=_by_id)],
            columns=("collection_id", "owner_id", *STAGED_COLUMNS),
        )

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
        twice in one statement). The rows go in by id in byte order, the order
        `copy_items` writes in, so that concurrent writers of the same ids
        take their locks in one order and wait for each other instead of
        deadlocking."""
        columns = ", ".join(STAGED_COLUMNS)
        updates = ", ".join(f"{name} = excluded.{name}" for name in STAGED_COLUMNS[1:])
        distinct, order = (
            ('DISTINCT ON (id COLLATE "C") ', ' ORDER BY id COLLATE "C", stream_index DESC')
            if repeated_ids
            else ("", ' ORDER BY id COLLATE "C"')
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


# Group keys that are columns rather than metadata keys.
GROUP_COLUMNS = {"content_id": "content_id", "url": "url"}


@dataclass(frozen=True, slots=True)
class SimilarSearch:
    """One similarity search, checked. `group_by` is a column of
    GROUP_COLUMNS or a metadata key path; `oversampling` applies to
    collections whose index holds reduced vectors (re-ranked exactly)."""

    vector: Any
    top_k: int
    filter_json: str | None = None
    where: Where | None = None
    exact: bool = False
    hits: Hits = Hits(with_metadata=False)
    ef_search: int | None = None
    oversampling: float = 4.0
    group_by: str | tuple[str, ...] | None = None
    group_size: int = 1

    @property
    def settings(self) -> Mapping[str, str] | None:
        """The hnsw settings it runs with (None: exact, it needs none)."""
        return None if self.exact else index_search_settings(self.ef_search or DEFAULT_EF_SEARCH)


def candidates_for(spec: CollectionSpec, wanted: int, oversampling: float) -> int:
    """How many candidates an index scan fetches for `wanted` hits."""
    if not spec.reranked:
        return wanted
    return max(wanted, math.ceil(wanted * oversampling))


def _predicate(spec: CollectionSpec, search: SimilarSearch, params: Params) -> list[str]:
    clauses = []
    if search.filter_json is not None:
        clauses.append(f"metadata @> {params.add(search.filter_json, 'jsonb')}")
    if search.where is not None:
        clauses.extend(Compiler(spec.id.hex, spec.indexed_keys, params).where(search.where))
    return clauses


def _group_expression(spec: CollectionSpec, group_by: str | tuple[str, ...], params: Params) -> str:
    if isinstance(group_by, str):
        return GROUP_COLUMNS[group_by]
    return Compiler(spec.id.hex, spec.indexed_keys, params).value(group_by)


def nearest_sql(
    spec: CollectionSpec,
    name: str,
    columns: str,
    *,
    exact: bool,
    predicate: Sequence[str],
    vector: str,
    limit: str | None,
    index_limit: str | None = None,
    fallback_scores_all: bool = False,
) -> str:
    """The CTE `name`: the `limit` items nearest `vector` (columns `columns`
    and the exact `distance`) that pass `predicate`, unordered; limit None:
    every item that passes (exact only, or as the fallback).

    Exact: every matching item scored. Index: an (iterative) scan of the
    collection's HNSW index for `index_limit` candidates (default `limit`;
    more where the index holds reduced vectors, which are then scored
    exactly); a filtered scan that comes up short (the filter is so selective
    that the scan hit MAX_SCAN_TUPLES, or fewer items match at all) is
    answered by scoring every match exactly instead, in the same statement:
    the fallback costs nothing unless it runs, and no search counts the
    collection. The fallback scores up to `limit` matches, or every one with
    `fallback_scores_all`."""
    where = " AND ".join(predicate) or "true"
    part = spec.partition
    exact_distance = f"{spec.column} {spec.operator} {vector}"

    def exact_scan(extra: str = "", cap: str | None = limit) -> str:
        scan = f"SELECT {columns}, {exact_distance} AS distance FROM {part} WHERE {where}{extra}"
        return scan if cap is None else f"{scan} ORDER BY distance LIMIT {cap}"

    if exact:
        return f"{name} AS MATERIALIZED ({exact_scan()})"
    if spec.reranked:
        scan_limit = index_limit or limit
        index_scan = (
            f"SELECT {columns}, {exact_distance} AS distance FROM {part} WHERE {where} "
            f"ORDER BY {spec.indexed_expression} {spec.index_operator} "
            f"{spec.query_expression(vector)} LIMIT {scan_limit}"
        )
    else:
        scan_limit = limit
        index_scan = (
            f"SELECT {columns}, {spec.indexed_expression} {spec.operator} {vector} AS distance "
            f"FROM {part} WHERE {where} ORDER BY distance LIMIT {scan_limit}"
        )
    if not predicate:
        return f"{name} AS MATERIALIZED ({index_scan})"
    short = f"(SELECT count(*) FROM {name}_index) < {scan_limit}"
    return (
        f"{name}_index AS MATERIALIZED ({index_scan}), "
        f"{name} AS MATERIALIZED ("
        f"SELECT * FROM {name}_index WHERE NOT {short} "
        f"UNION ALL ({exact_scan(f' AND {short}', None if fallback_scores_all else limit)}))"
    )


def similar_statement(
    spec: CollectionSpec, search: SimilarSearch, *, wanted: int | None = None
) -> tuple[str, Params]:
    """The SQL of `search` and its parameters ($1 the vector, $2 top_k).

    Nearest first, ties by id: relaxed-order index scans may return hits
    slightly out of order, so the (few) hits are sorted again outside, and a
    filter never changes the order of what it lets through. Grouped: the
    index scan fetches `wanted` candidates (see ItemSearch.similar), keeps
    the best `group_size` of each group and says how many candidates the
    scan found (`candidates`), so the caller can tell an exhausted scan from
    one to widen."""
    params = Params()
    vector = params.add(search.vector, spec.vector_type)
    top_k = params.add(search.top_k, "int4")
    predicate = _predicate(spec, search, params)
    columns = search.hits.columns(spec)
    if search.group_by is None:
        index_limit = None
        if spec.reranked and not search.exact:
            count = candidates_for(spec, search.top_k, search.oversampling)
            index_limit = params.add(count, "int4")
        cte = nearest_sql(
            spec,
            "hits",
            columns,
            exact=search.exact,
            predicate=predicate,
            vector=vector,
            limit=top_k,
            index_limit=index_limit,
        )
        tail = f" LIMIT {top_k}" if index_limit is not None else ""
        return f"WITH {cte} SELECT * FROM hits ORDER BY distance, id{tail}", params
    group = _group_expression(spec, search.group_by, params)
    predicate.append(f"{group} IS NOT NULL")
    group_size = params.add(search.group_size, "int4")
    columns += f", {group} AS group_key"
    if search.exact:
        cte = nearest_sql(
            spec, "hits", columns, exact=True, predicate=predicate, vector=vector, limit=None
        )
        found = "0"
    else:
        wanted = wanted or search.top_k
        limit = params.add(wanted, "int4")
        count = candidates_for(spec, wanted, search.oversampling)
        index_limit = params.add(count, "int4") if spec.reranked else None
        cte = nearest_sql(
            spec,
            "hits",
            columns,
            exact=False,
            predicate=predicate,
            vector=vector,
            limit=limit,
            index_limit=index_limit,
            fallback_scores_all=True,
        )
        found = "(SELECT count(*) FROM hits_index)"
    sql = (
        f"WITH {cte}, ranked AS (SELECT *, row_number() OVER "
        "(PARTITION BY group_key ORDER BY distance, id) AS group_rank FROM hits) "
        f"SELECT *, {found} AS candidates FROM ranked WHERE group_rank <= {group_size} "
        f"ORDER BY distance, id LIMIT {top_k}"
    )
    return sql, params


@lru_cache(maxsize=4096)
def similar_sql(spec: CollectionSpec, *, exact: bool, filtered: bool, hits: Hits) -> str:
    """The SQL of an ungrouped search without `where`: $1 the query vector,
    $2 the limit, $3 the filter (when `filtered`), then for a collection
    whose index holds reduced vectors the number of candidates."""
    search = SimilarSearch(
        vector=None, top_k=0, filter_json="{}" if filtered else None, exact=exact, hits=hits
    )
    return similar_statement(spec, search)[0]


def _lateral(sql: str, types: Sequence[str]) -> str:
    """`sql` run once per row of parameter arrays (one array per parameter,
    one element per search), each search's hits tagged with its ordinal."""
    inner = re.sub(r"\$(\d+)", r"q.p\1", sql)
    arrays = ", ".join(f"${i}::{sql_type}[]" for i, sql_type in enumerate(types, start=1))
    names = ", ".join(f"p{i}" for i in range(1, len(types) + 1))
    return (
        f"SELECT q.ord, h.* FROM unnest({arrays}) WITH ORDINALITY AS q({names}, ord) "
        f"CROSS JOIN LATERAL ({inner}) AS h ORDER BY q.ord, h.distance, h.id"
    )


# A search's hnsw settings as a hashable value (None: an exact search).
Settings = tuple[tuple[str, str], ...] | None


def shared_shape(
    spec: CollectionSpec, search: SimilarSearch
) -> tuple[str, Settings, Params] | None:
    """A search that can share one statement with others of its shape: its
    SQL, its hnsw settings and its parameters. None for one that runs alone:
    grouped (it may widen its scan) or with array parameters (a LATERAL join
    over arrays cannot carry them)."""
    if search.group_by is not None:
        return None
    sql, params = similar_statement(spec, search)
    if any(t.endswith("[]") for t in params.types):
        return None
    settings = search.settings
    return sql, None if settings is None else tuple(settings.items()), params


# Grouped searches widen their candidates by this factor until the groups are
# filled or the scan is exhausted; past MAX_GROUP_CANDIDATES they score every
# match exactly.
GROUP_WIDENING = 4
MAX_GROUP_CANDIDATES = 4 * MAX_SCAN_TUPLES


class ItemSearch:
    """Reads of one collection's items on a unit of work whose connection has
    the vector codecs (see `item_search`). Index searches first make the
    connection's hnsw settings what they need (`index_search_settings`)."""

    def __init__(self, uow: UnitOfWork, spec: CollectionSpec) -> None:
        self._uow = uow
        self._driver = uow.driver
        self.spec = spec

    async def similar(self, search: SimilarSearch) -> list[asyncpg.Record]:
        """The hits of `search`, best first. A grouped index search fetches
        top_k x group_size x 2 candidates and, while its groups are not filled
        and the scan found as many as it asked for, GROUP_WIDENING times as
        many (one statement each): no group loses a hit to a short candidate
        list."""
        settings = search.settings
        if settings is not None:
            await self._uow.use_settings(settings)
        if search.group_by is None or search.exact:
            sql, params = similar_statement(self.spec, search)
            return list(await self._driver.fetch(sql, *params.values))
        wanted = 2 * search.top_k * search.group_size
        while True:
            sql, params = similar_statement(self.spec, search, wanted=wanted)
            rows = list(await self._driver.fetch(sql, *params.values))
            if len(rows) >= search.top_k or not rows:
                return rows
            asked = candidates_for(self.spec, wanted, search.oversampling)
            if rows[0]["candidates"] < asked:
                return rows  # every match was seen
            if wanted >= MAX_GROUP_CANDIDATES:
                sql, params = similar_statement(self.spec, replace(search, exact=True))
                return list(await self._driver.fetch(sql, *params.values))
            wanted *= GROUP_WIDENING

    async def similar_shaped(
        self, sql: str, settings: Settings, searches: Sequence[Params]
    ) -> list[list[asyncpg.Record]]:
        """The hits of searches that share `sql` and `settings` (their
        parameters `searches`), in order: one plain statement for one search,
        else a LATERAL join over arrays of their parameters, in which each
        runs exactly the SQL it would alone."""
        if settings is not None:
            await self._uow.use_settings(dict(settings))
        if len(searches) == 1:
            return [list(await self._driver.fetch(sql, *searches[0].values))]
        types = searches[0].types
        columns = [
            [self._array_value(v, t) for v in column]
            for column, t in zip(
                zip(*(params.values for params in searches), strict=True), types, strict=True
            )
        ]
        results: list[list[asyncpg.Record]] = [[] for _ in searches]
        for row in await self._driver.fetch(_lateral(sql, types), *columns):
            results[row["ord"] - 1].append(row)
        return results

    @staticmethod
    def _array_value(value: Any, sql_type: str) -> Any:
        if sql_type == "vector":
            return value if isinstance(value, Vector) else Vector(value)
        if sql_type == "halfvec":
            return value if isinstance(value, HalfVector) else HalfVector(value)
        return value

    async def text(
        self,
        query: str,
        top_k: int,
        filter_json: str | None,
        hits: Hits,
        where: Where | None = None,
    ) -> list[asyncpg.Record]:
        """Best ts_rank_cd first. Language-agnostic ('simple': no stemming)."""
        params = Params()
        q = params.add(query, "text")
        limit = params.add(top_k, "int4")
        search = SimilarSearch(vector=None, top_k=top_k, filter_json=filter_json, where=where)
        predicate = " AND ".join(["text_search @@ q", *_predicate(self.spec, search, params)])
        rows = await self._driver.fetch(
            f"SELECT {hits.columns(self.spec)}, ts_rank_cd(text_search, q)::float8 AS score "
            f"FROM {self.spec.partition}, websearch_to_tsquery('simple', {q}) AS q "
            f"WHERE {predicate} ORDER BY score DESC, id LIMIT {limit}",
            *params.values,
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
        where: Where | None = None,
    ) -> list[asyncpg.Record]:
        """Reciprocal-rank fusion: each of the vector ranking and the text
        ranking (their best `candidates` each) adds 1 / (rrf_k + rank)."""
        await self._uow.use_settings(index_search_settings())
        spec = self.spec
        part = spec.partition
        params = Params()
        q_vector = params.add(vector, spec.vector_type)
        q_text = params.add(query, "text")
        pool = params.add(candidates, "int4")
        limit = params.add(top_k, "int4")
        k = params.add(rrf_k, "int4")
        search = SimilarSearch(vector=None, top_k=top_k, filter_json=filter_json, where=where)
        predicate = _predicate(spec, search, params)
        index_limit = (
            params.add(candidates_for(spec, candidates, search.oversampling), "int4")
            if spec.reranked
            else None
        )
        by_vector = nearest_sql(
            spec,
            "by_vector",
            "id",
            exact=False,
            predicate=predicate,
            vector=q_vector,
            limit=pool,
            index_limit=index_limit,
        )
        text_where = " AND ".join(["text_search @@ q", *predicate])
        sql = f"""
            WITH {by_vector},
            vector_ranks AS (
                SELECT id, distance, row_number() OVER (ORDER BY distance, id) AS r
                FROM by_vector ORDER BY distance, id LIMIT {pool}),
            by_text AS MATERIALIZED (
                SELECT id, ts_rank_cd(text_search, q) AS rank
                FROM {part}, websearch_to_tsquery('simple', {q_text}) AS q
                WHERE {text_where}
                ORDER BY rank DESC, id LIMIT {pool}),
            text_ranks AS (
                SELECT id, row_number() OVER (ORDER BY rank DESC, id) AS r FROM by_text),
            fused AS (
                SELECT coalesce(v.id, t.id) AS id, v.distance,
                       coalesce(1.0 / ({k} + v.r), 0) + coalesce(1.0 / ({k} + t.r), 0) AS score
                FROM vector_ranks AS v FULL JOIN text_ranks AS t ON t.id = v.id
                ORDER BY score DESC, id LIMIT {limit})
            SELECT {hits.columns(spec, "i")}, f.score::float8 AS score,
                   coalesce(f.distance, 0)::float8 AS distance
            FROM fused AS f JOIN {part} AS i ON i.id = f.id
            ORDER BY f.score DESC, f.id"""
        return list(await self._driver.fetch(sql, *params.values))

    async def by_url(self, url_normalized: str) -> str | None:
        item_id: str | None = await self._driver.fetchval(
            f"SELECT id FROM {self.spec.partition} WHERE url_normalized = $1 ORDER BY id LIMIT 1",
            url_normalized,
        )
        return item_id

    async def nearest_by_cosine(self, vector: Any) -> asyncpg.Record | None:
        """The item nearest to `vector` by cosine distance: through the index
        in a cosine collection whose index holds the vectors themselves, by an
        exact scan otherwise."""
        spec = self.spec
        exact = spec.metric != "cosine" or spec.reranked
        if not exact:
            await self._uow.use_settings(index_search_settings())
        target = spec.column if exact else spec.indexed_expression
        return await self._driver.fetchrow(
            f"SELECT id, ({target} <=> $1::{spec.vector_type})::float8 AS distance "
            f"FROM {spec.partition} ORDER BY distance LIMIT 1",
            vector,
        )

    async def page(
        self, where: Where | None, after: str | None, limit: int, hits: Hits
    ) -> list[asyncpg.Record]:
        """Up to `limit` matching items by id after `after`, each with its
        size in bytes as sent (`page_bytes`, roughly)."""
        params = Params()
        search = SimilarSearch(vector=None, top_k=0, where=where)
        predicate = _predicate(self.spec, search, params)
        if after is not None:
            predicate.append(f"id > {params.add(after, 'text')}")
        vector_bytes = f"{4 * int(self.spec.dimension)}" if hits.with_vector else "0"
        size = (
            "octet_length(id) + coalesce(octet_length(text), 0) + coalesce(octet_length(url), 0)"
            f" + octet_length(metadata::text) + {vector_bytes}"
        )
        rows = await self._driver.fetch(
            f"SELECT {hits.columns(self.spec)}, {size} AS page_bytes FROM {self.spec.partition} "
            f"WHERE {' AND '.join(predicate) or 'true'} "
            f"ORDER BY id LIMIT {params.add(limit, 'int4')}",
            *params.values,
        )
        return list(rows)

    async def count(self, where: Where | None) -> int:
        params = Params()
        predicate = _predicate(self.spec, SimilarSearch(vector=None, top_k=0, where=where), params)
        count: int = await self._driver.fetchval(
            f"SELECT count(*) FROM {self.spec.partition} WHERE {' AND '.join(predicate) or 'true'}",
            *params.values,
        )
        return count

    async def explain_similar(
        self,
        vector: Any,
        top_k: int,
        filter_json: str | None,
        *,
        exact: bool,
        ef_search: int | None = None,
        analyze: bool = False,
        where: Where | None = None,
    ) -> str:
        """The plan of a similar() search with the same settings, for tests and
        diagnosis; with `analyze`, as it ran."""
        search = SimilarSearch(
            vector=vector,
            top_k=top_k,
            filter_json=filter_json,
            where=where,
            exact=exact,
            ef_search=ef_search,
        )
        if search.settings is not None:
            await self._uow.use_settings(search.settings)
        sql, params = similar_statement(self.spec, search)
        explain = "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " if analyze else "EXPLAIN "
        rows = await self._driver.fetch(explain + sql, *params.values)
        return "\n".join(row[0] for row in rows)


async def item_search(uow: UnitOfWork, spec: CollectionSpec) -> ItemSearch:
    """Searches of `spec`'s items on `uow` (its connection gets the codecs)."""
    return ItemSearch(await with_vector_codecs(uow), spec)

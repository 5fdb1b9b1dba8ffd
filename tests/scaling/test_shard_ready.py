"""The schema is ready to shard by tenant (docs/scaling.md, "Sharding by
tenant"): read from the catalogue of the migrated test database, every table
is distributed by its tenant column, a reference table or local; every
primary key and unique index of a distributed table and of each of its
partitions carries the tenant column; every foreign key between distributed
tables carries it on both sides in the same position (what Citus asks of
co-located tables); the partitioned tables are still partitioned."""

from __future__ import annotations

import asyncpg
import numpy as np
import pytest
import pytest_asyncio

from tests.helpers import Caller
from tests.vectors.helpers import create_collection, upsert
from tests.vectors.helpers import items as vector_items

pytestmark = pytest.mark.asyncio

# Table -> its tenant (distribution) column. The credit tables and the audit
# log name the tenant user_id: the account's user, the acting user.
DISTRIBUTED = {
    "content": "owner_id",
    "actors": "owner_id",
    "actor_aliases": "owner_id",
    "actor_presences": "owner_id",
    "vector_collections": "owner_id",
    "vector_items": "owner_id",
    "idempotency_keys": "owner_id",
    "credit_accounts": "user_id",
    "credit_allocations": "user_id",
    "credit_reservations": "user_id",
    "credit_entries": "user_id",
    "audit_log": "user_id",
}
REFERENCE = {"credit_rates"}
LOCAL = {"alembic_version"}
# Tables that need no primary key: aliases are identified by their unique
# index (actor_id, lower(alias), owner_id).
WITHOUT_PRIMARY_KEY = {"actor_aliases"}
PARTITIONED = {"content": ("r", ["published_at"]), "vector_items": ("l", ["collection_id"])}

_TOP_LEVEL_TABLES = """
SELECT c.relname FROM pg_class c
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
   AND NOT c.relispartition
"""
_TABLES_WITH_OWNER_ID = """
SELECT c.relname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
   AND NOT c.relispartition AND a.attname = 'owner_id' AND NOT a.attisdropped
"""
# A table and all its partitions (itself alone when it has none).
_TREE = "SELECT relid::regclass::text AS name FROM pg_partition_tree($1::regclass)"
# The key columns of each unique index (primary keys included) of a table; an
# expression is a NULL.
_UNIQUE_INDEXES = """
SELECT i.indexrelid::regclass::text AS name, i.indisprimary AS is_primary,
       array_agg(a.attname ORDER BY k.n) AS columns
  FROM pg_index i
  CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
  LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
 WHERE i.indrelid = $1::regclass AND i.indisunique AND k.n <= i.indnkeyatts
 GROUP BY i.indexrelid, i.indisprimary
"""
# Every foreign key in the public schema (those cloned onto partitions too),
# with its columns and the referred columns, pairwise in order.
_FOREIGN_KEYS = """
SELECT k.conname AS name, k.conrelid::regclass::text AS tab,
       k.confrelid::regclass::text AS referred,
       (SELECT array_agg(a.attname ORDER BY n) FROM unnest(k.conkey) WITH ORDINALITY AS c(attnum, n)
          JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = c.attnum) AS columns,
       (SELECT array_agg(a.attname ORDER BY n) FROM unnest(k.confkey) WITH ORDINALITY AS c(attnum, n)
          JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = c.attnum)
         AS referred_columns
  FROM pg_constraint k
 WHERE k.contype = 'f' AND k.connamespace = 'public'::regnamespace
"""


async def _roots(db: asyncpg.Connection) -> dict[str, str]:
    """Every distributed table and each of its partitions (at any depth) ->
    that table."""
    return {row["name"]: table for table in DISTRIBUTED for row in await db.fetch(_TREE, table)}


@pytest_asyncio.fixture
async def collection_with_items(vector_stub, alice: Caller, drop_vector_collections: None) -> str:
    """A collection of alice's with items, so that its partition exists and
    holds rows; returns the partition's name."""
    name = await create_collection(vector_stub, alice, 2)
    response = await upsert(vector_stub, alice, name, vector_items(np.eye(2, dtype=np.float32)))
    assert response.upserted == 2
    return name


async def test_every_table_is_distributed_reference_or_local(db):
    tables = {row["relname"] for row in await db.fetch(_TOP_LEVEL_TABLES)}
    assert tables == set(DISTRIBUTED) | REFERENCE | LOCAL
    with_owner = {row["relname"] for row in await db.fetch(_TABLES_WITH_OWNER_ID)}
    assert {table for table in with_owner if DISTRIBUTED.get(table) != "owner_id"} == set()


async def test_partitioned_tables_stay_partitioned(db):
    for table, (strategy, columns) in PARTITIONED.items():
        row = await db.fetchrow(
            "SELECT p.partstrat::text AS strategy, "
            "array(SELECT a.attname FROM unnest(p.partattrs) AS k(attnum) "
            "JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = k.attnum) AS columns "
            "FROM pg_partitioned_table p WHERE p.partrelid = $1::regclass",
            table,
        )
        assert row is not None, f"{table} is not partitioned"
        assert (row["strategy"], list(row["columns"])) == (strategy, columns)


async def test_every_key_and_unique_index_carries_the_tenant(db, collection_with_items, alice):
    checked = []
    for table, tenant in DISTRIBUTED.items():
        for part in [row["name"] for row in await db.fetch(_TREE, table)]:
            not_null = await db.fetchval(
                "SELECT attnotnull FROM pg_attribute WHERE attrelid = $1::regclass "
                "AND attname = $2 AND NOT attisdropped",
                part,
                tenant,
            )
            assert not_null, f"{part}.{tenant} is missing or nullable"
            indexes = await db.fetch(_UNIQUE_INDEXES, part)
            if table not in WITHOUT_PRIMARY_KEY:
                assert any(index["is_primary"] for index in indexes), f"{part} has no primary key"
            for index in indexes:
                assert tenant in index["columns"], (
                    f"{index['name']} on {part} lacks {tenant}: {index['columns']}"
                )
            checked.append(part)
    # The partitions were checked too: content's months and the collection's items.
    partition = await db.fetchval(
        "SELECT 'vector_items_' || replace(id::text, '-', '') FROM vector_collections "
        "WHERE owner_id = $1 AND name = $2",
        alice.user_id,
        collection_with_items,
    )
    assert {"content_default", partition} <= set(checked)


async def test_every_foreign_key_between_tenant_tables_carries_the_tenant(db):
    roots = await _roots(db)
    keys = await db.fetch(_FOREIGN_KEYS)
    between_tenant_tables = set()
    for key in keys:
        table = roots.get(key["tab"], key["tab"])
        referred = roots.get(key["referred"], key["referred"])
        if referred in REFERENCE:
            continue  # from anywhere to a reference table: Citus allows it
        assert table in DISTRIBUTED and referred in DISTRIBUTED, (
            f"{key['name']}: {table} -> {referred} is not between tenant tables"
        )
        columns, referred_columns = list(key["columns"]), list(key["referred_columns"])
        assert DISTRIBUTED[table] in columns, f"{key['name']} lacks {DISTRIBUTED[table]}"
        position = columns.index(DISTRIBUTED[table])
        assert referred_columns[position] == DISTRIBUTED[referred], (
            f"{key['name']}: {columns} -> {referred}{referred_columns} pairs the tenant "
            "with another column"
        )
        between_tenant_tables.add(key["name"])
    assert {
        "fk_actor_aliases_actor_id_actors",
        "fk_actor_presences_actor_id_actors",
        "fk_credit_entries_reservation_id_credit_reservations",
        "fk_credit_entries_allocation_id_credit_allocations",
        "fk_credit_entries_user_id_credit_accounts",
    } <= between_tenant_tables


async def test_a_child_row_cannot_name_another_tenants_parent(db, alice, bob):
    actor = await db.fetchval(
        "INSERT INTO actors (owner_id, canonical_name, actor_type) "
        "VALUES ($1, 'Shard Test', 'PERSON') RETURNING id",
        alice.user_id,
    )
    try:
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await db.execute(
                "INSERT INTO actor_presences (actor_id, owner_id, platform, platform_user_id) "
                "VALUES ($1, $2, 'twitter', 'not-bobs')",
                actor,
                bob.user_id,
            )
    finally:
        await db.execute("DELETE FROM actors WHERE id = $1", actor)


async def test_upserted_items_carry_their_collection_owner(
    db, vector_stub, alice, collection_with_items
):
    again = await upsert(
        vector_stub, alice, collection_with_items, vector_items(np.ones((2, 2), dtype=np.float32))
    )
    assert again.upserted == 2  # the same ids: ON CONFLICT on the new key
    owners = await db.fetch(
        "SELECT i.owner_id, count(*) AS n FROM vector_items i "
        "JOIN vector_collections c ON c.id = i.collection_id "
        "WHERE c.owner_id = $1 AND c.name = $2 GROUP BY i.owner_id",
        alice.user_id,
        collection_with_items,
    )
    assert [(row["owner_id"], row["n"]) for row in owners] == [(alice.user_id, 2)]

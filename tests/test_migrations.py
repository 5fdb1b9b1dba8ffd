"""Alembic migrations: upgrade, downgrade, upgrade again; partitions."""

import asyncio
import os
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import create_async_engine

from server import migrate
from server.db import normalize_database_url
from server.schema import metadata
from server.urls import normalize_url

pytestmark = pytest.mark.asyncio
CREDIT_TABLES = (
    "credit_accounts",
    "credit_allocations",
    "credit_reservations",
    "credit_entries",
    "credit_rates",
)


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row["tablename"] for row in rows}
    finally:
        await conn.close()


async def _has_extension(url: str, name: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = $1", name))
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def scratch_url(postgres):
    if postgres.embedded is None:
        pytest.skip("needs the embedded server to make a scratch database")
    name = f"observatory_migrations_{os.getpid()}"
    url = await asyncio.to_thread(postgres.embedded.ensure_database, name, fresh=True)
    yield url
    await asyncio.to_thread(postgres.embedded.drop_database, name)


async def test_upgrade_downgrade_upgrade(scratch_url):
    await asyncio.to_thread(migrate.upgrade, scratch_url)
    tables = await _tables(scratch_url)
    assert {"content", "content_default", "audit_log", "idempotency_keys"} <= tables
    assert {"actors", "actor_aliases", "actor_presences"} <= tables
    assert await _has_extension(scratch_url, "pg_trgm")
    assert set(CREDIT_TABLES) <= tables
    assert {"vector_collections", "vector_items"} <= tables
    this_month = "content_p" + datetime.now(UTC).strftime("%Y%m")
    assert this_month in tables

    await asyncio.to_thread(migrate.downgrade, scratch_url, "base")
    assert await _tables(scratch_url) == {"alembic_version"}
    assert not await _has_extension(scratch_url, "pg_trgm")  # migration 0002 made it

    await asyncio.to_thread(migrate.upgrade, scratch_url)
    assert {"content", "audit_log", "idempotency_keys", this_month} <= await _tables(scratch_url)


async def test_partitions_reach_a_year_ahead(db):
    now = datetime.now(UTC)
    months = []
    year, month = now.year, now.month
    for _ in range(13):
        months.append(f"content_p{year:04d}{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    present = {
        row["relname"]
        for row in await db.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'content'::regclass"
        )
    }
    assert set(months) <= present


async def test_new_partition_takes_its_rows_out_of_the_default_partition(db):
    owner = uuid.uuid4()
    far = datetime(2091, 5, 17, 12, 0, tzinfo=UTC)
    await db.execute(
        "INSERT INTO content (owner_id, platform, title, published_at) VALUES ($1, 'test', 'far future', $2)",
        owner,
        far,
    )
    where = "SELECT tableoid::regclass::text FROM content WHERE owner_id = $1"
    assert await db.fetchval(where, owner) == "content_default"

    made = await db.fetchval("SELECT content_ensure_partitions($1::date, 1)", far.date())

    assert made == 1
    assert await db.fetchval(where, owner) == "content_p209105"
    assert await db.fetchval("SELECT count(*) FROM content WHERE owner_id = $1", owner) == 1


def _is_partition(obj, name, type_, reflected, compare_to) -> bool:
    return type_ == "table" and (
        name.startswith(("content_p", "vector_items_")) or name == "content_default"
    )


async def test_the_tables_the_code_uses_match_what_the_migrations_made(database_url):
    url, connect_args = normalize_database_url(database_url)
    engine = create_async_engine(url, connect_args=connect_args)
    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(
                        sync, opts={"include_object": lambda *a: not _is_partition(*a)}
                    ),
                    metadata,
                )
            )
    finally:
        await engine.dispose()
    assert differences == []


async def test_actors_downgrade_keeps_a_pg_trgm_it_did_not_create(scratch_url):
    script = ScriptDirectory.from_config(migrate.alembic_config(scratch_url))
    before_actors = script.get_revision("0002").down_revision
    await asyncio.to_thread(migrate.upgrade, scratch_url, before_actors)
    conn = await asyncpg.connect(scratch_url)
    try:
        await conn.execute("CREATE EXTENSION pg_trgm")
    finally:
        await conn.close()
    await asyncio.to_thread(migrate.upgrade, scratch_url)
    await asyncio.to_thread(migrate.downgrade, scratch_url, before_actors)

    assert await _has_extension(scratch_url, "pg_trgm")
    assert "actors" not in await _tables(scratch_url)


async def test_duplicates_migration_fills_url_normalized_for_existing_rows(scratch_url):
    await asyncio.to_thread(migrate.upgrade, scratch_url, "0001")
    conn = await asyncpg.connect(scratch_url)
    try:
        urls = ["https://www.Example.com/a/?utm_source=x&b=1", None, "http://example.com/a?b=1"]
        for i, url in enumerate(urls):
            await conn.execute(
                "INSERT INTO content (owner_id, platform, title, url, published_at) "
                "VALUES ($1, 'test', $2, $3, now())",
                uuid.uuid4(),
                f"row {i}",
                url,
            )
        await asyncio.to_thread(migrate.upgrade, scratch_url, "0005")
        rows = await conn.fetch("SELECT url, url_normalized FROM content ORDER BY title")
        assert [row["url_normalized"] for row in rows] == [normalize_url(url) for url in urls]
        await asyncio.to_thread(migrate.downgrade, scratch_url, "0001")
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM information_schema.columns "
                "WHERE table_name = 'content' AND column_name = 'url_normalized'"
            )
            == 0
        )
    finally:
        await conn.close()


# -- 0007: shard-ready keys ------------------------------------------------------

SHARD_READY = "0007"
# Every table whose rows 0007 must keep, with what identifies a row.
KEPT_TABLES = {
    "actors": "id",
    "actor_aliases": "actor_id, alias",
    "actor_presences": "id",
    "content": "id",
    "vector_collections": "id",
    "vector_items": "collection_id, id",
    "credit_accounts": "user_id",
    "credit_allocations": "id",
    "credit_reservations": "id",
    "credit_entries": "id",
    "audit_log": "id",
    "idempotency_keys": "owner_id, request_id",
}


async def _columns(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """The columns each of KEPT_TABLES has now (later migrations may add more)."""
    return {
        table: [
            row["attname"]
            for row in await conn.fetch(
                "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass "
                "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                table,
            )
        ]
        for table in KEPT_TABLES
    }


async def _rows(conn: asyncpg.Connection, columns: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every row of KEPT_TABLES, those `columns` of it, as JSON text."""
    return {
        table: [
            row[0]
            for row in await conn.fetch(
                f"SELECT to_jsonb(t)::text FROM (SELECT {', '.join(columns[table])} "
                f"FROM {table} ORDER BY {order}) t"
            )
        ]
        for table, order in KEPT_TABLES.items()
    }


async def _primary_key(conn: asyncpg.Connection, table: str) -> list[str]:
    return list(
        await conn.fetchval(
            "SELECT array_agg(a.attname ORDER BY k.n) FROM pg_constraint c, "
            "unnest(c.conkey) WITH ORDINALITY AS k(attnum, n) "
            "JOIN pg_attribute a ON a.attrelid = $1::regclass AND a.attnum = k.attnum "
            "WHERE c.conrelid = $1::regclass AND c.contype = 'p'",
            table,
        )
    )


async def _storage(conn: asyncpg.Connection, relation: str) -> int:
    """The relation's file: it changes whenever the relation is rewritten."""
    return int(await conn.fetchval("SELECT pg_relation_filenode($1::regclass)", relation))


async def _fill_at_0006(conn: asyncpg.Connection) -> dict[str, Any]:
    """A little of everything 0007 changes, written as the code before it did."""
    owner, other, admin = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    actor = await conn.fetchval(
        "INSERT INTO actors (owner_id, canonical_name, actor_type) "
        "VALUES ($1, 'Ada', 'PERSON') RETURNING id",
        owner,
    )
    await conn.execute(
        "INSERT INTO actor_aliases (actor_id, owner_id, alias) VALUES ($1, $2, 'A. L.')",
        actor,
        owner,
    )
    await conn.execute(
        "INSERT INTO actor_presences (actor_id, owner_id, platform, platform_user_id) "
        "VALUES ($1, $2, 'twitter', 'ada')",
        actor,
        owner,
    )
    await conn.execute(
        "INSERT INTO content (owner_id, platform, platform_id, title, author_id, published_at) "
        "VALUES ($1, 'twitter', 't1', 'hello', $2, now())",
        owner,
        actor,
    )
    collections = {}
    for who, name in ((owner, "full"), (other, "empty")):
        collection = await conn.fetchval(
            "INSERT INTO vector_collections (owner_id, name, dimension, metric, precision, "
            "hnsw_m, hnsw_ef_construction) VALUES ($1, $2, 2, 'cosine', 'float32', 16, 64) "
            "RETURNING id",
            who,
            name,
        )
        partition = f"vector_items_{collection.hex}"
        await conn.execute(
            f"CREATE TABLE \"{partition}\" PARTITION OF vector_items FOR VALUES IN ('{collection}')"
        )
        await conn.execute(
            f'CREATE INDEX "{partition}_hnsw" ON "{partition}" USING hnsw '
            "((embedding::vector(2)) vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
        )
        collections[name] = (collection, who, partition)
    full, _, _ = collections["full"]
    for i in range(3):
        await conn.execute(
            "INSERT INTO vector_items (collection_id, id, embedding, text, metadata) "
            "VALUES ($1, $2, $3::vector, $4, '{\"n\": 1}')",
            full,
            f"item-{i}",
            f"[{i + 1},1]",
            f"text {i}",
        )
    await conn.fetchrow(
        "SELECT * FROM credit_grant($1, NULL, NULL, NULL, $2, 100, 'welcome', now(), NULL)",
        admin,
        owner,
    )
    settled = await conn.fetchval(
        "SELECT id FROM credit_reserve($1, $2, $3, NULL, $1, 30, 'run-1', '1 hour')",
        owner,
        uuid.uuid4(),
        b"digest",
    )
    await conn.fetchrow(
        "SELECT * FROM credit_resolve($1, NULL, NULL, NULL, $1, $2, 10)", owner, settled
    )
    await conn.fetchrow(
        "SELECT * FROM credit_reserve($1, NULL, NULL, NULL, $1, 5, 'run-2', '1 hour')", owner
    )
    return {"owner": owner, "actor": actor, "collections": collections}


async def test_shard_ready_keys_keep_the_data_up_down_and_up_again(scratch_url):
    script = ScriptDirectory.from_config(migrate.alembic_config(scratch_url))
    before = script.get_revision(SHARD_READY).down_revision
    assert isinstance(before, str)
    await asyncio.to_thread(migrate.upgrade, scratch_url, before)
    conn = await asyncpg.connect(scratch_url)
    try:
        made = await _fill_at_0006(conn)
        columns = await _columns(conn)
        rows = await _rows(conn, columns)
        assert all(rows.values())
        _, owner, partition = made["collections"]["full"]
        files = {name: await _storage(conn, name) for name in (partition, f"{partition}_hnsw")}

        await asyncio.to_thread(migrate.upgrade, scratch_url)
        assert await _rows(conn, columns) == rows
        assert await _primary_key(conn, "actors") == ["id", "owner_id"]
        assert await _primary_key(conn, "content") == ["id", "published_at", "owner_id"]
        assert await _primary_key(conn, "credit_entries") == ["id", "user_id"]
        assert await _primary_key(conn, "vector_items") == ["collection_id", "id", "owner_id"]
        assert await _primary_key(conn, partition) == ["collection_id", "id", "owner_id"]
        # Each item took its collection's owner, without its table or its HNSW
        # index being rewritten, and the partition is one again.
        owners = await conn.fetch(
            "SELECT DISTINCT i.owner_id = c.owner_id AS same FROM vector_items i "
            "JOIN vector_collections c ON c.id = i.collection_id"
        )
        assert [row["same"] for row in owners] == [True]
        assert (
            await conn.fetchval(f'SELECT count(*) FROM "{partition}" WHERE owner_id = $1', owner)
            == 3
        )
        assert {name: await _storage(conn, name) for name in files} == files
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'vector_items'::regclass"
        ) == len(made["collections"])
        assert await conn.fetchval(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = $1::regclass",
            f"{partition}_hnsw",
        )
        # The credit functions of 0006 still post through the new references.
        await conn.fetchrow(
            "SELECT * FROM credit_reserve($1, NULL, NULL, NULL, $1, 5, 'run-3', '1 hour')",
            made["owner"],
        )
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                "INSERT INTO actor_aliases (actor_id, owner_id, alias) VALUES ($1, $2, 'x')",
                made["actor"],
                uuid.uuid4(),
            )
        rows = await _rows(conn, columns)

        await asyncio.to_thread(migrate.downgrade, scratch_url, before)
        assert await _rows(conn, columns) == rows
        assert await _primary_key(conn, "actors") == ["id"]
        assert await _primary_key(conn, "content") == ["id", "published_at"]
        assert await _primary_key(conn, "vector_items") == ["collection_id", "id"]
        assert not await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name LIKE 'vector_items%' AND column_name = 'owner_id'"
        )

        await asyncio.to_thread(migrate.upgrade, scratch_url)
        assert await _rows(conn, columns) == rows
        assert await _primary_key(conn, "vector_items") == ["collection_id", "id", "owner_id"]
        assert (
            await conn.fetchval(f'SELECT count(*) FROM "{partition}" WHERE owner_id = $1', owner)
            == 3
        )
    finally:
        await conn.close()


async def test_live_content_index_covers_every_partition_and_serves_counts(scratch_url):
    # Rows before 0009, in this month's partition and in the default one (a
    # year past the last monthly partition).
    await asyncio.to_thread(migrate.upgrade, scratch_url, "0008")
    owner = uuid.uuid4()
    conn = await asyncpg.connect(scratch_url)
    try:
        await conn.execute(
            "INSERT INTO content (id, owner_id, platform, platform_id, content_type, "
            "published_at, delete_time) SELECT gen_random_uuid(), $1, 'p', g::text, 'post', "
            "CASE WHEN g % 2 = 0 THEN now() ELSE now() + interval '3 years' END, "
            "CASE WHEN g % 5 = 0 THEN now() END FROM generate_series(1, 200) g",
            owner,
        )
        await asyncio.to_thread(migrate.upgrade, scratch_url)
        assert await conn.fetchval(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = "
            "'ix_content_live_owner_published'::regclass"
        )
        partitions = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'content'::regclass"
        )
        attached = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits "
            "WHERE inhparent = 'ix_content_live_owner_published'::regclass"
        )
        assert attached == partitions > 12
        await conn.execute("VACUUM ANALYZE content")
        count = "SELECT count(*) FROM content WHERE owner_id = $1 AND delete_time IS NULL"
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {count}", owner))
            assert "Index Only Scan using content_" in plan and "live_owner_published" in plan
        assert await conn.fetchval(count, owner) == 160

        await asyncio.to_thread(migrate.downgrade, scratch_url, "0008")
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relname LIKE '%live_owner_published%'"
        )
    finally:
        await conn.close()

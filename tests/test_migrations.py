"""Alembic migrations: upgrade, downgrade, upgrade again; partitions."""

import asyncio
import os
import uuid
from datetime import UTC, datetime

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

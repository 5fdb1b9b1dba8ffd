"""Fixtures: a primary with a hot standby (tests/scaling/cluster.py), migrated
once; a server using the primary for writes and the standby for reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc
import pytest
import pytest_asyncio

from server import migrate
from server.app import App, create_server
from tests.conftest import make_settings
from tests.scaling.cluster import Cluster

DATABASE = "observatory"
# Small, so that the lag test does not wait long; the probe runs every 0.5 s.
MAX_LAG_S = 1.0


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        cluster.create()
        with_database(cluster)
        yield cluster
    finally:
        cluster.destroy()


def with_database(cluster: Cluster) -> None:
    async def create() -> None:
        conn = await asyncpg.connect(cluster.primary.url())
        try:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()

    asyncio.run(create())
    migrate.upgrade(cluster.primary.url(DATABASE))


@pytest_asyncio.fixture(scope="session")
async def replicated(cluster: Cluster) -> AsyncIterator[App]:
    """A server with DATABASE_URL the primary and DATABASE_READ_URL the standby."""
    await wait_for_replay(cluster)
    settings = make_settings(
        DATABASE_READ_URL=cluster.standby.url(DATABASE),
        OBSERVATORY_MAX_REPLICA_LAG_S=MAX_LAG_S,
    )
    app = await create_server(settings, cluster.primary.url(DATABASE))
    yield app
    await app.stop(0)


@pytest_asyncio.fixture(scope="session")
async def replicated_channel(replicated: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replicated.port}") as channel:
        yield channel


async def wait_for_replay(cluster: Cluster, lsn: str | None = None, timeout: float = 10) -> None:
    """Until the standby has replayed `lsn` (default: all the primary wrote)."""
    primary = await asyncpg.connect(cluster.primary.url())
    standby = await asyncpg.connect(cluster.standby.url())
    try:
        target = lsn or await primary.fetchval("SELECT pg_current_wal_insert_lsn()::text")
        query = "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn"
        async with asyncio.timeout(timeout):
            while True:
                if await standby.fetchval(query, target):
                    return
                await asyncio.sleep(0.05)
    finally:
        await primary.close()
        await standby.close()

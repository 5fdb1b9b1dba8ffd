"""Fixtures: one real PostgreSQL (embedded, or DATABASE_URL), migrated once by
Alembic; one real server on a loopback port; a fresh user per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from observatory.v1 import (
    actor_pb2_grpc,
    admin_pb2_grpc,
    content_pb2_grpc,
    credit_pb2_grpc,
    vector_pb2_grpc,
)

from server import migrate
from server.app import App, create_server
from server.embedded import EmbeddedPostgres
from server.settings import Settings
from tests.helpers import TEST_SECRET, Caller, new_caller

ROOT = Path(__file__).resolve().parent.parent
# Servers started by tests (in process or as `python -m server`) have no HTTP
# side port unless a test asks for one (tests/ops/), so runs never clash on it.
os.environ.setdefault("OBSERVATORY_HTTP_LISTEN", "")
TEST_DATA_DIR = Path(os.environ.get("OBSERVATORY_TEST_DATA_DIR", ROOT / ".data" / "test"))


@dataclass
class TestDatabase:
    url: str
    embedded: EmbeddedPostgres | None


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "OBSERVATORY_LISTEN": "127.0.0.1:0",
        "OBSERVATORY_JWT_SECRET": TEST_SECRET,
        "OBSERVATORY_DATA_DIR": str(TEST_DATA_DIR),
        "OBSERVATORY_HEALTH_INTERVAL": 0.5,
        "OBSERVATORY_SHUTDOWN_GRACE": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def postgres() -> Iterator[TestDatabase]:
    """DATABASE_URL when set (it should name a throwaway database), otherwise a
    fresh database on the embedded server in .data/test."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield TestDatabase(url=url, embedded=None)
        return
    embedded = EmbeddedPostgres(TEST_DATA_DIR)
    embedded.start()
    # One database per session, so concurrent sessions never share rows.
    name = f"observatory_test_{os.getpid()}"
    try:
        yield TestDatabase(url=embedded.ensure_database(name, fresh=True), embedded=embedded)
        embedded.drop_database(name)
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
def database_url(postgres: TestDatabase) -> str:
    migrate.upgrade(postgres.url)
    return postgres.url


@pytest_asyncio.fixture(scope="session")
async def app(database_url: str) -> AsyncIterator[App]:
    app = await create_server(make_settings(), database_url)
    yield app
    await app.stop(0)


@pytest_asyncio.fixture(scope="session")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection for checking what the service stored."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
def content_stub(channel: grpc.aio.Channel) -> content_pb2_grpc.ContentServiceStub:
    return content_pb2_grpc.ContentServiceStub(channel)


@pytest.fixture
def admin_stub(channel: grpc.aio.Channel) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture
def alice() -> Caller:
    return new_caller()


@pytest.fixture
def bob() -> Caller:
    return new_caller()


@pytest.fixture
def admin() -> Caller:
    return new_caller("admin")


@pytest.fixture
def actor_stub(channel: grpc.aio.Channel) -> actor_pb2_grpc.ActorServiceStub:
    return actor_pb2_grpc.ActorServiceStub(channel)


@pytest.fixture
def credit_stub(channel: grpc.aio.Channel) -> credit_pb2_grpc.CreditServiceStub:
    return credit_pb2_grpc.CreditServiceStub(channel)


@pytest.fixture
def vector_stub(channel: grpc.aio.Channel) -> vector_pb2_grpc.VectorServiceStub:
    return vector_pb2_grpc.VectorServiceStub(channel)


@pytest_asyncio.fixture(scope="module")
async def drop_vector_collections(database_url: str) -> AsyncIterator[None]:
    """After the module: every collection and its partition gone, so the shared
    database keeps only the tables the migrations made."""
    yield
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            for row in await conn.fetch("DELETE FROM vector_collections RETURNING id"):
                await conn.execute(f'DROP TABLE IF EXISTS "vector_items_{row["id"].hex}"')
    finally:
        await conn.close()

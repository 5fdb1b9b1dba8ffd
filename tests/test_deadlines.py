"""A client deadline or cancellation stops the SQL it started and returns its
connection to the pool."""

import asyncio
import uuid

import asyncpg
import grpc
import pytest
import pytest_asyncio
from observatory.v1 import content_pb2

from server.app import App
from tests.helpers import make_content, wait_until

pytestmark = pytest.mark.asyncio


async def _blocked_update_statements(db: asyncpg.Connection) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = 'observatory' AND wait_event_type = 'Lock' AND state = 'active'"
    )


@pytest_asyncio.fixture
async def locked_content(content_stub, alice, database_url):
    """A content row of alice's, locked by another transaction for the test's duration."""
    created = await content_stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content()), metadata=alice.metadata
    )
    holder = await asyncpg.connect(database_url)
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("SELECT 1 FROM content WHERE id = $1 FOR UPDATE", uuid.UUID(created.id))
    yield created
    await transaction.rollback()
    await holder.close()


async def test_deadline_cancels_the_running_statement(
    app: App, content_stub, alice, db, locked_content
):
    update = make_content(title="changed")
    update.id = locked_content.id
    call = content_stub.UpdateContent(
        content_pb2.UpdateContentRequest(content=update, update_mask={"paths": ["title"]}),
        metadata=alice.metadata,
        timeout=1.5,
    )

    async def blocked() -> bool:
        return await _blocked_update_statements(db) == 1

    assert await wait_until(blocked, timeout=1.4), "the update never reached the lock"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def released() -> bool:
        return await _blocked_update_statements(db) == 0 and app.units.pool.checkedout() == 0

    assert await wait_until(released), (
        "the blocked statement kept running or its connection stayed checked out"
    )


async def test_client_cancellation_cancels_the_running_statement(
    app: App, content_stub, alice, db, locked_content
):
    update = make_content(title="changed")
    update.id = locked_content.id
    call = content_stub.UpdateContent(
        content_pb2.UpdateContentRequest(content=update, update_mask={"paths": ["title"]}),
        metadata=alice.metadata,
    )

    async def blocked() -> bool:
        return await _blocked_update_statements(db) == 1

    assert await wait_until(blocked), "the update never reached the lock"
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def released() -> bool:
        return await _blocked_update_statements(db) == 0 and app.units.pool.checkedout() == 0

    assert await wait_until(released), (
        "the cancelled statement kept running or its connection stayed checked out"
    )


async def test_cancelled_ingest_stream_stores_nothing_and_frees_its_connection(
    app: App, content_stub, alice, db
):
    sent = asyncio.Event()

    async def stream():
        yield content_pb2.IngestContentRequest(contents=[make_content() for _ in range(100)])
        sent.set()
        await asyncio.sleep(30)  # the client goes quiet, then gives up

    call = content_stub.IngestContent(stream(), metadata=alice.metadata)
    await sent.wait()
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def released() -> bool:
        return app.units.pool.checkedout() == 0

    assert await wait_until(released)
    assert await db.fetchval("SELECT count(*) FROM content WHERE owner_id = $1", alice.user_id) == 0

"""Time limits: every session starts with OBSERVATORY_STATEMENT_TIMEOUT_S as its
statement timeout and is ended by the server when it idles in a transaction
that long; each call's deadline is recorded for the statements it runs; the
partitions content needs are made with a short lock timeout and retried, so
they never stall traffic behind them."""

from __future__ import annotations

import asyncio
import time
from datetime import date

import asyncpg
import grpc
import pytest
import pytest_asyncio
from observatory.v1 import content_pb2

from server import deadlines
from server.app import App
from server.auth import Authenticator
from server.content.partitions import keep_partitions_ready, partition_name
from server.db import create_engine
from server.interceptor import ObservatoryInterceptor
from tests.conftest import make_settings
from tests.helpers import new_caller

pytestmark = pytest.mark.asyncio


async def _setting(app: App, name: str) -> str:
    async with app.units.read() as uow:
        value: str = await uow.driver.fetchval(f"SHOW {name}")
    return value


async def test_sessions_start_with_the_statement_and_idle_timeouts(app: App) -> None:
    assert await _setting(app, "statement_timeout") == "1min"
    assert await _setting(app, "idle_in_transaction_session_timeout") == "1min"


@pytest_asyncio.fixture
async def quick_driver(database_url: str):
    """A session as the server's pool opens them, for a server whose statements
    may run for 0.5 s at most."""
    engine = create_engine(make_settings(OBSERVATORY_STATEMENT_TIMEOUT_S=0.5), database_url)
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        yield raw.driver_connection
    await engine.dispose()


async def test_a_statement_longer_than_the_limit_is_cancelled(quick_driver) -> None:
    started = time.monotonic()
    with pytest.raises(asyncpg.QueryCanceledError):
        await quick_driver.execute("SELECT pg_sleep(5)")
    assert time.monotonic() - started < 3


async def test_a_session_idle_in_a_transaction_is_ended(quick_driver) -> None:
    transaction = quick_driver.transaction()
    await transaction.start()
    await quick_driver.execute("SELECT 1")
    await asyncio.sleep(1.5)  # the server ends the session after 0.5 s
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
        await quick_driver.execute("SELECT 2")
    assert quick_driver.is_closed()


# -- deadlines -------------------------------------------------------------------------


async def test_without_a_deadline_statements_get_the_ceiling() -> None:
    deadlines.begin_call(None)
    assert deadlines.remaining() is None
    assert deadlines.statement_timeout_ms(60) == 60_000


@pytest.mark.parametrize(
    ("remaining", "ceiling", "expected"),
    [
        (4.3, 60, 4_000),
        (0.9, 60, 750),
        (0.01, 60, 50),
        (120, 60, 60_000),
        (30, 0.5, 500),
        (59.9, 60, 45_000),
    ],
)
async def test_a_nearer_deadline_lowers_the_timeout(remaining, ceiling, expected) -> None:
    deadlines.begin_call(remaining)
    assert deadlines.statement_timeout_ms(ceiling) == expected
    deadlines.begin_call(None)


async def _seen_deadline(request: bytes, context) -> bytes:
    """Answers with the statement timeout the call's statements would get."""
    return str(deadlines.statement_timeout_ms(60)).encode()


@pytest_asyncio.fixture
async def echo_channel():
    server = grpc.aio.server(interceptors=[ObservatoryInterceptor(Authenticator(make_settings()))])
    handler = grpc.unary_unary_rpc_method_handler(
        _seen_deadline, request_deserializer=lambda raw: raw, response_serializer=lambda raw: raw
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Deadline", {"Seen": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(0)


async def test_the_interceptor_records_each_calls_deadline(echo_channel) -> None:
    seen = echo_channel.unary_unary("/test.Deadline/Seen")
    metadata = new_caller().metadata
    assert await seen(b"", metadata=metadata, timeout=5) in (b"4000", b"5000")
    assert await seen(b"", metadata=metadata, timeout=0.8) in (b"500", b"750")
    assert await seen(b"", metadata=metadata) == b"60000"


@pytest.mark.parametrize("unit", ["read", "snapshot", "write", "autocommit"])
async def test_a_units_statements_run_within_the_calls_deadline(app: App, unit: str) -> None:
    deadlines.begin_call(1.0)
    try:
        async with getattr(app.units, unit)() as uow:
            within_deadline = await uow.driver.fetchval("SHOW statement_timeout")
    finally:
        deadlines.begin_call(None)
    assert within_deadline == "750ms"
    assert await _setting(app, "statement_timeout") == "1min"


# -- partitions ------------------------------------------------------------------------


FAR_MONTH = date(2091, 3, 1)


@pytest_asyncio.fixture
async def far_partition(db: asyncpg.Connection):
    await db.execute(f"DROP TABLE IF EXISTS {partition_name(FAR_MONTH)}")
    yield partition_name(FAR_MONTH)
    await db.execute(f"DROP TABLE IF EXISTS {partition_name(FAR_MONTH)}")


async def test_a_partition_is_made_ahead(app: App, db, far_partition) -> None:
    made = await keep_partitions_ready(app.units, 0, today=FAR_MONTH)
    assert made == 1
    assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", far_partition)
    assert await keep_partitions_ready(app.units, 0, today=FAR_MONTH) == 0


async def test_partition_upkeep_gives_way_to_traffic(
    app: App, database_url, db, far_partition, content_stub
) -> None:
    """While a long transaction holds content, the upkeep waits at most its short
    lock timeout each try, so the reads queued behind it are never stalled; it
    gives up for this round, and makes the partition once the table is free."""
    holder = await asyncpg.connect(database_url)
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("LOCK TABLE content_default IN ACCESS SHARE MODE")
    caller = new_caller()
    try:
        upkeep = asyncio.create_task(
            keep_partitions_ready(app.units, 0, today=FAR_MONTH, attempts=3)
        )
        slowest = 0.0
        while not upkeep.done():
            started = time.monotonic()
            await content_stub.ListContent(
                content_pb2.ListContentRequest(), metadata=caller.metadata
            )
            slowest = max(slowest, time.monotonic() - started)
            await asyncio.sleep(0.05)
        assert await upkeep == 0
        assert slowest < 1.0, f"a read waited {slowest:.2f} s behind the upkeep"
        assert not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", far_partition)
    finally:
        await transaction.rollback()
        await holder.close()
    assert await keep_partitions_ready(app.units, 0, today=FAR_MONTH) == 1

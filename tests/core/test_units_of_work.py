"""server.uow: one connection and at most one transaction per unit of work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text

from server import errors, replicas
from server.db import connect_directly, create_engine
from server.uow import Database
from tests.conftest import make_settings

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def units(database_url: str) -> AsyncIterator[Database]:
    database = Database(
        create_engine(make_settings(), database_url), lambda: connect_directly(database_url)
    )
    async with database.write() as uow:
        await uow.driver.execute("CREATE TABLE IF NOT EXISTS uow_probe (n int)")
        await uow.driver.execute("TRUNCATE uow_probe")
    yield database
    async with database.write() as uow:
        await uow.driver.execute("DROP TABLE uow_probe")
    await database.dispose()


async def test_read_runs_outside_any_transaction(units):
    async with units.read() as uow:
        assert not uow.driver.is_in_transaction()
        # Autocommit: each statement commits on its own, nothing to roll back.
        await uow.driver.execute("INSERT INTO uow_probe VALUES (1)")
    async with units.read() as uow:
        assert await uow.driver.fetchval("SELECT count(*) FROM uow_probe") == 1


async def test_snapshot_is_one_read_only_repeatable_read_transaction(units, db):
    async with units.snapshot() as uow:
        settings = (
            await uow.conn.execute(
                text(
                    "SELECT current_setting('transaction_isolation'), "
                    "current_setting('transaction_read_only')"
                )
            )
        ).one()
        assert tuple(settings) == ("repeatable read", "on")
        before = await uow.driver.fetchval("SELECT count(*) FROM uow_probe")
        await db.execute("INSERT INTO uow_probe VALUES (1)")  # another session commits
        # SQLAlchemy and the driver see the same snapshot, which predates it.
        assert await uow.driver.fetchval("SELECT count(*) FROM uow_probe") == before
        assert (await uow.conn.execute(text("SELECT count(*) FROM uow_probe"))).scalar() == before
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await uow.driver.execute("INSERT INTO uow_probe VALUES (2)")


async def test_write_commits_core_and_driver_statements_together(units, db):
    async with units.write() as uow:
        await uow.conn.execute(text("INSERT INTO uow_probe VALUES (1)"))
        await uow.driver.execute("INSERT INTO uow_probe VALUES (2)")
        assert await db.fetchval("SELECT count(*) FROM uow_probe") == 0  # not yet visible
    assert await db.fetchval("SELECT count(*) FROM uow_probe") == 2


async def test_write_rolls_back_everything_on_an_error(units, db):
    with pytest.raises(errors.NotFound):
        async with units.write() as uow:
            await uow.conn.execute(text("INSERT INTO uow_probe VALUES (1)"))
            await uow.driver.execute("INSERT INTO uow_probe VALUES (2)")
            raise errors.NotFound("gone")
    assert await db.fetchval("SELECT count(*) FROM uow_probe") == 0
    assert units.pool.checkedout() == 0


async def test_savepoint_undoes_only_its_own_statements(units, db):
    async with units.write() as uow:
        await uow.driver.execute("INSERT INTO uow_probe VALUES (1)")
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with uow.savepoint():
                await uow.driver.execute("INSERT INTO uow_probe VALUES (2)")
                await uow.driver.execute("SELECT 1 / 0")
    assert await db.fetchval("SELECT array_agg(n) FROM uow_probe") == [1]


async def test_a_statement_error_keeps_the_connection(units):
    async with units.write() as uow:
        first = uow.driver
    with pytest.raises(asyncpg.DivisionByZeroError):
        async with units.write() as uow:
            await uow.driver.execute("SELECT 1 / 0")
    async with units.read() as uow:
        assert uow.driver is first
        assert not uow.driver.is_in_transaction()


async def test_cancelled_mid_statement_discards_the_connection(units):
    async def slow() -> None:
        async with units.write() as uow:
            await uow.driver.execute("SELECT pg_sleep(30)")

    task = asyncio.create_task(slow())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert units.pool.checkedout() == 0
    async with units.read() as uow:  # the pool still serves
        assert await uow.driver.fetchval("SELECT 1") == 1


async def test_session_settings_are_remembered_per_connection(units):
    async with units.read() as uow:
        await uow.use_settings({"work_mem": "7MB"})
        assert await uow.driver.fetchval("SHOW work_mem") == "7MB"
        await uow.driver.execute("SET work_mem = '5MB'")  # behind its back
        await uow.use_settings({"work_mem": "7MB"})  # remembered: no round trip
        assert await uow.driver.fetchval("SHOW work_mem") == "5MB"
        await uow.use_settings({"work_mem": "9MB"})
        assert await uow.driver.fetchval("SHOW work_mem") == "9MB"


async def test_session_settings_in_a_rolled_back_unit_are_forgotten(units):
    with pytest.raises(errors.Aborted):
        async with units.snapshot() as uow:
            await uow.use_settings({"work_mem": "11MB"})
            raise errors.Aborted("conflict")
    async with units.read() as uow:
        assert await uow.driver.fetchval("SHOW work_mem") != "11MB"
        await uow.use_settings({"work_mem": "11MB"})  # so it is set again
        assert await uow.driver.fetchval("SHOW work_mem") == "11MB"


async def test_ping_uses_a_connection_outside_the_pool(units):
    held = [await units.engine.connect() for _ in range(units.pool.size())]
    try:
        await asyncio.wait_for(units.ping(), 5)
    finally:
        for conn in held:
            await conn.close()


async def test_driver_read_runs_on_a_pooled_driver_outside_any_transaction(units):
    async with units.read() as uow:
        pooled = uow.driver
    async with units.driver_read() as uow:
        assert uow.driver is pooled  # the same pool, without a SQLAlchemy Connection
        assert not uow.driver.is_in_transaction()
        assert await uow.driver.fetchval("SELECT 1") == 1
        with pytest.raises(Exception, match="not been started"):
            await uow.conn.execute(text("SELECT 1"))
    assert units.pool.checkedout() == 0


async def test_a_broken_driver_read_connection_is_discarded(units):
    with pytest.raises(asyncpg.InterfaceError):
        async with units.driver_read() as uow:
            broken = uow.driver
            broken.terminate()
            await uow.driver.fetchval("SELECT 1")
    assert units.pool.checkedout() == 0
    async with units.driver_read() as uow:
        assert uow.driver is not broken
        assert await uow.driver.fetchval("SELECT 2") == 2


async def _committed_write(units: Database) -> tuple[int, int]:
    """One RPC's write unit: the WAL position before its commit, and the one
    the RPC would answer as x-observatory-lsn."""
    call = replicas.begin_call(None)
    async with units.autocommit() as uow:
        before = replicas.parse_lsn(
            await uow.driver.fetchval("SELECT pg_current_wal_insert_lsn()::text")
        )
        await uow.driver.execute("INSERT INTO uow_probe VALUES (1)")
    assert call.written is not None
    return before, call.written


async def test_a_write_gets_its_wal_position_after_giving_its_connection_back(units):
    pooled: list[int] = []
    ask = units.wal_positions._fetch

    async def asked() -> str:
        pooled.append(units.pool.checkedout())  # type: ignore[attr-defined]
        return await ask()

    units.wal_positions._fetch = asked  # type: ignore[method-assign]
    before, written = await _committed_write(units)
    assert written > before
    assert pooled == [0]


async def test_concurrent_commits_share_wal_position_questions(units):
    asked = 0
    ask = units.wal_positions._fetch

    async def counted() -> str:
        nonlocal asked
        asked += 1
        return await ask()

    units.wal_positions._fetch = counted  # type: ignore[method-assign]
    writes = await asyncio.gather(
        *(asyncio.create_task(_committed_write(units)) for _ in range(40))
    )
    # Each answer is past its own commit, yet far fewer questions were asked.
    assert all(written > before for before, written in writes)
    assert asked < 40
    async with units.read() as uow:
        assert await uow.driver.fetchval("SELECT count(*) FROM uow_probe") == 40


async def test_writes_go_on_when_the_database_ends_the_wal_connection(units, db):
    await _committed_write(units)
    conn = units.wal_positions._conn
    assert conn is not None
    assert await db.fetchval("SELECT pg_terminate_backend($1)", conn.get_server_pid())
    # Whether the next RPC still gets a position depends on when the driver
    # notices; its write stands either way, and a new connection answers later ones.
    replicas.begin_call(None)
    async with units.autocommit() as uow:
        await uow.driver.execute("INSERT INTO uow_probe VALUES (1)")
    before, written = await _committed_write(units)
    assert written > before
    assert units.wal_positions._conn is not conn
    async with units.read() as uow:
        assert await uow.driver.fetchval("SELECT count(*) FROM uow_probe") == 3


async def test_a_unix_socket_connection_can_queue_a_bulk_batch(units):
    """Pooled connections over a Unix-domain socket have the send buffer a
    bulk COPY needs (server.db.UNIX_SEND_BUFFER_BYTES, within the kernel's
    cap), so PostgreSQL keeps reading while the event loop converts the next
    batch; the default 208 KiB starved an UpsertItems COPY."""
    from socket import SO_SNDBUF, SOL_SOCKET

    from server.db import UNIX_SEND_BUFFER_BYTES, unix_socket

    async with units.driver_read() as uow:
        sock = unix_socket(uow.driver)
        if sock is None:
            pytest.skip("the test database is reached over TCP (kernel autotuning applies)")
        size = sock.getsockopt(SOL_SOCKET, SO_SNDBUF)
    # Linux reports twice the size asked for (the rest is its bookkeeping).
    assert size == 2 * min(UNIX_SEND_BUFFER_BYTES, _kernel_send_buffer_cap())


def _kernel_send_buffer_cap() -> int:
    from pathlib import Path

    return int(Path("/proc/sys/net/core/wmem_max").read_text())

"""Database errors become the statuses a client can act on, through the same
SQLAlchemy engine the service uses."""

import pytest
import pytest_asyncio
import sqlalchemy.exc
from sqlalchemy import text

from server import errors
from server.db import classify_database_error, create_engine
from server.uow import Database
from tests.conftest import make_settings

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def engine(database_url):
    engine = create_engine(make_settings(), database_url)
    yield engine
    await engine.dispose()


async def _error_of(engine, *statements: str) -> BaseException:
    with pytest.raises(sqlalchemy.exc.DBAPIError) as caught:
        async with Database(engine).write() as uow:
            for statement in statements:
                await uow.conn.execute(text(statement))
    return caught.value


async def test_unique_violation_is_already_exists(engine):
    error = await _error_of(
        engine, "CREATE TEMP TABLE t (k int PRIMARY KEY)", "INSERT INTO t VALUES (1), (1)"
    )
    assert isinstance(classify_database_error(error), errors.AlreadyExists)


async def test_data_exception_is_invalid_argument(engine):
    error = await _error_of(engine, "SELECT 1 / 0")
    assert isinstance(classify_database_error(error), errors.InvalidArgument)


async def test_lock_timeout_is_aborted(engine, db):
    await db.execute("CREATE TABLE lock_probe (k int)")
    transaction = db.transaction()
    await transaction.start()
    await db.execute("LOCK TABLE lock_probe IN ACCESS EXCLUSIVE MODE")
    try:
        error = await _error_of(
            engine, "SET LOCAL lock_timeout = '50ms'", "SELECT * FROM lock_probe"
        )
    finally:
        await transaction.rollback()
        await db.execute("DROP TABLE lock_probe")
    assert isinstance(classify_database_error(error), errors.Aborted)


async def test_statement_timeout_is_deadline_exceeded(engine):
    error = await _error_of(engine, "SET LOCAL statement_timeout = '50ms'", "SELECT pg_sleep(2)")
    assert isinstance(classify_database_error(error), errors.DeadlineExceeded)


async def test_a_bad_statement_is_not_mistaken_for_client_error(engine):
    error = await _error_of(engine, "SELEC 1")
    assert classify_database_error(error) is None

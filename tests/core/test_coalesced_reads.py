"""server.coalesce.PointReads: concurrent point reads share one query."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest
import pytest_asyncio

from server.coalesce import PointReads
from server.db import create_engine
from server.uow import Database, UnitOfWork
from tests.conftest import make_settings

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def units(database_url: str) -> AsyncIterator[Database]:
    database = Database(create_engine(make_settings(), database_url))
    yield database
    await database.dispose()


class Squares:
    """Rows (n, n * n) for n in 0..99, fetched by key; every query recorded."""

    def __init__(self) -> None:
        self.queries: list[list[int]] = []
        self.fail_on: int | None = None

    async def fetch(self, uow: UnitOfWork, keys: Sequence[int]) -> list[asyncpg.Record]:
        self.queries.append(list(keys))
        if self.fail_on is not None and self.fail_on in keys:
            await uow.driver.execute("SELECT 1 / 0")
        return list(
            await uow.driver.fetch(
                "SELECT n, n * n AS square FROM unnest($1::int[]) AS n WHERE n BETWEEN 0 AND 99",
                list(keys),
            )
        )


async def test_a_read_on_an_idle_server_runs_at_once_alone(units):
    squares = Squares()
    reads = PointReads(units, squares.fetch, lambda row: row["n"])
    row = await reads.get(7)
    assert row is not None and row["square"] == 49
    assert squares.queries == [[7]]


async def test_reads_arriving_while_one_is_in_flight_share_one_query(units):
    squares = Squares()
    reads = PointReads(units, squares.fetch, lambda row: row["n"])
    keys = [n % 120 for n in range(300)]  # repeats, and keys 100..119 do not exist
    rows = await asyncio.gather(*(reads.get(key) for key in keys))
    for key, row in zip(keys, rows, strict=True):
        if key < 100:
            assert row is not None and row["square"] == key * key
        else:
            assert row is None
    # The first read goes alone; all the others arrived while it was in flight.
    assert len(squares.queries) == 2
    assert sorted(squares.queries[1]) == list(range(120))
    assert units.pool.checkedout() == 0


async def test_a_failed_batch_fails_its_waiters_and_the_next_batch_runs(units):
    squares = Squares()
    reads = PointReads(units, squares.fetch, lambda row: row["n"])
    squares.fail_on = 13
    results = await asyncio.gather(*(reads.get(n) for n in (1, 13, 14)), return_exceptions=True)
    assert results[0] is not None and results[0]["square"] == 1
    assert all(isinstance(r, asyncpg.DivisionByZeroError) for r in results[1:])
    squares.fail_on = None
    row = await reads.get(14)
    assert row is not None and row["square"] == 196


async def test_a_cancelled_caller_does_not_break_the_batch(units):
    squares = Squares()
    reads = PointReads(units, squares.fetch, lambda row: row["n"])
    first = asyncio.create_task(reads.get(1))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(reads.get(n)) for n in (2, 3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    assert (await first)["square"] == 1
    assert (await waiters[1])["square"] == 9
    with pytest.raises(asyncio.CancelledError):
        await waiters[0]

"""server.coalesce.PointReads: concurrent point reads share one query."""

from __future__ import annotations

import asyncio
import time
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


@pytest.mark.parametrize("in_flight", [1, 3])
async def test_batches_run_at_most_their_bound_at_once_and_answer_everyone(in_flight):
    """Batches of one group never run more than `max_in_flight` at once, the
    work that queued shares them, and each item gets its own result."""
    from server.coalesce import Batches

    running = {"g": 0, "h": 0}
    most = {"g": 0, "h": 0}
    sizes = []

    async def run(group: str, items):
        running[group] += 1
        most[group] = max(most[group], running[group])
        sizes.append(len(items))
        await asyncio.sleep(0.01)
        running[group] -= 1
        return [(group, item * item) for item in items]

    batches = Batches(run, max_batch=8, max_in_flight=in_flight)
    calls = [batches.submit("g" if n % 3 else "h", [n, n + 1]) for n in range(60)]

    answers = await asyncio.gather(*calls)

    for n, answer in enumerate(answers):
        group = "g" if n % 3 else "h"
        assert answer == [(group, n * n), (group, (n + 1) ** 2)]
    assert most == {"g": in_flight, "h": in_flight}  # each group at its bound, not past it
    assert max(sizes) <= 8 and len(sizes) < 60  # shared, and cut at max_batch


async def slow_turns(seconds: float) -> None:
    """Makes every turn of the event loop take `seconds`, until cancelled."""
    while True:
        time.sleep(seconds)  # noqa: ASYNC251 (a slow turn, on purpose)
        await asyncio.sleep(0)


async def test_queued_reads_gather_the_calls_that_arrive_over_the_next_turns():
    """A quick query returns before the calls that follow have all arrived:
    the batch after it lingers (yielding to the loop) while calls keep
    arriving, so that they share one query instead of one each, up to
    LINGER_KEYS; the calls that come after that share the next one."""
    from server.coalesce import LINGER_KEYS, Batches

    batches_run: list[list[int]] = []

    async def run(_: None, items):
        batches_run.append(list(items))
        for _ in range(2):  # a quick query: back two turns later
            await asyncio.sleep(0)
        return [item * item for item in items]

    batches = Batches(run, max_batch=1000, linger_s=10.0)  # bounded by arrivals and keys here

    async def arrive_one_per_turn(n: int) -> int:
        for _ in range(n):
            await asyncio.sleep(0)
        (answer,) = await batches.submit(None, [n])
        return answer

    callers = LINGER_KEYS + 9
    answers = await asyncio.gather(*(arrive_one_per_turn(n) for n in range(callers)))

    assert answers == [n * n for n in range(callers)]
    # The first ran alone at once; the next LINGER_KEYS waited for each
    # other, and the rest for each other; without lingering they share a
    # query only with those that arrived during the one before (below).
    assert batches_run == [
        [0],
        list(range(1, LINGER_KEYS + 1)),
        list(range(LINGER_KEYS + 1, callers)),
    ]


async def test_lingering_ends_when_nobody_joins():
    """Two callers, and the second queued behind the first: nobody else
    comes, so its batch goes after LINGER_QUIET_TURNS quiet turns, long
    before linger_s."""
    from server.coalesce import LINGER_QUIET_TURNS, Batches

    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    started: list[int] = []

    async def run(_: None, items):
        started.append(turns)
        await asyncio.sleep(0)
        return list(items)

    counter = asyncio.create_task(count_turns())
    try:
        batches = Batches(run, max_batch=1000, linger_s=60.0)
        first = asyncio.create_task(batches.submit(None, [1]))
        await asyncio.sleep(0)
        began = time.monotonic()
        assert await batches.submit(None, [2]) == [2]  # queued behind the first
        assert await first == [1]
    finally:
        counter.cancel()
    assert time.monotonic() - began < 5.0
    assert LINGER_QUIET_TURNS <= started[1] - started[0] <= LINGER_QUIET_TURNS + 5


async def test_without_linger_the_queued_reads_do_not_wait_for_more():
    from server.coalesce import Batches

    batches_run: list[list[int]] = []

    async def run(_: None, items):
        batches_run.append(list(items))
        for _ in range(2):
            await asyncio.sleep(0)
        return [item * item for item in items]

    batches = Batches(run, max_batch=1000)

    async def arrive_one_per_turn(n: int) -> int:
        for _ in range(n):
            await asyncio.sleep(0)
        (answer,) = await batches.submit(None, [n])
        return answer

    await asyncio.gather(*(arrive_one_per_turn(n) for n in range(9)))
    assert len(batches_run) > 2


async def test_lingering_ends_at_its_time_bound():
    """On a loop whose turns are slow, a lingering batch still starts once
    linger_s have passed since the batch before it started, even while calls
    keep joining it."""

    from server.coalesce import LINGER_KEYS, Batches

    started: list[float] = []
    sizes: list[int] = []

    async def run(_: None, items):
        started.append(time.monotonic())
        sizes.append(len(items))
        for _ in range(2):  # back two turns later
            await asyncio.sleep(0)
        return list(items)

    joiners = LINGER_KEYS // 2  # one a turn, 5 ms apart: 80 ms of joining
    busy = asyncio.create_task(slow_turns(0.005))
    try:
        batches = Batches(run, max_batch=1000, linger_s=0.02)

        async def arrive(n: int) -> list[int]:
            for _ in range(n):
                await asyncio.sleep(0)
            return await batches.submit(None, [n])

        answers = await asyncio.gather(*(arrive(n) for n in range(joiners)))
    finally:
        busy.cancel()
    assert answers == [[n] for n in range(joiners)]
    waited = started[1] - started[0]
    assert 0.02 <= waited < 0.06
    assert 1 < sizes[1] < joiners - 1  # it went without the calls still to come


async def test_lingering_stops_while_nobody_joins_the_lingering_batches():
    """Two callers with time between their calls: the one that queued is the
    only one to come, so lingering would only delay it. After a lingering
    batch that nobody joined, only every LINGER_PROBE-th batch lingers."""
    import statistics

    from server.coalesce import Batches

    async def run(_: None, items):
        await asyncio.sleep(0)
        return list(items)

    linger_s = 0.05  # far above a turn: a lingering batch is plain to see
    batches = Batches(run, max_batch=1000, linger_s=linger_s)
    waits = []
    turns = asyncio.create_task(slow_turns(0.002))
    try:
        for i in range(12):
            first = asyncio.create_task(batches.submit(None, [2 * i]))
            await asyncio.sleep(0)
            started = time.monotonic()
            assert await batches.submit(None, [2 * i + 1]) == [2 * i + 1]  # queued
            waits.append(time.monotonic() - started)
            assert await first == [2 * i]
            await asyncio.sleep(linger_s)  # the callers think: nobody joins
    finally:
        turns.cancel()
    assert max(waits) >= linger_s * 0.8  # the first one lingered
    assert statistics.median(waits) < linger_s / 2  # then no more

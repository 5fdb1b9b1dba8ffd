"""Content's monthly partitions, made well ahead of the rows that need them.

Making a partition is a schema change: it needs locks on the content table
and its default partition that wait for every transaction using them, and
while a lock request waits, every statement on content queues behind it. So
each partition is made in a transaction of its own that waits for its locks
at most LOCK_TIMEOUT_MS; should it not get them, it gives way and tries again
a little later, and after ATTEMPTS it leaves the month to the next round
(maintenance runs every few hours and keeps a year of partitions ready, so a
busy hour costs nothing)."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, date, datetime

from server import errors
from server.db import classify_database_error
from server.uow import Database, UnitOfWork

log = logging.getLogger(__name__)

LOCK_TIMEOUT_MS = 200
ATTEMPTS = 5
# Seconds before the second attempt; doubled (with jitter) for each next one.
FIRST_BACKOFF_S = 0.5


def partition_name(month: date) -> str:
    """The partition of `month`, as content_ensure_partitions names it."""
    return f"content_p{month:%Y%m}"


def months_from(first: date, count: int) -> list[date]:
    """The first days of `count` months from `first`'s month on."""
    months = []
    year, month = first.year, first.month
    for _ in range(count):
        months.append(date(year, month, 1))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


class PartitionRepository:
    def __init__(self, uow: UnitOfWork) -> None:
        self._driver = uow.driver

    async def missing(self, months: list[date]) -> list[date]:
        """Those of `months` that have no partition yet."""
        rows = await self._driver.fetch(
            "SELECT relname FROM pg_class WHERE relname = ANY($1::text[]) AND relkind = 'r'",
            [partition_name(month) for month in months],
        )
        existing = {row["relname"] for row in rows}
        return [month for month in months if partition_name(month) not in existing]

    async def make(self, month: date, lock_timeout_ms: int) -> bool:
        """Makes the partition of `month` (moving in any rows of that month from
        the default partition) unless it exists, waiting for each lock at most
        `lock_timeout_ms` (for this transaction only); True when it made it."""
        await self._driver.execute(
            "SELECT set_config('lock_timeout', $1, true)", f"{lock_timeout_ms}ms"
        )
        made = await self._driver.fetchval("SELECT content_ensure_partitions($1::date, 1)", month)
        return bool(made)


async def keep_partitions_ready(
    units: Database,
    months_ahead: int,
    *,
    today: date | None = None,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    attempts: int = ATTEMPTS,
) -> int:
    """Makes sure the partitions of this month and `months_ahead` more exist;
    returns how many it made. A month whose locks stay busy is retried with
    backoff and then left for the next round (logged)."""
    first = (today or datetime.now(UTC).date()).replace(day=1)
    async with units.read() as uow:
        missing = await PartitionRepository(uow).missing(months_from(first, months_ahead + 1))
    made = 0
    for month in missing:
        delay = FIRST_BACKOFF_S
        for attempt in range(1, attempts + 1):
            try:
                async with units.write() as uow:
                    made += await PartitionRepository(uow).make(month, lock_timeout_ms)
                break
            except Exception as exc:
                # Only lock_not_available (others hold the table) is retried.
                if not isinstance(classify_database_error(exc), errors.Aborted):
                    raise
                if attempt == attempts:
                    log.warning(
                        "content partition left for the next round: its locks stayed busy",
                        extra={"partition": partition_name(month), "attempts": attempts},
                    )
                    break
                await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311
                delay *= 2
    return made

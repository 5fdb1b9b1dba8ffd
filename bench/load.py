"""Closed-loop drivers for the Python-side baselines (raw asyncpg) and the
sequential page walks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

Operation = Callable[[], Awaitable[object]]


async def closed_loop(
    operation: Operation, *, concurrency: int, warmup: float, duration: float
) -> float:
    """Runs `operation` in `concurrency` coroutines, each starting its next call
    as soon as the last one returns; operations per second over `duration`
    seconds after `warmup` seconds."""
    counting = False
    stopping = False
    count = 0

    async def worker() -> None:
        nonlocal count
        while not stopping:
            await operation()
            if counting:
                count += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        counting = True
        started = time.perf_counter()
        await asyncio.sleep(duration)
        counting = False
        elapsed = time.perf_counter() - started
    finally:
        stopping = True
        await asyncio.gather(*tasks)
    return count / elapsed


async def sequential(operation: Operation, *, warmup: float, duration: float) -> float:
    """One call in flight at a time; calls per second over `duration` seconds."""
    deadline = time.perf_counter() + warmup
    while time.perf_counter() < deadline:
        await operation()
    count = 0
    started = time.perf_counter()
    deadline = started + duration
    while time.perf_counter() < deadline:
        await operation()
        count += 1
    return count / (time.perf_counter() - started)

"""Background loops (health probe, partition maintenance) stop for sure."""

import asyncio
import contextlib

import pytest

from server.periodic import Periodic

pytestmark = pytest.mark.asyncio


async def test_runs_the_step_at_once_and_then_every_interval():
    calls = 0

    async def step():
        nonlocal calls
        calls += 1

    loop = Periodic("test", 0.05, step)
    loop.start()
    await asyncio.sleep(0.18)
    await loop.stop()
    assert 3 <= calls <= 5


async def test_stop_returns_even_when_the_step_swallows_cancellation():
    entered = asyncio.Event()

    async def stubborn_step():
        entered.set()
        # Swallows the cancellation, as Python 3.11's asyncio.wait_for can in a race.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.2)

    loop = Periodic("test", 60, stubborn_step)
    loop.start()
    await entered.wait()
    await asyncio.wait_for(loop.stop(), timeout=2)

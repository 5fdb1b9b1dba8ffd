"""Background loops that stop promptly and for sure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class Periodic:
    """Runs `step` now and then every `interval` seconds until `stop()`.

    Stopping sets an event the loop waits on, as well as cancelling, so a
    cancellation that something inside `step` swallows cannot keep it running."""

    def __init__(self, name: str, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        self._name = name
        self._interval = interval
        self._step = step
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._step()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._stopping.wait()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

"""Drives grpc.health.v1 from a periodic database probe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from server.db import Database

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthMonitor:
    """Every `interval` seconds pings the database and sets the status of the
    overall server ("") and of each service accordingly."""

    def __init__(
        self,
        db: Database,
        servicer: health_aio.HealthServicer,
        services: Sequence[str],
        interval: float,
    ) -> None:
        self._db = db
        self._servicer = servicer
        self._names = ["", *services]
        self._interval = interval
        self._status: int | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        return bool(self._status == SERVING)

    async def probe(self) -> None:
        try:
            await asyncio.wait_for(self._db.ping(), timeout=max(self._interval * 2, 2.0))
            status = SERVING
        except Exception as exc:  # any failure to reach the database
            status = NOT_SERVING
            if self._status != NOT_SERVING:
                log.warning("database unreachable", extra={"error": repr(exc)})
        if status != self._status:
            if status == SERVING and self._status is not None:
                log.info("database reachable again")
            self._status = status
            for name in self._names:
                await self._servicer.set(name, status)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="health-monitor")

    async def _run(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._servicer.enter_graceful_shutdown()

"""Drives grpc.health.v1 from a periodic database probe."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from server.periodic import Periodic
from server.replicas import Replica
from server.uow import Database

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The health "service" that reports the read replica: SERVING while reads go
# to it, NOT_SERVING while they go to the primary; unknown when none is set.
REPLICA_SERVICE = "observatory.replica"


class HealthMonitor:
    """Every `interval` seconds pings the database and sets the status of the
    overall server ("") and of each service accordingly, and that of
    REPLICA_SERVICE from the replica's own probe (see server.replicas)."""

    def __init__(
        self,
        db: Database,
        servicer: health_aio.HealthServicer,
        services: Sequence[str],
        interval: float,
        replica: Replica | None = None,
    ) -> None:
        self._db = db
        self._replica = replica
        self._replica_status: int | None = None
        self._servicer = servicer
        self._names = ["", *services]
        self._interval = interval
        self._status: int | None = None
        self._loop = Periodic("health-monitor", interval, self.probe)

    async def probe(self) -> None:
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
            # a cancellation that arrives as the ping completes.
            async with asyncio.timeout(max(self._interval * 2, 2.0)):
                await self._db.ping()
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
        if self._replica is not None:
            replica_status = SERVING if self._replica.usable else NOT_SERVING
            if replica_status != self._replica_status:
                self._replica_status = replica_status
                await self._servicer.set(REPLICA_SERVICE, replica_status)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        """Stops probing and reports NOT_SERVING for good."""
        await self._loop.stop()
        await self._servicer.enter_graceful_shutdown()

"""The HTTP side port (`OBSERVATORY_HTTP_LISTEN`): `/metrics` for Prometheus,
`/livez` and `/readyz` for load balancers and Kubernetes probes.

- `/livez`: 200 while this worker's event loop answers at all.
- `/readyz`: 200 with the database and pool state when gRPC is serving (set
  by the app once it is, cleared when shutdown begins) and the database
  answers a `SELECT 1` within READY_TIMEOUT_S; 503 with the same JSON
  otherwise. The probe has a connection of its own,
  outside the pool, so RPCs holding every pooled connection do not make the
  database look down (the pool numbers show that instead).
- `/metrics`: the Prometheus text format, the sum over all workers.

With several workers each binds the port with SO_REUSEPORT, like gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web
from sqlalchemy.pool import Pool

from server.ops import metrics
from server.periodic import Periodic

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 2.0
# The pool gauges are sampled this often (and at every scrape).
POOL_SAMPLE_INTERVAL_S = 5.0


def split_listen(listen: str) -> tuple[str, int]:
    """'host:port' (IPv6 hosts in brackets) into host and port."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"OBSERVATORY_HTTP_LISTEN must be host:port, not {listen!r}")
    return host.strip("[]"), int(port)


class SidePort:
    """The probes and metrics of one worker, served on the event loop that
    serves gRPC."""

    def __init__(
        self,
        listen: str,
        pool: Callable[[], Pool],
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        *,
        reuse_port: bool,
    ) -> None:
        self._host, self._port = split_listen(listen)
        self._pool = pool
        self._connect = connect
        self._probe: asyncpg.Connection | None = None
        self._probe_lock = asyncio.Lock()
        self._reuse_port = reuse_port
        self._runner: web.AppRunner | None = None
        self._sampler = Periodic("pool sampler", POOL_SAMPLE_INTERVAL_S, self._sample)
        # True from the moment gRPC serves until shutdown begins.
        self.serving = False
        # The read replica's state for /readyz, once the app has one.
        self.replica_state: Callable[[], dict[str, Any]] | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, reuse_port=self._reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno, f"cannot serve OBSERVATORY_HTTP_LISTEN={self._host}:{self._port}: {exc}"
            ) from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._sampler.start()
        log.info("http side port", extra={"listen": f"{self._host}:{self.port}"})

    async def stop(self) -> None:
        self.serving = False
        await self._sampler.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._probe is not None:
            self._probe.terminate()
            self._probe = None

    async def _ping(self) -> None:
        async with self._probe_lock:
            if self._probe is None or self._probe.is_closed():
                self._probe = await self._connect()
            try:
                await self._probe.execute("SELECT 1")
            except BaseException:
                probe, self._probe = self._probe, None
                probe.terminate()
                raise

    async def _sample(self) -> None:
        metrics.sample_pool(self._pool())

    async def _metrics(self, _request: web.Request) -> web.Response:
        metrics.sample_pool(self._pool())
        # Reading every worker's files is blocking I/O: off the event loop.
        body = await asyncio.to_thread(metrics.render)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE_LATEST})

    async def _livez(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        database: dict[str, Any] = {"reachable": False}
        started = time.perf_counter()
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self._ping()
            database = {
                "reachable": True,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        except Exception as exc:  # any failure to reach the database
            database["error"] = type(exc).__name__
        ready = database["reachable"] and self.serving
        body = {
            "status": "ready" if ready else "not ready",
            "serving": self.serving,
            "database": database,
            "pool": metrics.sample_pool(self._pool()),
        }
        if self.replica_state is not None:
            # A replica only adds capacity: its state is reported, and never
            # makes a worker unready.
            body["replica"] = self.replica_state()
        return web.json_response(body, status=200 if ready else 503)

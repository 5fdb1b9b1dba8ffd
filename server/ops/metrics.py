"""Prometheus metrics: the standard gRPC server metrics (the names of
grpc-ecosystem/go-grpc-prometheus), the database pool and statement latency,
and the domain counters an operator watches.

Domain code counts with the module-level children, e.g.
`metrics.CONTENT_ROWS_INGESTED.inc(n)` or `metrics.CREDITS_SETTLED.inc(amount)`.

With several workers the parent sets `PROMETHEUS_MULTIPROC_DIR` before it
forks (server/ops/multiprocess.py): every value then lives in a shared file
and `render()` in any worker sums them all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Final

import grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

__all__ = ["CONTENT_TYPE_LATEST", "MethodMetrics", "render"]

# RPC latencies from a cached point read to a long export.
_RPC_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_STATEMENT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip
_RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# -- gRPC server (go-grpc-prometheus names) -------------------------------------

STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC_LABELS)
HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, whatever their status code.",
    (*_RPC_LABELS, "grpc_code"),
)
HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its status, as seen by the server.",
    _RPC_LABELS,
    buckets=_RPC_BUCKETS,
)
MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total", "Stream messages received from clients.", _RPC_LABELS
)
MSG_SENT = Counter("grpc_server_msg_sent_total", "Stream messages sent to clients.", _RPC_LABELS)

# -- database ---------------------------------------------------------------------

_LIVE: Final = "livesum"  # across workers: the sum over the workers alive now
POOL_SIZE = Gauge(
    "observatory_db_pool_size",
    "Connections the pool may hold (DATABASE_POOL_SIZE + DATABASE_MAX_OVERFLOW).",
    multiprocess_mode=_LIVE,
)
POOL_OPEN = Gauge(
    "observatory_db_pool_open", "Connections the pool holds open now.", multiprocess_mode=_LIVE
)
POOL_CHECKED_OUT = Gauge(
    "observatory_db_pool_checked_out",
    "Connections in use by an RPC or a background task.",
    multiprocess_mode=_LIVE,
)
POOL_OVERFLOW = Gauge(
    "observatory_db_pool_overflow",
    "Connections open beyond the pool's base size.",
    multiprocess_mode=_LIVE,
)
POOL_WAITING = Gauge(
    "observatory_db_pool_waiting",
    "Tasks waiting for a free connection.",
    multiprocess_mode=_LIVE,
)
STATEMENT_SECONDS = Histogram(
    "observatory_db_statement_duration_seconds",
    "Time of one SQL statement, from sending it to its result, as the server sees it.",
    buckets=_STATEMENT_BUCKETS,
)

# -- domains ------------------------------------------------------------------------

CONTENT_ROWS_INGESTED = Counter(
    "observatory_content_rows_ingested_total", "Content rows inserted by IngestContent."
)
_EXPORT_BYTES = Counter(
    "observatory_export_bytes_total", "Bytes of export files streamed to clients.", ("format",)
)
_CREDITS = Counter(
    "observatory_credits_total", "Credits moved through the ledger, by entry kind.", ("kind",)
)
CREDITS_GRANTED = _CREDITS.labels(kind="granted")
CREDITS_RESERVED = _CREDITS.labels(kind="reserved")
CREDITS_SETTLED = _CREDITS.labels(kind="settled")
CREDITS_RELEASED = _CREDITS.labels(kind="released")
RESERVATIONS_EXPIRED = Counter(
    "observatory_credit_reservations_expired_total",
    "Pending reservations released by the expiry sweep.",
)
_SEARCHES = Counter(
    "observatory_searches_total",
    "Searches run (each query of a batch counts), by kind.",
    ("kind",),
)
SEARCHES_CONTENT = _SEARCHES.labels(kind="content_fulltext")
SEARCHES_SIMILAR = _SEARCHES.labels(kind="vector_similar")
SEARCHES_TEXT = _SEARCHES.labels(kind="vector_text")
SEARCHES_HYBRID = _SEARCHES.labels(kind="vector_hybrid")


def export_bytes(format_name: str) -> Any:
    """The export-bytes counter for one format (e.g. "parquet", "gexf")."""
    return _EXPORT_BYTES.labels(format=format_name)


# -- per-RPC bookkeeping -----------------------------------------------------------


def rpc_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


class MethodMetrics:
    """The label children of one RPC method, made once, so that an RPC costs a
    few increments and no label look-ups."""

    __slots__ = ("_handled", "_labels", "handling", "received", "sent", "started")

    def __init__(self, full_method: str, grpc_type: str) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        self._labels = (grpc_type, service, method)
        self.started = STARTED.labels(*self._labels)
        self.handling = HANDLING_SECONDS.labels(*self._labels)
        self.received = MSG_RECEIVED.labels(*self._labels)
        self.sent = MSG_SENT.labels(*self._labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = HANDLED.labels(*self._labels, code.name)
        return child

    def finish(self, code: grpc.StatusCode, seconds: float, received: int, sent: int) -> None:
        self.handled(code).inc()
        self.handling.observe(seconds)
        if received:
            self.received.inc(received)
        if sent:
            self.sent.inc(sent)


# -- database instrumentation ----------------------------------------------------------


def pool_numbers(pool: Pool) -> dict[str, int]:
    """The pool's state now: capacity, open, checked out, overflow, waiting."""
    size = _call(pool, "size")
    checked_in = _call(pool, "checkedin")
    checked_out = _call(pool, "checkedout")
    return {
        "size": size,
        "open": checked_in + checked_out,
        "checked_out": checked_out,
        # QueuePool counts up from -size; only what exceeds the base size is overflow.
        "overflow": max(0, _call(pool, "overflow")),
        "waiting": _waiting(pool),
    }


def _call(pool: Pool, name: str) -> int:
    method: Callable[[], int] | None = getattr(pool, name, None)
    return int(method()) if method is not None else 0


def _waiting(pool: Pool) -> int:
    # SQLAlchemy has no public count of the tasks blocked in checkout: read
    # them off the asyncio.Queue behind its AsyncAdaptedQueue, if it exists yet.
    queue = getattr(getattr(pool, "_pool", None), "__dict__", {}).get("_queue")
    getters = getattr(queue, "_getters", None)
    return sum(1 for waiter in getters if not waiter.done()) if getters else 0


def sample_pool(pool: Pool) -> dict[str, int]:
    numbers = pool_numbers(pool)
    POOL_SIZE.set(numbers["size"])
    POOL_OPEN.set(numbers["open"])
    POOL_CHECKED_OUT.set(numbers["checked_out"])
    POOL_OVERFLOW.set(numbers["overflow"])
    POOL_WAITING.set(numbers["waiting"])
    return numbers


def instrument_engine(engine: AsyncEngine) -> None:
    """Times every SQL statement: SQLAlchemy's through its cursor events, and
    those run on the driver directly (`uow.driver`) through asyncpg's query
    loggers, added to each connection as the pool opens it."""
    sync_engine = engine.sync_engine
    if getattr(sync_engine, "_observatory_instrumented", False):
        return
    sync_engine._observatory_instrumented = True  # type: ignore[attr-defined]
    observe = STATEMENT_SECONDS.observe

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _before(
        conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, many: bool
    ) -> None:
        conn.info["observatory_started"] = time.perf_counter()

    @event.listens_for(sync_engine, "after_cursor_execute")
    def _after(
        conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, many: bool
    ) -> None:
        started = conn.info.pop("observatory_started", None)
        if started is not None:
            observe(time.perf_counter() - started)

    def _logged(record: Any) -> None:
        observe(record.elapsed)

    @event.listens_for(sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        if driver is not None and hasattr(driver, "add_query_logger"):
            driver.add_query_logger(_logged)


# -- exposition ---------------------------------------------------------------------


def multiprocess_mode() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


def render() -> bytes:
    """The text exposition of every metric: in multiprocess mode the sum over
    all workers' files, otherwise this process's registry."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def mark_process_dead(pid: int) -> None:
    """Drops the live gauges of a worker that has exited."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

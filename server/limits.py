"""Per-worker limits, so that no caller can take what the others need.

- `OBSERVATORY_MAX_CONCURRENT_RPCS`: the RPCs one worker serves at once.
  Counted by `LimitsInterceptor`, the outermost interceptor, from the moment
  a call arrives until it ends.
- `OBSERVATORY_MAX_STREAMS_PER_CALLER`: the streaming RPCs (IngestContent,
  UpsertItems, ExportContent, the search streams, ExportNetwork: any RPC
  with a stream on either side) one caller has open at once on this worker,
  keyed by the verified token's user ID. The main interceptor asks
  `Limits.admit` once it has authenticated the caller.

A call past either limit is refused at once with RESOURCE_EXHAUSTED, reason
LIMIT_EXCEEDED and metadata `limit` (the setting's name) and `max`: nobody
queues for a slot, so a greedy caller never makes anyone else wait. The
health service and server reflection are never counted nor refused, so a
probe always gets its answer.

The same object holds the budgets of the long-running streams, so that
together they never hold more than part of the pool and the rest stays for
everyone else's calls: the bulk streams' rows and bytes per batch and the
connections their batches are written on at once (server.bulk); the
snapshot connections exports hold at once (half of pool_size + max_overflow;
an export past them waits for one to be released, without a connection);
and how long an export may wait for a client that does not read
(`OBSERVATORY_EXPORT_IDLE_S`).
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from server import bulk, errors
from server.auth import Principal
from server.settings import Settings

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

# Served without a token and never limited: health checks and reflection.
UNLIMITED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MAX_CONCURRENT_RPCS = "OBSERVATORY_MAX_CONCURRENT_RPCS"
MAX_STREAMS_PER_CALLER = "OBSERVATORY_MAX_STREAMS_PER_CALLER"

# Set by LimitsInterceptor on a call that arrived while the worker was full;
# `Limits.admit` (inside the main interceptor's error handling) refuses it.
_over_rpc_limit: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "over_rpc_limit", default=False
)


def _nothing() -> None:
    pass


class Limits:
    """One worker's limits and the counts they are checked against. Made once
    per worker by create_server; everything here runs on its event loop."""

    def __init__(self, settings: Settings) -> None:
        self.max_rpcs = settings.max_concurrent_rpcs
        self.max_streams = settings.max_streams_per_caller
        self.export_idle_s = settings.export_idle_s
        self.max_export_connections = max(1, (settings.pool_size + settings.max_overflow) // 2)
        self.export_slots = asyncio.Semaphore(self.max_export_connections)
        self.bulk = bulk.Loader(
            bulk.Budget(
                rows=bulk.BATCH_ROWS,
                bytes=settings.bulk_batch_bytes,
                writers=settings.bulk_writers or bulk.default_writers(settings.pool_size),
            )
        )
        self.rpcs = 0
        self._streams: dict[uuid.UUID, int] = {}

    def streams_of(self, caller: uuid.UUID) -> int:
        return self._streams.get(caller, 0)

    def enter_rpc(self) -> bool:
        """Counts a call in; False (and not counted) when the worker is full."""
        if self.rpcs >= self.max_rpcs:
            return False
        self.rpcs += 1
        return True

    def leave_rpc(self) -> None:
        self.rpcs -= 1

    def admit(self, method: str, streaming: bool, caller: Principal) -> Callable[[], None]:
        """The main interceptor's admission hook, run once the caller is known:
        raises LimitExceeded for a call past a limit, otherwise returns what to
        call when the RPC ends."""
        if _over_rpc_limit.get():
            raise errors.LimitExceeded(
                f"this server is serving {self.max_rpcs} calls already; retry later",
                limit=MAX_CONCURRENT_RPCS,
                maximum=self.max_rpcs,
            )
        if not streaming:
            return _nothing
        user = caller.user_id
        open_streams = self._streams.get(user, 0)
        if open_streams >= self.max_streams:
            raise errors.LimitExceeded(
                f"this caller has {self.max_streams} streams open already; "
                "finish one before opening another",
                limit=MAX_STREAMS_PER_CALLER,
                maximum=self.max_streams,
            )
        self._streams[user] = open_streams + 1

        def release() -> None:
            left = self._streams[user] - 1
            if left:
                self._streams[user] = left
            else:
                del self._streams[user]

        return release

    def interceptor(self) -> LimitsInterceptor:
        return LimitsInterceptor(self)


class LimitsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call but health and reflection for OBSERVATORY_MAX_CONCURRENT_RPCS.
    It runs first, before the caller is known, so it only marks a call that
    finds the worker full; the main interceptor then refuses it through
    `Limits.admit`, with the same error mapping, access log and metrics as
    every other error."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(UNLIMITED_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Handler) -> Handler:
        decode, encode = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._single(handler.unary_unary), decode, encode
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._single(handler.stream_unary), decode, encode
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streamed(handler.unary_stream), decode, encode
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streamed(handler.stream_stream), decode, encode
        )

    def _single(self, behaviour: Any) -> Callable[..., Awaitable[Any]]:
        limits = self._limits

        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not limits.enter_rpc():
                _over_rpc_limit.set(True)
                return await behaviour(request, context)
            try:
                return await behaviour(request, context)
            finally:
                limits.leave_rpc()

        return handle

    def _streamed(self, behaviour: Any) -> Callable[..., AsyncIterator[Any]]:
        limits = self._limits

        async def handle(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            admitted = limits.enter_rpc()
            if not admitted:
                _over_rpc_limit.set(True)
            try:
                async for response in behaviour(request, context):
                    yield response
            finally:
                if admitted:
                    limits.leave_rpc()

        return handle

"""The one place where cross-cutting concerns happen for every RPC: request
IDs, authentication, request decoding, error mapping and the access log."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server import errors
from server.audit import current_request_id
from server.auth import Authenticator, Principal, current_principal
from server.db import classify_database_error

log = logging.getLogger("observatory.rpc")

# Served without a token: health checks and server reflection.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REQUEST_ID_KEY = "x-request-id"

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Deserializer = Callable[[bytes], Any]


def to_status(exc: errors.ObservatoryError, request_id: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason=exc.reason, domain=errors.DOMAIN, metadata={**exc.metadata, "request_id": request_id}
    )
    details = [info]
    if exc.field_violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=field, description=description
                    )
                    for field, description in exc.field_violations
                ]
            )
        )
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=exc.code.value[0], message=exc.message, details=packed)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def as_observatory_error(exc: BaseException) -> errors.ObservatoryError | None:
    if isinstance(exc, errors.ObservatoryError):
        return exc
    return classify_database_error(exc)


class _Call:
    """Per-RPC bookkeeping for the access log."""

    __slots__ = ("code", "method", "request_id", "started", "user")

    def __init__(self, method: str, request_id: str) -> None:
        self.method = method
        self.request_id = request_id
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.user = ""


class ObservatoryInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    # -- per-call steps -------------------------------------------------------

    def _start(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[_Call, dict[str, Any]]:
        metadata = dict(context.invocation_metadata() or ())
        request_id = _text(metadata.get(REQUEST_ID_KEY)) or str(uuid.uuid4())
        current_request_id.set(request_id)
        return _Call(method, request_id), metadata

    def _authenticate(self, call: _Call, metadata: dict[str, Any]) -> None:
        caller: Principal = self._auth.authenticate(_text(metadata.get("authorization")))
        current_principal.set(caller)
        call.user = str(caller.user_id)

    async def _fail(
        self, exc: BaseException, call: _Call, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        error = as_observatory_error(exc)
        if error is None:
            log.exception(
                "unhandled error", extra={"method": call.method, "request_id": call.request_id}
            )
            error = errors.ObservatoryError("internal error; quote request_id when reporting it")
        call.code = error.code
        status = to_status(error, call.request_id)
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _finish(self, call: _Call, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if call.code is grpc.StatusCode.OK and context.cancelled():
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            call.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        log.info(
            "rpc",
            extra={
                "method": call.method,
                "status": call.code.name,
                "duration_ms": round((time.perf_counter() - call.started) * 1000, 3),
                "request_id": call.request_id,
                "user": call.user,
            },
        )

    # -- wrapping by RPC kind ---------------------------------------------------

    def _wrap(self, method: str, handler: Handler) -> Handler:
        """The same handler with our steps around it. It is registered without
        a request deserializer, so that undecodable bytes become
        INVALID_ARGUMENT here instead of UNKNOWN inside gRPC."""
        decode: Deserializer = handler.request_deserializer or (lambda raw: raw)
        one: Callable[[Any], Any] = lambda raw: _decode(decode, raw)  # noqa: E731
        many: Callable[[Any], Any] = lambda raw: _decode_stream(decode, raw)  # noqa: E731
        serializer = handler.response_serializer
        if handler.unary_unary:
            behaviour = self._single_response(method, handler.unary_unary, one)
            return grpc.unary_unary_rpc_method_handler(behaviour, None, serializer)
        if handler.stream_unary:
            behaviour = self._single_response(method, handler.stream_unary, many)
            return grpc.stream_unary_rpc_method_handler(behaviour, None, serializer)
        if handler.unary_stream:
            streaming = self._streamed_response(method, handler.unary_stream, one)
            return grpc.unary_stream_rpc_method_handler(streaming, None, serializer)
        streaming = self._streamed_response(method, handler.stream_stream, many)
        return grpc.stream_stream_rpc_method_handler(streaming, None, serializer)

    def _single_response(
        self, method: str, behaviour: Any, requests: Callable[[Any], Any]
    ) -> Callable[..., Awaitable[Any]]:
        async def handle(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call, metadata = self._start(method, context)
            try:
                self._authenticate(call, metadata)
                return await behaviour(requests(raw), context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._fail(exc, call, context)
            finally:
                self._finish(call, context)

        return handle

    def _streamed_response(
        self, method: str, behaviour: Any, requests: Callable[[Any], Any]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def handle(
            raw: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            call, metadata = self._start(method, context)
            try:
                self._authenticate(call, metadata)
                async for response in behaviour(requests(raw), context):
                    yield response
            except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                await self._fail(exc, call, context)
            finally:
                self._finish(call, context)

        return handle


def _text(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _decode(decode: Deserializer, raw: bytes) -> Any:
    try:
        return decode(raw)
    except DecodeError:
        raise errors.InvalidArgument(
            "request", "the request bytes do not decode as the request message"
        ) from None


async def _decode_stream(
    decode: Deserializer, raw_stream: AsyncIterator[bytes]
) -> AsyncIterator[Any]:
    index = 0
    async for raw in raw_stream:
        try:
            yield decode(raw)
        except DecodeError:
            raise errors.InvalidArgument(
                "request", f"stream message {index} does not decode as the request message"
            ) from None
        index += 1

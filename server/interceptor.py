"""The one place where cross-cutting concerns happen for every RPC: request
IDs, authentication, the worker's limits, request decoding, error mapping,
the access log, RPC metrics and the server span of a trace. A call crosses
this one interceptor and nothing else."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeAlias

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server import deadlines, errors, replicas
from server.audit import current_request_id
from server.auth import Authenticator, Principal, current_principal
from server.db import classify_database_error
from server.logs import AccessLog
from server.ops import tracing
from server.ops.metrics import MethodMetrics, rpc_type

log = logging.getLogger("observatory.rpc")

# Served without a token: health checks and server reflection.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REQUEST_ID_KEY = "x-request-id"
# A caller's request ID is kept only when it is short and plain enough to log
# and to send back in ErrorInfo; any other is replaced by a fresh one.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Deserializer = Callable[[bytes], Any]
Requests: TypeAlias = "Callable[[Any, _Call], Any]"


class Admission(Protocol):
    """Who may run (server.limits.Limits): told of every call as it arrives
    and as it ends, and asked once its caller is known."""

    def enter_rpc(self) -> bool:
        """Counts a call in as it arrives; False (not counted) when the worker is full."""

    def leave_rpc(self) -> None:
        """Counts out a call `enter_rpc` counted in."""

    def admit(
        self, method: str, streaming: bool, caller: Principal, counted: bool
    ) -> Callable[[], None]:
        """Raises an errors.ObservatoryError to refuse the call (`counted` is
        what `enter_rpc` said), or returns what to call when the RPC ends."""


# What an error sends back, whatever the input behind it (the contract: a
# message of at most 1 KiB; all trailers under 8 KiB, clients' default metadata
# limit). Call sites quote input sparingly (errors.quote); these bounds hold
# even when one does not.
MAX_MESSAGE_BYTES = 1024
MAX_DESCRIPTION_BYTES = 512
MAX_FIELD_CHARS = errors.MAX_ECHO_CHARS
MAX_VIOLATIONS = 10
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = errors.MAX_ECHO_CHARS
# Trailers an error may take, as HTTP/2 counts them (name + value + 32 bytes
# per entry, binary values base64-encoded): 1 KiB under the 8 KiB limit.
TRAILER_BUDGET = 7 * 1024
_ENTRY_OVERHEAD = 32
_STATUS_TRAILERS = len("grpc-status") + 2 + _ENTRY_OVERHEAD
_MESSAGE_KEY = len("grpc-message") + _ENTRY_OVERHEAD
_DETAILS_KEY = len("grpc-status-details-bin") + _ENTRY_OVERHEAD
# grpc percent-encodes every byte of grpc-message outside printable ASCII, and '%'.
_PLAIN_BYTES = frozenset(range(0x20, 0x7F)) - {ord("%")}


def to_status(exc: errors.ObservatoryError, request_id: str) -> grpc.Status:
    """`exc` as a status with ErrorInfo (and BadRequest for bad input), cut
    down to the bounds above: first by the per-part limits, then, should the
    trailers still be too large, by tighter ones that always fit."""
    metadata = list(exc.metadata.items())[:MAX_METADATA_ENTRIES]
    status = _status(
        exc,
        _clip(exc.message, MAX_MESSAGE_BYTES),
        [
            (_clip(field, MAX_FIELD_CHARS), _clip(description, MAX_DESCRIPTION_BYTES))
            for field, description in exc.field_violations[:MAX_VIOLATIONS]
        ],
        {
            _clip(key, MAX_METADATA_KEY_CHARS): _clip(value, MAX_METADATA_VALUE_CHARS)
            for key, value in metadata
        },
        request_id,
    )
    if _trailer_size(status) > TRAILER_BUDGET:
        status = _status(
            exc,
            _clip(exc.message, 256),
            [(_clip(field, 100), _clip(text, 200)) for field, text in exc.field_violations[:1]],
            {_clip(key, 32): _clip(value, 64) for key, value in metadata[:8]},
            request_id,
        )
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def _status(
    exc: errors.ObservatoryError,
    message: str,
    violations: list[tuple[str, str]],
    metadata: dict[str, str],
    request_id: str,
) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(
        reason=exc.reason, domain=errors.DOMAIN, metadata={**metadata, "request_id": request_id}
    )
    details = [info]
    if violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=field, description=description
                    )
                    for field, description in violations
                ]
            )
        )
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=exc.code.value[0], message=message, details=packed)


def _clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8 (at a character boundary,
    ending in "...") when longer."""
    if len(text) * 4 <= limit:
        return text
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode("utf-8", "ignore") + "..."


def _trailer_size(status: status_pb2.Status) -> int:
    """The trailers of `status` as HTTP/2 counts them (see TRAILER_BUDGET)."""
    message = status.message.encode()
    encoded_message = len(message) + 2 * sum(1 for b in message if b not in _PLAIN_BYTES)
    details = -(-int(status.ByteSize()) // 3) * 4
    return _STATUS_TRAILERS + _MESSAGE_KEY + encoded_message + _DETAILS_KEY + details


def as_observatory_error(exc: BaseException) -> errors.ObservatoryError | None:
    if isinstance(exc, errors.ObservatoryError):
        return exc
    return classify_database_error(exc)


class _Method:
    """What the steps need about one RPC method, made once per method."""

    __slots__ = ("metrics", "name", "span_name", "streaming")

    def __init__(self, name: str, handler: Handler) -> None:
        self.name = name
        self.streaming = bool(handler.request_streaming or handler.response_streaming)
        self.span_name = name.lstrip("/")
        self.metrics = MethodMetrics(name, rpc_type(handler))


class _Call:
    """Per-RPC bookkeeping for the access log, the metrics and the span."""

    __slots__ = ("code", "method", "received", "request_id", "sent", "span", "started", "user")

    def __init__(self, method: _Method, request_id: str) -> None:
        self.method = method
        self.request_id = request_id
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.user: uuid.UUID | None = None
        self.received = 0
        self.sent = 0
        self.span: tracing.ServerSpan | None = None


class ObservatoryInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        authenticator: Authenticator,
        tracer: tracing.Tracer | None = None,
        admission: Admission | None = None,
        decoders: Mapping[str, Deserializer] | None = None,
    ) -> None:
        self._auth = authenticator
        # Methods whose requests are decoded otherwise than by the generated
        # deserializer (server.vectors.wire), by full method name.
        self._decoders = dict(decoders or {})
        self._admission: Admission = admission or _AdmitAll()
        self._tracer = tracer
        # Each method's handler, wrapped once: the server's handlers do not
        # change once it serves, so a known method needs no look-up.
        self._wrapped: dict[str, Handler] = {}
        self._access_log = AccessLog(log)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    # -- per-call steps -------------------------------------------------------

    def _start(
        self, method: _Method, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[_Call, dict[str, Any]]:
        metadata = dict(context.invocation_metadata() or ())
        request_id = _request_id(metadata.get(REQUEST_ID_KEY))
        current_request_id.set(request_id)
        deadlines.begin_call(context.time_remaining())
        replicas.begin_call(_text(metadata.get(replicas.MIN_LSN_KEY)))
        call = _Call(method, request_id)
        method.metrics.started.inc()
        if self._tracer is not None:
            call.span = tracing.ServerSpan(self._tracer, method.span_name, metadata)
        return call, metadata

    def _authenticate(self, call: _Call, metadata: dict[str, Any]) -> Principal:
        caller: Principal = self._auth.authenticate(_text(metadata.get("authorization")))
        current_principal.set(caller)
        call.user = caller.user_id
        return caller

    async def _fail(
        self,
        exc: BaseException,
        call: _Call,
        context: grpc.aio.ServicerContext[Any, Any],
        finish: Callable[[], None],
    ) -> None:
        """Sends `exc` as the call's status, after `finish` has counted the
        call out, released its limits and written its metrics and log line:
        a client that has its answer finds them done."""
        error = as_observatory_error(exc)
        if error is None:
            log.exception(
                "unhandled error", extra={"method": call.method.name, "request_id": call.request_id}
            )
            error = errors.ObservatoryError("internal error; quote request_id when reporting it")
            if call.span is not None:
                call.span.record_exception(exc)
        call.code = error.code
        status = to_status(error, call.request_id)
        finish()
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _finish(self, call: _Call, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if call.code is grpc.StatusCode.OK and context.cancelled():
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            call.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        seconds = time.perf_counter() - call.started
        call.method.metrics.finish(call.code, seconds, call.received, call.sent)
        trace_id = None
        if call.span is not None:
            trace_id = call.span.trace_id
            call.span.end(call.code)
        self._access_log.write(
            call.method.name, call.code, seconds, call.request_id, call.user, trace_id
        )

    # -- wrapping by RPC kind ---------------------------------------------------

    def _wrap(self, method_name: str, handler: Handler) -> Handler:
        """The same handler with our steps around it. It is registered without
        a request deserializer, so that undecodable bytes become
        INVALID_ARGUMENT here instead of UNKNOWN inside gRPC."""
        decode: Deserializer = (
            self._decoders.get(method_name) or handler.request_deserializer or (lambda raw: raw)
        )
        one: Requests = lambda raw, call: _decode(decode, raw, call)  # noqa: E731
        many: Requests = lambda raw, call: _decode_stream(decode, raw, call)  # noqa: E731
        serializer = handler.response_serializer
        method = _Method(method_name, handler)
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
        self, method: _Method, behaviour: Any, requests: Requests
    ) -> Callable[..., Awaitable[Any]]:
        admission = self._admission

        async def handle(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call, metadata = self._start(method, context)
            counted = admission.enter_rpc()  # a call takes its place as it arrives
            end = _Ending(self._finish, call, context, admission.leave_rpc if counted else _nothing)
            try:
                caller = self._authenticate(call, metadata)
                end.release = admission.admit(method.name, method.streaming, caller, counted)
                response = await behaviour(requests(raw, call), context)
                _send_lsn(context)
                call.sent = 1
                return response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._fail(exc, call, context, end)
            finally:
                end()

        return handle

    def _streamed_response(
        self, method: _Method, behaviour: Any, requests: Requests
    ) -> Callable[..., AsyncIterator[Any]]:
        admission = self._admission

        async def handle(
            raw: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            call, metadata = self._start(method, context)
            counted = admission.enter_rpc()  # a call takes its place as it arrives
            end = _Ending(self._finish, call, context, admission.leave_rpc if counted else _nothing)
            try:
                caller = self._authenticate(call, metadata)
                end.release = admission.admit(method.name, method.streaming, caller, counted)
                async for response in behaviour(requests(raw, call), context):
                    call.sent += 1
                    yield response
                _send_lsn(context)
            except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                await self._fail(exc, call, context, end)
            finally:
                end()

        return handle


def _nothing() -> None:
    pass


class _Ending:
    """What ends a call, once, whichever comes first: before an error status
    is sent (ObservatoryInterceptor._fail), or when the handler returns. Its
    stream slot is released, the call counted out of the worker's calls
    (`leave`), and its metrics, span and log line written (`write`)."""

    __slots__ = ("_call", "_context", "_leave", "_write", "release")

    def __init__(
        self,
        write: Callable[[_Call, grpc.aio.ServicerContext[Any, Any]], None],
        call: _Call,
        context: grpc.aio.ServicerContext[Any, Any],
        leave: Callable[[], None],
    ) -> None:
        self._write: Callable[[_Call, grpc.aio.ServicerContext[Any, Any]], None] | None = write
        self._call = call
        self._context = context
        self._leave = leave
        self.release: Callable[[], None] = _nothing  # set once admitted

    def __call__(self) -> None:
        write = self._write
        if write is None:
            return
        self._write = None
        self.release()
        self._leave()
        write(self._call, self._context)


class _AdmitAll:
    """No limits (an interceptor made without any)."""

    def enter_rpc(self) -> bool:
        return True

    def leave_rpc(self) -> None:
        pass

    def admit(
        self, method: str, streaming: bool, caller: Principal, counted: bool
    ) -> Callable[[], None]:
        return _nothing


def _send_lsn(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Read-your-writes: a call that committed a write returns where the
    primary's WAL stood after it (see server.replicas)."""
    trailer = replicas.lsn_trailer()
    if trailer is not None:
        context.set_trailing_metadata((*(context.trailing_metadata() or ()), trailer))


def _request_id(sent: str | bytes | None) -> str:
    """The caller's x-request-id when it is sane, else a fresh one."""
    if isinstance(sent, str) and SANE_REQUEST_ID.fullmatch(sent):
        return sent
    return fresh_request_id()


def fresh_request_id() -> str:
    """A random UUID (version 4) in canonical text, for a fifth of the CPU of
    str(uuid.uuid4()): no system call (the `random` module is seeded from
    os.urandom, again in each forked worker) and no UUID object. An ID to
    correlate log lines and errors by, not a secret."""
    digits = f"{random.getrandbits(128):032x}"
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-a{digits[17:20]}-{digits[20:]}"


def _text(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _decode(decode: Deserializer, raw: bytes, call: _Call) -> Any:
    call.received = 1
    try:
        return decode(raw)
    except DecodeError:
        raise errors.InvalidArgument(
            "request", "the request bytes do not decode as the request message"
        ) from None


async def _decode_stream(
    decode: Deserializer, raw_stream: AsyncIterator[bytes], call: _Call
) -> AsyncIterator[Any]:
    index = 0
    async for raw in raw_stream:
        call.received += 1
        try:
            yield decode(raw)
        except DecodeError:
            raise errors.InvalidArgument(
                "request", f"stream message {index} does not decode as the request message"
            ) from None
        index += 1

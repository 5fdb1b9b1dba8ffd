"""Test helpers: callers with tokens, content factories, error details."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from observatory.v1 import content_pb2

from server.auth import issue_token

TEST_SECRET = "observatory-test-secret-that-is-long-enough-for-hs256"


@dataclass(frozen=True)
class Caller:
    """A user (or admin) with a valid token; `metadata` goes on every call."""

    user_id: uuid.UUID
    role: str
    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


def new_caller(role: str = "user") -> Caller:
    user_id = uuid.uuid4()
    return Caller(user_id=user_id, role=role, token=issue_token(TEST_SECRET, user_id, role))


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def make_content(
    *,
    published_at: datetime | None = None,
    raw_metadata: dict[str, Any] | None = None,
    **fields: Any,
) -> content_pb2.Content:
    """A valid Content with a unique platform_id; keyword arguments override."""
    values: dict[str, Any] = {
        "platform": "twitter",
        "platform_id": uuid.uuid4().hex,
        "title": "A title",
        "text_content": "Some text about the weather",
        "url": "https://example.com/post",
        "language": "en",
    }
    values.update(fields)
    message = content_pb2.Content(**values)
    message.published_at.CopyFrom(
        timestamp(published_at or datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1))
    )
    if raw_metadata:
        message.raw_metadata.update(raw_metadata)
    return message


@dataclass
class ErrorDetails:
    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo | None
    bad_request: error_details_pb2.BadRequest | None

    @property
    def reason(self) -> str:
        return self.info.reason if self.info else ""

    @property
    def fields(self) -> list[str]:
        if self.bad_request is None:
            return []
        return [violation.field for violation in self.bad_request.field_violations]


def error_details(error: grpc.aio.AioRpcError) -> ErrorDetails:
    """The google.rpc.Status details carried in the trailers of `error`."""
    info = bad_request = None
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
    return ErrorDetails(error.code(), error.details() or "", info, bad_request)


async def expect_rpc_error(call: Awaitable[Any]) -> ErrorDetails:
    """Awaits `call`, which must fail, and returns its error details after checking
    what every error carries: one ErrorInfo in the observatory.v1 domain with a reason."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
    else:
        raise AssertionError("the call succeeded but an error was expected")
    assert details.info is not None, f"{details.code.name} without ErrorInfo: {details.message}"
    assert details.info.domain == "observatory.v1"
    assert details.reason
    return details


def ingest_requests(
    *messages: list[content_pb2.Content], request_id: str = ""
) -> list[content_pb2.IngestContentRequest]:
    """One IngestContentRequest per list of contents; request_id on the first only."""
    requests = [content_pb2.IngestContentRequest(contents=contents) for contents in messages]
    if requests and request_id:
        requests[0].request_id = request_id
    return requests


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> bool:
    """Polls `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


T = TypeVar("T")


async def in_processes(function: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> list[T]:
    """Runs `function(*args)` for each `args` in `calls` at once, each in its own
    spawned OS process (so each has its own gRPC channel and GIL, as separate
    clients do); their results in the order of `calls`."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(len(calls), mp_context=get_context("spawn")) as pool:
        return list(
            await asyncio.gather(*(loop.run_in_executor(pool, function, *args) for args in calls))
        )

"""OBSERVATORY_MAX_STREAMS_PER_CALLER and OBSERVATORY_MAX_CONCURRENT_RPCS: a
call past a limit is refused at once with RESOURCE_EXHAUSTED / LIMIT_EXCEEDED,
and nobody else waits."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from observatory.v1 import content_pb2, content_pb2_grpc

from tests.helpers import expect_rpc_error, make_content, new_caller, wait_until
from tests.streams.conftest import serving
from tests.streams.helpers import HeldStreams, health

pytestmark = pytest.mark.asyncio


def content_stub(channel: grpc.aio.Channel) -> content_pb2_grpc.ContentServiceStub:
    return content_pb2_grpc.ContentServiceStub(channel)


async def test_streams_past_a_callers_limit_are_refused_at_once(database_url):
    async with serving(database_url, OBSERVATORY_MAX_STREAMS_PER_CALLER=3) as (app, channel):
        stub = content_stub(channel)
        alice, bob = new_caller(), new_caller()
        held = HeldStreams()
        try:
            for _ in range(3):
                held.open(stub.IngestContent, alice)
            assert await wait_until(async_equals(lambda: app.limits.streams_of(alice.user_id), 3))

            started = time.perf_counter()
            error = await expect_rpc_error(held.open(stub.IngestContent, alice))
            assert time.perf_counter() - started < 1.0
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.reason == "LIMIT_EXCEEDED"
            assert dict(error.info.metadata) == {
                "limit": "OBSERVATORY_MAX_STREAMS_PER_CALLER",
                "max": "3",
                "request_id": error.info.metadata["request_id"],
            }
            # An export is a stream too; a unary call is not limited, nor is another caller.
            refused = await expect_rpc_error(
                consume(
                    stub.ExportContent(
                        content_pb2.ExportContentRequest(format=content_pb2.EXPORT_FORMAT_CSV),
                        metadata=alice.metadata,
                    )
                )
            )
            assert refused.reason == "LIMIT_EXCEEDED"
            created = await stub.CreateContent(
                content_pb2.CreateContentRequest(content=make_content()), metadata=alice.metadata
            )
            assert created.id
            response = await stub.IngestContent(
                iter([content_pb2.IngestContentRequest(contents=[make_content()])]),
                metadata=bob.metadata,
            )
            assert response.inserted == 1
        finally:
            await held.close()
        # Once its streams end, the caller may open new ones.
        assert await wait_until(async_equals(lambda: app.limits.streams_of(alice.user_id), 0))
        response = await stub.IngestContent(
            iter([content_pb2.IngestContentRequest(contents=[make_content()])]),
            metadata=alice.metadata,
        )
        assert response.inserted == 1


async def test_calls_past_a_workers_limit_are_refused_and_health_still_answers(database_url):
    async with serving(database_url, OBSERVATORY_MAX_CONCURRENT_RPCS=4) as (app, channel):
        stub = content_stub(channel)
        callers = [new_caller() for _ in range(4)]
        held = HeldStreams()
        try:
            for caller in callers:
                held.open(stub.IngestContent, caller)
            assert await wait_until(async_equals(lambda: app.limits.rpcs, 4))

            started = time.perf_counter()
            error = await expect_rpc_error(
                stub.CreateContent(
                    content_pb2.CreateContentRequest(content=make_content()),
                    metadata=new_caller().metadata,
                )
            )
            assert time.perf_counter() - started < 1.0
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.reason == "LIMIT_EXCEEDED"
            assert error.info.metadata["limit"] == "OBSERVATORY_MAX_CONCURRENT_RPCS"
            assert error.info.metadata["max"] == "4"
            # Health checks are never counted nor refused.
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
        finally:
            await held.close()
        assert await wait_until(async_equals(lambda: app.limits.rpcs, 0))
        created = await stub.CreateContent(
            content_pb2.CreateContentRequest(content=make_content()),
            metadata=new_caller().metadata,
        )
        assert created.id


async def test_refused_calls_leave_the_counts_as_they_were(database_url):
    async with serving(
        database_url, OBSERVATORY_MAX_STREAMS_PER_CALLER=1, OBSERVATORY_MAX_CONCURRENT_RPCS=2
    ) as (app, channel):
        stub = content_stub(channel)
        alice = new_caller()
        held = HeldStreams()
        try:
            held.open(stub.IngestContent, alice)
            assert await wait_until(async_equals(lambda: app.limits.streams_of(alice.user_id), 1))
            refusals = await asyncio.gather(
                *(expect_rpc_error(held.open(stub.IngestContent, alice)) for _ in range(5))
            )
            assert {error.reason for error in refusals} == {"LIMIT_EXCEEDED"}
            assert app.limits.streams_of(alice.user_id) == 1
        finally:
            await held.close()
        assert await wait_until(async_equals(lambda: app.limits.rpcs, 0))
        assert app.limits.streams_of(alice.user_id) == 0


def async_equals(read, expected):
    async def check() -> bool:
        return read() == expected

    return check


async def consume(call) -> None:
    async for _ in call:
        pass

"""Streams whose clients open them and then wait (send nothing, or read
nothing) hold no pooled connection while they wait, beyond the share the
exports may keep: other callers' calls and the health check go on."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from observatory.v1 import content_pb2, content_pb2_grpc, vector_pb2, vector_pb2_grpc

from tests.helpers import expect_rpc_error, make_content, new_caller, wait_until
from tests.streams.conftest import serving
from tests.streams.helpers import HeldStreams, health, unread_export

pytestmark = pytest.mark.asyncio

STREAMS = 20
# Enough rows that an export no client reads fills every buffer on its way.
EXPORT_ROWS = 3000
BODY = "lorem ipsum dolor " * 300  # ~5 KB a row: ~16 MB a CSV export


async def load_rows(stub, caller, rows: int = EXPORT_ROWS) -> None:
    contents = [make_content(text_content=BODY) for _ in range(rows)]
    messages = [contents[i : i + 500] for i in range(0, rows, 500)]
    response = await stub.IngestContent(
        iter(content_pb2.IngestContentRequest(contents=m) for m in messages),
        metadata=caller.metadata,
    )
    assert response.inserted == rows


async def timed(call) -> float:
    started = time.perf_counter()
    await call
    return time.perf_counter() - started


async def other_callers_calls(stub, seconds: float) -> list[float]:
    """Unary calls by two other callers, one after another, for `seconds`: how
    long each took."""
    bob, carol = new_caller(), new_caller()
    created = await stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content()), metadata=bob.metadata
    )
    took = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        took.append(
            await timed(
                stub.GetContent(content_pb2.GetContentRequest(id=created.id), metadata=bob.metadata)
            )
        )
        took.append(
            await timed(
                stub.CreateContent(
                    content_pb2.CreateContentRequest(content=make_content()),
                    metadata=carol.metadata,
                )
            )
        )
        took.append(
            await timed(stub.ListContent(content_pb2.ListContentRequest(), metadata=carol.metadata))
        )
    return took


async def test_idle_ingest_upsert_and_unread_export_streams_hold_up_no_one(database_url):
    async with serving(database_url, OBSERVATORY_MAX_STREAMS_PER_CALLER=3 * STREAMS + 4) as (
        app,
        channel,
    ):
        content = content_pb2_grpc.ContentServiceStub(channel)
        vectors = vector_pb2_grpc.VectorServiceStub(channel)
        mallory = new_caller()
        await load_rows(content, mallory)
        statuses = HealthWatch(channel)
        held = HeldStreams()
        exports = []
        try:
            for _ in range(STREAMS):
                held.open(
                    content.IngestContent,
                    mallory,
                    [
                        content_pb2.IngestContentRequest(
                            contents=[make_content() for _ in range(50)]
                        )
                    ],
                )
                held.open(vectors.UpsertItems, mallory)
            for _ in range(STREAMS):
                exports.append(unread_export(channel, mallory))
            assert await wait_until(
                lambda: _true(app.limits.streams_of(mallory.user_id) == 3 * STREAMS), timeout=20
            )
            # The exports that got a connection have filled what lies between
            # them and their client, and wait.
            await asyncio.sleep(1.0)
            pool = app.units.pool
            # The exports' share of the pool at most (and a background task's
            # connection, should one be at work); the idle ingest and upsert
            # streams hold none.
            assert pool.checkedout() <= app.limits.max_export_connections + 1

            took = await other_callers_calls(content, seconds=3.0)
            assert max(took) < 1.0, sorted(took)[-5:]
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
            # Health never flipped while the streams were open.
            assert statuses.seen == [health_pb2.HealthCheckResponse.SERVING]
        finally:
            statuses.stop()
            for export in exports:
                export.cancel()
            await held.close()
        assert await wait_until(lambda: _true(app.units.pool.checkedout() == 0), timeout=10)


class HealthWatch:
    """Every status grpc.health.v1 Watch reports for the server ("")."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.seen: list[int] = []
        self._call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="")
        )
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        async for response in self._call:
            self.seen.append(response.status)

    def stop(self) -> None:
        self._call.cancel()
        self._task.cancel()


async def _true(value: bool) -> bool:
    return value


async def test_an_unread_export_ends_after_the_idle_bound_and_frees_its_connection(
    database_url,
):
    async with serving(database_url, OBSERVATORY_EXPORT_IDLE_S=1) as (app, channel):
        content = content_pb2_grpc.ContentServiceStub(channel)
        caller = new_caller()
        await load_rows(content, caller)
        export = unread_export(channel, caller)
        first = await export.read()
        assert first.rows_total == EXPORT_ROWS
        assert await wait_until(lambda: _true(app.units.pool.checkedout() == 1), timeout=5)
        # Past the bound, the connection goes back although the client still does not read.
        assert await wait_until(lambda: _true(app.units.pool.checkedout() == 0), timeout=10)
        # Reading again, the client gets what was on its way, then the error.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            while await export.read() is not grpc.aio.EOF:
                pass
        error = raised.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = await expect_rpc_error(_raise(error))
        assert details.reason == "LIMIT_EXCEEDED"
        assert details.info.metadata["limit"] == "OBSERVATORY_EXPORT_IDLE_S"
        assert details.info.metadata["max"] == "1"
        # A client that reads gets its whole export.
        rows = 0
        async for chunk in content.ExportContent(
            content_pb2.ExportContentRequest(format=content_pb2.EXPORT_FORMAT_CSV),
            metadata=caller.metadata,
        ):
            rows = chunk.rows_sent
        assert rows == EXPORT_ROWS


async def _raise(error: Exception) -> None:
    raise error


async def test_idle_upsert_streams_after_their_first_message_hold_no_connection(
    database_url,
):
    async with serving(database_url, OBSERVATORY_MAX_STREAMS_PER_CALLER=STREAMS + 1) as (
        app,
        channel,
    ):
        vectors = vector_pb2_grpc.VectorServiceStub(channel)
        mallory = new_caller()
        name = "idle_" + mallory.user_id.hex[:12]
        await vectors.CreateCollection(
            vector_pb2.CreateCollectionRequest(
                collection=vector_pb2.Collection(name=name, dimension=3)
            ),
            metadata=mallory.metadata,
        )
        held = HeldStreams()
        try:
            for i in range(STREAMS):
                held.open(
                    vectors.UpsertItems,
                    mallory,
                    [
                        vector_pb2.UpsertItemsRequest(
                            collection=name,
                            items=[vector_pb2.Item(id=f"item-{i}", vector=[1.0, 2.0, 3.0])],
                        )
                    ],
                )
            await asyncio.sleep(1.0)
            assert app.units.pool.checkedout() <= 2
            took = await other_callers_calls(content_pb2_grpc.ContentServiceStub(channel), 2.0)
            assert max(took) < 1.0
        finally:
            await held.close()
            await vectors.DeleteCollection(
                vector_pb2.DeleteCollectionRequest(name=name), metadata=mallory.metadata
            )


async def test_a_slow_reader_is_not_idle_and_gets_its_whole_export(database_url, content_stub):
    caller = new_caller()
    await load_rows(content_stub, caller)
    # Statements may run 1 s: an export that a client reads slowly but steadily
    # (in more than 3 s) outlasts that, and is not idle.
    async with serving(
        database_url, OBSERVATORY_STATEMENT_TIMEOUT_S=1, OBSERVATORY_EXPORT_IDLE_S=10
    ) as (_app, channel):
        content = content_pb2_grpc.ContentServiceStub(channel)
        rows = 0
        async for chunk in content.ExportContent(
            content_pb2.ExportContentRequest(format=content_pb2.EXPORT_FORMAT_CSV),
            metadata=caller.metadata,
        ):
            rows = chunk.rows_sent
            await asyncio.sleep(0.2)
        assert rows == EXPORT_ROWS

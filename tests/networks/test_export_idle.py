"""ExportNetwork and a client that stops reading: the export waits at most
OBSERVATORY_EXPORT_IDLE_S for it, then ends with RESOURCE_EXHAUSTED /
LIMIT_EXCEEDED and gives its connection back at once; a pause shorter than
that, even one longer than the statement timeout, costs nothing. The
database is never reported lost and health stays SERVING."""

from __future__ import annotations

import asyncio
import io
import time
import uuid

import grpc
import networkx as nx
import pytest
from grpc_health.v1 import health_pb2
from observatory.v1 import content_pb2, content_pb2_grpc, network_pb2, network_pb2_grpc

from tests.helpers import Caller, expect_rpc_error, ingest_requests, make_content, new_caller
from tests.helpers import wait_until as _wait_until
from tests.networks.helpers import ACTOR_TERM
from tests.streams.conftest import serving
from tests.streams.helpers import health, unread_export
from tests.streams.test_idle_streams import HealthWatch, load_rows

pytestmark = pytest.mark.asyncio

GRAPHML = network_pb2.NETWORK_FORMAT_GRAPHML
# Accounts, each with TERMS long terms of its own: an actor-term network of
# ~25 MB of GraphML, more than every buffer between the export and its client.
ACCOUNTS = 4
TERMS = 1000
TERM_CHARS = 1900
NODES = ACCOUNTS + ACCOUNTS * TERMS


async def load_network(content: content_pb2_grpc.ContentServiceStub, caller: Caller) -> str:
    """The content of a heavy actor-term network for `caller`; its run ID."""
    run = f"run-{uuid.uuid4().hex}"
    contents = [
        make_content(
            platform="rss",
            author_platform_id=f"account{i}",
            collection_run_id=run,
            search_terms_matched=[f"{i}-{j}-" + "x" * TERM_CHARS for j in range(TERMS)],
        )
        for i in range(ACCOUNTS)
    ]
    reply = await content.IngestContent(
        iter(ingest_requests(*([c] for c in contents))), metadata=caller.metadata
    )
    assert reply.inserted == ACCOUNTS
    return run


def export_request(run: str) -> network_pb2.ExportNetworkRequest:
    return network_pb2.ExportNetworkRequest(
        kind=ACTOR_TERM,
        filter=content_pb2.ContentFilter(collection_run_id=run),
        format=GRAPHML,
    )


async def wait_until(condition, timeout: float) -> bool:
    async def holds() -> bool:
        return bool(condition())

    return await _wait_until(holds, timeout=timeout)


async def read_to_the_end(call) -> bytes:
    data = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        data.append(chunk.data)
    return b"".join(data)


async def _raise(error: Exception) -> None:
    raise error


async def test_an_unread_network_export_ends_after_the_idle_bound_and_frees_its_connection(
    database_url,
):
    async with serving(database_url, OBSERVATORY_EXPORT_IDLE_S=1) as (app, channel):
        networks = network_pb2_grpc.NetworkServiceStub(channel)
        caller = new_caller()
        run = await load_network(content_pb2_grpc.ContentServiceStub(channel), caller)
        statuses = HealthWatch(channel)
        try:
            export = networks.ExportNetwork(export_request(run), metadata=caller.metadata)
            first = await export.read()
            assert first.rows_total == NODES + ACCOUNTS * TERMS
            assert await wait_until(lambda: app.units.pool.checkedout() == 1, timeout=5)
            # Past the bound the connection goes back, though the client still does not read.
            assert await wait_until(lambda: app.units.pool.checkedout() == 0, timeout=10)
            # Reading again, the client gets what was on its way, then the error.
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await read_to_the_end(export)
            error = raised.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            details = await expect_rpc_error(_raise(error))
            assert details.reason == "LIMIT_EXCEEDED"
            assert details.info.metadata["limit"] == "OBSERVATORY_EXPORT_IDLE_S"
            assert details.info.metadata["max"] == "1"
            assert "OBSERVATORY_EXPORT_IDLE_S" in error.details()

            # The database was never taken for lost: the pool and health are as they were.
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
            assert statuses.seen == [health_pb2.HealthCheckResponse.SERVING]
            # A client that reads gets the whole network.
            data = await read_to_the_end(
                networks.ExportNetwork(export_request(run), metadata=caller.metadata)
            )
            assert nx.read_graphml(io.BytesIO(data)).number_of_nodes() == NODES
        finally:
            statuses.stop()


async def test_a_pause_longer_than_the_statement_timeout_but_within_the_idle_bound_is_harmless(
    database_url,
):
    # Sessions may idle in a transaction for 1 s (OBSERVATORY_STATEMENT_TIMEOUT_S);
    # the export's snapshot waits for its client longer than that, up to the
    # idle bound.
    async with serving(
        database_url, OBSERVATORY_STATEMENT_TIMEOUT_S=1, OBSERVATORY_EXPORT_IDLE_S=10
    ) as (app, channel):
        networks = network_pb2_grpc.NetworkServiceStub(channel)
        caller = new_caller()
        run = await load_network(content_pb2_grpc.ContentServiceStub(channel), caller)
        export = networks.ExportNetwork(export_request(run), metadata=caller.metadata)
        first = await export.read()
        await asyncio.sleep(2.5)
        assert app.units.pool.checkedout() == 1  # the export is still under way
        data = first.data + await read_to_the_end(export)
        assert nx.read_graphml(io.BytesIO(data)).number_of_nodes() == NODES
        assert await wait_until(lambda: app.units.pool.checkedout() == 0, timeout=5)
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_an_unread_export_past_the_statement_timeout_still_ends_with_the_idle_error(
    database_url,
):
    async with serving(
        database_url, OBSERVATORY_STATEMENT_TIMEOUT_S=1, OBSERVATORY_EXPORT_IDLE_S=2
    ) as (app, channel):
        networks = network_pb2_grpc.NetworkServiceStub(channel)
        caller = new_caller()
        run = await load_network(content_pb2_grpc.ContentServiceStub(channel), caller)
        export = networks.ExportNetwork(export_request(run), metadata=caller.metadata)
        await export.read()
        await asyncio.sleep(3.0)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read_to_the_end(export)
        details = await expect_rpc_error(_raise(raised.value))
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value
        assert details.info.metadata["limit"] == "OBSERVATORY_EXPORT_IDLE_S"
        assert app.units.pool.checkedout() == 0
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_an_unread_export_ends_at_its_deadline_and_frees_its_connection(database_url):
    # The idle bound is far off (60 s): the call's deadline ends the export first.
    async with serving(database_url) as (app, channel):
        networks = network_pb2_grpc.NetworkServiceStub(channel)
        caller = new_caller()
        run = await load_network(content_pb2_grpc.ContentServiceStub(channel), caller)
        started = time.monotonic()
        export = networks.ExportNetwork(export_request(run), metadata=caller.metadata, timeout=2)
        await export.read()
        assert await wait_until(lambda: app.units.pool.checkedout() == 0, timeout=10)
        assert time.monotonic() - started < 5
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read_to_the_end(export)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_network_exports_wait_for_the_export_slots_content_exports_hold(database_url):
    # Two connections: one export at a time, the other connection for everyone else.
    async with serving(database_url, DATABASE_POOL_SIZE=1, DATABASE_MAX_OVERFLOW=1) as (
        app,
        channel,
    ):
        assert app.limits.max_export_connections == 1
        content = content_pb2_grpc.ContentServiceStub(channel)
        networks = network_pb2_grpc.NetworkServiceStub(channel)
        caller = new_caller()
        await load_rows(content, caller)
        run = f"run-{uuid.uuid4().hex}"
        small = [
            make_content(
                collection_run_id=run,
                author_platform_id=f"u{i}",
                search_terms_matched=["a", f"t{i}"],
            )
            for i in range(5)
        ]
        await content.IngestContent(iter(ingest_requests(small)), metadata=caller.metadata)

        held = unread_export(channel, caller)
        await held.read()
        assert await wait_until(lambda: app.units.pool.checkedout() == 1, timeout=5)
        network = asyncio.create_task(
            read_to_the_end(networks.ExportNetwork(export_request(run), metadata=caller.metadata))
        )
        await asyncio.sleep(1.0)
        # The network export waits for the slot, holding no connection, and
        # other calls go on.
        assert not network.done()
        assert app.units.pool.checkedout() == 1
        await content.ListContent(
            content_pb2.ListContentRequest(), metadata=caller.metadata, timeout=2
        )
        held.cancel()
        graph = nx.read_graphml(io.BytesIO(await asyncio.wait_for(network, 10)))
        assert graph.number_of_nodes() == 5 + 6

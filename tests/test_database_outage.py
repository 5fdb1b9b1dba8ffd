"""The database going away and coming back under a running server."""

import asyncio
import os
import shutil

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from server import migrate
from server.app import create_server
from server.embedded import EmbeddedPostgres
from tests.conftest import TEST_DATA_DIR, make_settings
from tests.helpers import error_details, make_content

pytestmark = pytest.mark.asyncio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service)
    )
    return response.status


async def _wait_for_health(channel, status: int, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < timeout:
        if await _health(channel) == status:
            return loop.time() - started
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"health did not become {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
    )


async def test_health_serves_every_service_without_a_token(channel):
    for service in ("", "observatory.v1.ContentService", "observatory.v1.AdminService"):
        assert await _health(channel, service) == SERVING


async def test_health_check_of_an_unknown_service_is_not_found(channel):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health(channel, "observatory.v1.NoSuchService")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest_asyncio.fixture
async def private_postgres(postgres):
    """A PostgreSQL of this test's own, which it may stop and start."""
    if postgres.embedded is None:
        pytest.skip("needs the embedded database, which the test can stop and start")
    embedded = EmbeddedPostgres(TEST_DATA_DIR / f"outage-{os.getpid()}")
    await asyncio.to_thread(embedded.start)
    url = await asyncio.to_thread(embedded.ensure_database, "observatory_outage", fresh=True)
    await asyncio.to_thread(migrate.upgrade, url)
    yield embedded, url
    await asyncio.to_thread(embedded.stop)
    shutil.rmtree(embedded.data_dir, ignore_errors=True)


async def test_outage_gives_unavailable_and_recovery_needs_no_restart(private_postgres, alice):
    embedded, url = private_postgres
    app = await create_server(make_settings(), url)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        await _outage_and_recovery(
            embedded, channel, content_pb2_grpc.ContentServiceStub(channel), alice
        )
    finally:
        await channel.close()
        await app.stop(0)


async def _outage_and_recovery(embedded, channel, content_stub, alice):
    created = await content_stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content()), metadata=alice.metadata
    )
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == SERVING

    await asyncio.to_thread(embedded.stop)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await content_stub.GetContent(
                content_pb2.GetContentRequest(id=created.id), metadata=alice.metadata
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(caught.value).reason == "DATABASE_UNAVAILABLE"
        await _wait_for_health(channel, NOT_SERVING, timeout=5)
        assert (await asyncio.wait_for(watch.read(), timeout=5)).status == NOT_SERVING
    finally:
        await asyncio.to_thread(embedded.start)

    await _wait_for_health(channel, SERVING, timeout=5)
    assert (await asyncio.wait_for(watch.read(), timeout=5)).status == SERVING
    watch.cancel()
    fetched = await content_stub.GetContent(
        content_pb2.GetContentRequest(id=created.id), metadata=alice.metadata
    )
    assert fetched.id == created.id

"""NetworkService on the server's surface: health, reflection, auth."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from observatory.v1 import network_pb2

from tests.helpers import expect_rpc_error

pytestmark = pytest.mark.asyncio

NAME = "observatory.v1.NetworkService"


async def test_health_reports_the_service(channel):
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=NAME)
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {service.name for service in response.list_services_response.service}
        assert NAME in names
        return
    raise AssertionError("no reflection answer")


async def test_every_rpc_needs_a_token(network_stub):
    calls = [
        network_stub.GetNetwork(
            network_pb2.GetNetworkRequest(kind=network_pb2.NETWORK_KIND_TERM_COOCCURRENCE)
        ),
        network_stub.ListCrossPlatformActors(network_pb2.ListCrossPlatformActorsRequest()),
    ]
    for call in calls:
        error = await expect_rpc_error(call)
        assert error.code == grpc.StatusCode.UNAUTHENTICATED

    async def export():
        async for _ in network_stub.ExportNetwork(network_pb2.ExportNetworkRequest()):
            pass

    assert (await expect_rpc_error(export())).code == grpc.StatusCode.UNAUTHENTICATED

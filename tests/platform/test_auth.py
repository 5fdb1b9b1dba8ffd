"""Bearer JWT authentication in front of every RPC but health and reflection.
(What a token must hold, for both algorithms: test_tokens.py.)"""

import grpc
import pytest
import pytest_asyncio
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from observatory.v1 import content_pb2

from server.app import create_server
from tests.conftest import make_settings
from tests.helpers import error_details, make_content

pytestmark = pytest.mark.asyncio


async def _create(content_stub, metadata):
    return await content_stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content()), metadata=metadata
    )


async def _unauthenticated(content_stub, metadata) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _create(content_stub, metadata)
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
    assert details.reason == "UNAUTHENTICATED"
    return details.message


async def test_missing_token_is_unauthenticated(content_stub):
    assert "authorization" in await _unauthenticated(content_stub, ())


async def test_non_bearer_scheme_is_unauthenticated(content_stub):
    await _unauthenticated(content_stub, (("authorization", "Basic dXNlcjpwYXNz"),))


async def test_a_token_that_is_not_a_jwt_is_unauthenticated(content_stub):
    assert "not a JWT" in await _unauthenticated(
        content_stub, (("authorization", "Bearer not.a.jwt"),)
    )


async def test_owner_comes_from_the_token_not_the_request(content_stub, alice):
    message = make_content()
    message.owner_id = "00000000-0000-4000-8000-000000000000"
    created = await content_stub.CreateContent(
        content_pb2.CreateContentRequest(content=message), metadata=alice.metadata
    )
    assert created.owner_id == str(alice.user_id)


@pytest_asyncio.fixture
async def without_reflection(database_url):
    app = await create_server(make_settings(OBSERVATORY_REFLECTION=False), database_url)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield channel
    await channel.close()
    await app.stop(0)


async def _list_services(channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        return [service.name for service in response.list_services_response.service]
    return []


async def test_reflection_lists_the_services_without_a_token(channel):
    services = await _list_services(channel)
    assert {
        "observatory.v1.ContentService",
        "observatory.v1.AdminService",
        "grpc.health.v1.Health",
    } <= set(services)


async def test_reflection_can_be_switched_off(without_reflection):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list_services(without_reflection)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

"""Bearer JWT authentication in front of every RPC but health and reflection."""

import asyncio
import time
import uuid

import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from server.app import create_server
from tests.conftest import make_settings
from tests.helpers import TEST_SECRET, error_details, make_content

pytestmark = pytest.mark.asyncio


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


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


async def test_expired_token_is_unauthenticated(content_stub):
    token = jwt.encode(
        {"sub": str(uuid.uuid4()), "exp": int(time.time()) - 10}, TEST_SECRET, algorithm="HS256"
    )
    assert "expired" in await _unauthenticated(content_stub, _metadata(token))


async def test_token_signed_with_another_secret_is_unauthenticated(content_stub):
    token = jwt.encode({"sub": str(uuid.uuid4())}, "x" * 48, algorithm="HS256")
    await _unauthenticated(content_stub, _metadata(token))


async def test_sub_must_be_a_uuid(content_stub):
    token = jwt.encode({"sub": "alice"}, TEST_SECRET, algorithm="HS256")
    assert "sub" in await _unauthenticated(content_stub, _metadata(token))


async def test_unknown_role_is_unauthenticated(content_stub):
    token = jwt.encode({"sub": str(uuid.uuid4()), "role": "root"}, TEST_SECRET, algorithm="HS256")
    await _unauthenticated(content_stub, _metadata(token))


async def test_missing_role_means_user(content_stub, admin_stub):
    user_id = uuid.uuid4()
    token = jwt.encode({"sub": str(user_id)}, TEST_SECRET, algorithm="HS256")
    created = await _create(content_stub, _metadata(token))
    assert created.owner_id == str(user_id)


async def test_owner_comes_from_the_token_not_the_request(content_stub, alice):
    message = make_content()
    message.owner_id = str(uuid.uuid4())
    created = await content_stub.CreateContent(
        content_pb2.CreateContentRequest(content=message), metadata=alice.metadata
    )
    assert created.owner_id == str(alice.user_id)


@pytest_asyncio.fixture
async def rs256_server(database_url):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    app = await create_server(
        make_settings(OBSERVATORY_JWT_PUBLIC_KEY=public_pem.decode(), OBSERVATORY_REFLECTION=False),
        database_url,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield key, channel
    await channel.close()
    await app.stop(0)


async def test_rs256_tokens_are_accepted_with_a_public_key(rs256_server):
    key, channel = rs256_server
    user_id = uuid.uuid4()
    token = jwt.encode({"sub": str(user_id), "role": "user"}, key, algorithm="RS256")
    created = await _create(content_pb2_grpc.ContentServiceStub(channel), _metadata(token))
    assert created.owner_id == str(user_id)


async def test_rs256_token_from_another_key_is_rejected(rs256_server):
    _, channel = rs256_server
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode({"sub": str(uuid.uuid4())}, other, algorithm="RS256")
    await _unauthenticated(content_pb2_grpc.ContentServiceStub(channel), _metadata(token))


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


async def test_reflection_can_be_switched_off(rs256_server):
    _, channel = rs256_server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list_services(channel)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_token_accepted_before_is_refused_once_it_expires(content_stub):
    token = jwt.encode(
        {"sub": str(uuid.uuid4()), "exp": int(time.time()) + 2}, TEST_SECRET, algorithm="HS256"
    )
    await _create(content_stub, _metadata(token))
    await asyncio.sleep(
        max(0.0, jwt.decode(token, TEST_SECRET, algorithms=["HS256"])["exp"] - time.time()) + 0.2
    )
    assert "expired" in await _unauthenticated(content_stub, _metadata(token))

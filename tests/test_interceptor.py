"""The interceptor around streaming RPCs (exports and searches stream back):
authentication, items before an error kept, errors mapped to statuses."""

import grpc
import pytest
import pytest_asyncio

from server import errors
from server.auth import Authenticator
from server.interceptor import ObservatoryInterceptor
from tests.conftest import make_settings
from tests.helpers import error_details, new_caller

pytestmark = pytest.mark.asyncio
METHOD = "/test.Echo/Repeat"


async def repeat(request: bytes, context):
    """Yields the request three times, then fails as the request asks."""
    for _ in range(3):
        yield request
    if request == b"not-found":
        raise errors.NotFound("gone midway")
    if request == b"bug":
        raise RuntimeError("a bug")


@pytest_asyncio.fixture
async def channel():
    settings = make_settings()
    server = grpc.aio.server(interceptors=[ObservatoryInterceptor(Authenticator(settings))])
    handler = grpc.unary_stream_rpc_method_handler(
        repeat, request_deserializer=lambda raw: raw, response_serializer=lambda raw: raw
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Echo", {"Repeat": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(0)


async def _collect(
    channel, request: bytes, metadata
) -> tuple[list[bytes], grpc.aio.AioRpcError | None]:
    call = channel.unary_stream(METHOD)(request, metadata=metadata)
    received = []
    try:
        async for item in call:
            received.append(item)
    except grpc.aio.AioRpcError as error:
        return received, error
    return received, None


async def test_a_stream_delivers_every_item(channel):
    received, error = await _collect(channel, b"hello", new_caller().metadata)
    assert received == [b"hello"] * 3
    assert error is None


async def test_a_stream_needs_a_token(channel):
    received, error = await _collect(channel, b"hello", ())
    assert received == []
    assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_error_midway_keeps_what_was_sent_and_maps_the_status(channel):
    received, error = await _collect(channel, b"not-found", new_caller().metadata)
    assert received == [b"not-found"] * 3
    details = error_details(error)
    assert (details.code, details.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert details.info.domain == "observatory.v1"


async def test_a_bug_is_internal_with_a_request_id_to_quote(channel):
    metadata = (*new_caller().metadata, ("x-request-id", "req-42"))
    received, error = await _collect(channel, b"bug", metadata)
    assert len(received) == 3
    details = error_details(error)
    assert (details.code, details.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert details.info.metadata["request_id"] == "req-42"
    assert "a bug" not in details.message  # internals are logged, not sent

"""A caller's `x-request-id` is kept when it is a sane length and character
set, and replaced by a fresh one otherwise (it is logged and sent back in
every error's ErrorInfo)."""

import uuid

import grpc
import pytest
from observatory.v1 import content_pb2, content_pb2_grpc

from tests.helpers import expect_rpc_error

pytestmark = pytest.mark.asyncio


async def _request_id_in_error(channel: grpc.aio.Channel, sent: str) -> str:
    """The request_id the server answers an unauthenticated call with."""
    stub = content_pb2_grpc.ContentServiceStub(channel)
    error = await expect_rpc_error(
        stub.GetContent(
            content_pb2.GetContentRequest(id=str(uuid.uuid4())),
            metadata=(("x-request-id", sent),),
        )
    )
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    return error.info.metadata["request_id"]


@pytest.mark.parametrize(
    "sent",
    ["req-42", "a1B2.c3:d4_e5-f6", "0f8e7d6c-5b4a-4938-8271-605f4e3d2c1b", "x" * 128],
    ids=["short", "every allowed character", "uuid", "128 characters"],
)
async def test_a_sane_request_id_is_kept(channel, sent):
    assert await _request_id_in_error(channel, sent) == sent


@pytest.mark.parametrize(
    "sent",
    ["x" * 129, "x" * 4000, "has spaces", "semi;colon", "<script>", "a/b", "{json}", "a,b"],
    ids=[
        "129 characters",
        "4000 characters",
        "space",
        "semicolon",
        "angle",
        "slash",
        "brace",
        "comma",
    ],
)
async def test_any_other_request_id_is_replaced_by_a_fresh_one(channel, sent):
    answered = await _request_id_in_error(channel, sent)

    assert answered != sent
    assert uuid.UUID(answered)

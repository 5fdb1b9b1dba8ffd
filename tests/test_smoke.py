import pytest
from observatory.v1 import content_pb2

from tests.helpers import make_content

pytestmark = pytest.mark.asyncio


async def test_created_content_can_be_read_back(content_stub, alice):
    created = await content_stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content(title="Hello")),
        metadata=alice.metadata,
    )
    fetched = await content_stub.GetContent(
        content_pb2.GetContentRequest(id=created.id), metadata=alice.metadata
    )
    assert fetched == created
    assert fetched.owner_id == str(alice.user_id)

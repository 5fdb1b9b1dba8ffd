"""UpsertItems reads each vector as its bytes (server.vectors.wire): every
encoding a proto3 encoder may send must still mean what the generated decoder
reads, through the gRPC surface as well."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from observatory.v1 import vector_pb2

from server.vectors.wire import decode_upsert_items
from tests.helpers import expect_rpc_error
from tests.vectors.helpers import create_collection


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _floats(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _unpacked(values: list[float]) -> bytes:
    """Field 2 (Item.vector) one value per field, as proto2 encoders send it."""
    return b"".join(_varint(2 << 3 | 5) + struct.pack("<f", value) for value in values)


def _item(item_id: str, vector_fields: bytes, rest: bytes = b"") -> bytes:
    return _field(1, item_id.encode()) + vector_fields + rest


def _request(collection: str, *items: bytes) -> bytes:
    """An UpsertItemsRequest by hand: field 1 the collection, field 2 each item."""
    return _field(1, collection.encode()) + b"".join(_field(2, item) for item in items)


# Each: the encoded item, and the vector the generated decoder reads from it.
ENCODINGS = {
    "packed": (_item("a", _field(2, _floats([1, 2, 3]))), [1, 2, 3]),
    "unpacked": (_item("b", _unpacked([4, 5, 6])), [4, 5, 6]),
    "packed in two runs": (
        _item("c", _field(2, _floats([1, 2])) + _field(2, _floats([3]))),
        [1, 2, 3],
    ),
    "a run the size of the whole after a first run": (
        _item("d", _field(2, _floats([9])) + _field(2, _floats([1, 2, 3]))),
        [9, 1, 2, 3],
    ),
    "packed then unpacked": (_item("e", _field(2, _floats([1, 2])) + _unpacked([3])), [1, 2, 3]),
    "fields in reverse order": (_field(2, _floats([7, 8, 9])) + _field(1, b"f"), [7, 8, 9]),
    "an unknown field after the vector": (
        _item("g", _field(2, _floats([1, 2, 3])), _field(99, b"future")),
        [1, 2, 3],
    ),
    "no vector": (_item("h", b""), []),
    "an empty packed run": (_item("i", _field(2, b"")), []),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_decodes_as_the_generated_decoder_reads_it(encoding):
    encoded, expected = ENCODINGS[encoding]
    raw = _request("col", _item("first", _field(2, _floats([0.5, 0.25, 1]))), encoded)
    real = vector_pb2.UpsertItemsRequest.FromString(raw)
    assert list(real.items[1].vector) == expected  # the premise of the case
    wire = decode_upsert_items(raw)
    assert wire.collection == real.collection == "col"
    assert len(wire.items) == len(real.items) == 2
    # What a batch's byte budget counts: each item's encoded size.
    assert list(wire.sizes) == [item.ByteSize() for item in wire.items]
    for got, want in zip(wire.items, real.items, strict=True):
        assert np.frombuffer(got.vector, "<f4").tolist() == list(want.vector)
        assert (got.id, got.text, got.url, got.content_id) == (
            want.id,
            want.text,
            want.url,
            want.content_id,
        )


def test_the_generated_encoding_with_every_field_keeps_the_bytes_view():
    item = vector_pb2.Item(
        id="x", vector=[1.5, -2.0], text="t", content_id="c", url="https://a.org"
    )
    item.metadata.update({"k": [1, {"n": None}]})
    raw = vector_pb2.UpsertItemsRequest(collection="col", items=[item]).SerializeToString()
    (got,) = decode_upsert_items(raw).items
    assert got.vector == _floats([1.5, -2.0])
    assert (got.id, got.text, got.content_id, got.url) == ("x", "t", "c", "https://a.org")
    assert got.metadata == item.metadata


def test_a_vector_of_broken_floats_is_undecodable_as_with_the_generated_decoder():
    raw = _request("col", _item("a", _field(2, b"\x00" * 5)))
    with pytest.raises(DecodeError):
        vector_pb2.UpsertItemsRequest.FromString(raw)
    with pytest.raises(DecodeError):
        decode_upsert_items(raw)


async def _upsert_raw(channel: grpc.aio.Channel, caller, messages: list[bytes]):
    call = channel.stream_unary(
        "/observatory.v1.VectorService/UpsertItems",
        request_serializer=lambda raw: raw,
        response_deserializer=vector_pb2.UpsertItemsResponse.FromString,
    )

    async def requests():
        for message in messages:
            yield message

    return await call(requests(), metadata=caller.metadata)


@pytest.mark.asyncio
@pytest.mark.usefixtures("drop_vector_collections")
async def test_hand_encoded_vectors_are_stored_as_the_generated_decoder_reads_them(
    channel, vector_stub, alice
):
    name = await create_collection(vector_stub, alice, 3)
    three = {key: item for key, (item, vector) in ENCODINGS.items() if len(vector) == 3}
    messages = [_request(name, *three.values())]
    # The rejected ones are reported by index, the rest kept.
    messages.append(_request("", ENCODINGS["a run the size of the whole after a first run"][0]))
    messages.append(_request("", ENCODINGS["no vector"][0]))
    response = await _upsert_raw(channel, alice, messages)
    assert response.received == len(three) + 2
    assert response.upserted == len(three)
    assert [(e.index, e.field) for e in response.errors] == [
        (len(three), "vector"),
        (len(three) + 1, "vector"),
    ]
    assert "has 4 values" in response.errors[0].reason
    for key, (_, vector) in ENCODINGS.items():
        if key not in three:
            continue
        item_id = vector_pb2.Item.FromString(three[key]).id
        got = await vector_stub.GetItem(
            vector_pb2.GetItemRequest(collection=name, id=item_id, with_vector=True),
            metadata=alice.metadata,
        )
        assert list(got.vector) == vector, key


@pytest.mark.asyncio
@pytest.mark.usefixtures("drop_vector_collections")
async def test_undecodable_stream_message_is_invalid_argument(channel, vector_stub, alice):
    name = await create_collection(vector_stub, alice, 3)
    details = await expect_rpc_error(
        _upsert_raw(
            channel,
            alice,
            [_request(name, ENCODINGS["packed"][0]), _request("", _item("z", _field(2, b"abc")))],
        )
    )
    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "stream message 1" in details.message

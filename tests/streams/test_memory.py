"""A stream of maximum-size IngestContent messages keeps memory bounded: the
server holds the message being read (as gRPC hands it over and decoded), the
batch being filled and the batches in flight (each at most
OBSERVATORY_BULK_BATCH_BYTES of rows), however many messages come.

Stated bound, for 60 MiB messages with client and server in this one process
(so every message is held on both sides of the connection): the process
grows by less than MAX_GROWTH_MB at its peak, and a second such stream (once
the allocator has returned what was freed) leaves it within RETAINED_MB of
where the first left it: nothing of the ~480 MB streamed is kept.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc

import pytest
from google.protobuf.internal.encoder import _VarintBytes
from observatory.v1 import content_pb2

from tests.helpers import make_content
from tests.streams.helpers import rss_mb

pytestmark = pytest.mark.asyncio

MESSAGE_BYTES = 60 * 1024 * 1024  # the contract accepts messages up to 64 MiB
BODY = "word " * 199_000  # ~1 MB of text_content, under its 1,000,000-character limit
MESSAGES = 8
MAX_GROWTH_MB = 900
RETAINED_MB = 64


def max_size_message(number: int) -> tuple[bytes, int]:
    """An IngestContentRequest of ~60 MiB (rows of ~1 MB, each its own
    platform_id), serialized: fields of one Content may come in any order on the
    wire, so each row is its small fields plus one shared text_content field."""
    body = content_pb2.Content(text_content=BODY).SerializeToString()
    message = bytearray()
    rows = 0
    while len(message) < MESSAGE_BYTES - len(body) - 1024:
        small = make_content(platform_id=f"max-{number}-{rows}", text_content="")
        row = small.SerializeToString()
        message += b"\x0a" + _VarintBytes(len(row) + len(body))  # field 1: contents
        message += row
        message += body
        rows += 1
    return bytes(message), rows


def settled_rss_mb() -> float:
    """RSS once garbage is collected and the allocator has returned what it can."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mb()


async def test_a_stream_of_maximum_size_messages_keeps_memory_bounded(channel, alice, db):
    ingest = channel.stream_unary(
        "/observatory.v1.ContentService/IngestContent",
        request_serializer=None,
        response_deserializer=content_pb2.IngestContentResponse.FromString,
    )

    async def stream(first: int) -> float:
        """One stream of MESSAGES messages; its peak RSS."""
        peaks = [0.0]
        rows_sent = 0

        async def requests():
            nonlocal rows_sent
            for number in range(first, first + MESSAGES):
                message, rows = max_size_message(number)
                rows_sent += rows
                yield message
                del message

        async def sample() -> None:
            while True:
                peaks[0] = max(peaks[0], rss_mb())
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        try:
            response = await ingest(requests(), metadata=alice.metadata, timeout=600)
        finally:
            sampler.cancel()
        assert response.inserted == rows_sent
        assert response.error_count == 0
        return peaks[0]

    # Two streams: the first may leave the allocator's arenas (and this
    # process's other tests' leftovers) at a new level; what the second keeps
    # over the first is what a stream leaks.
    before = settled_rss_mb()
    peak = await stream(0) - before
    after_first = settled_rss_mb()
    second_peak = await stream(MESSAGES) - after_first
    retained = settled_rss_mb() - after_first
    print(
        f"RSS: peak growth {peak:.0f} / {second_peak:.0f} MB, first stream left "
        f"{after_first - before:.0f} MB, the second {retained:.0f} MB more"
    )
    assert max(peak, second_peak) < MAX_GROWTH_MB
    assert retained < RETAINED_MB

"""A stream of maximum-size IngestContent messages keeps memory bounded: the
server holds the message being read (as gRPC hands it over and decoded), the
batch being filled and the batches in flight (each at most
OBSERVATORY_BULK_BATCH_BYTES of rows), however many messages come.

Stated bound, for 60 MiB messages with client and server in this one process
(so every message is held on both sides of the connection): the process
grows by less than MAX_GROWTH_MB at its peak, and nothing of the ~480 MB
streamed is kept:

- a third stream leaves none of its protobuf messages alive (on either side),
  and less than KEPT_BY_PYTHON_MB of the Python objects it allocated (traced
  by tracemalloc, which sees every bytes object, string, record and task; not
  a message's own memory, which protobuf allocates itself): less than one of
  its ~1 MB rows. Its rows are words of 1,000 characters, so that tracing
  each allocation stays cheap;
- what malloc holds for the process (every arena's blocks in use, and its
  own mappings) after the second stream is within RETAINED_MB of what it
  held after the first. This catches a leak in gRPC's core or protobuf as
  well. RSS cannot tell it: glibc keeps the top of each thread's arena
  resident (malloc_trim trims only the main arena's top, and an arena trims
  itself only past a threshold that rises with the largest blocks freed, to
  64 MiB), so in whole-suite runs the trimmed RSS moved by up to 92 MB
  from one stream to the next while what malloc held moved by at most 23.

Each stream has a connection of its own, closed before anything is measured:
gRPC's core keeps buffers per connection, sized by its traffic (1 to 45 MB
after such a stream, changing from stream to stream).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import tracemalloc
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from google.protobuf.message import Message
from observatory.v1 import content_pb2

from tests.helpers import make_content
from tests.streams.helpers import rss_mb

pytestmark = pytest.mark.asyncio

MESSAGE_BYTES = 60 * 1024 * 1024  # the contract accepts messages up to 64 MiB
BODY = "word " * 199_000  # ~1 MB of text_content, under its 1,000,000-character limit
LONG_WORDS = ("w" * 999 + " ") * 995  # as large, in 200 times fewer words
MESSAGES = 8
MAX_GROWTH_MB = 900
RETAINED_MB = 64
KEPT_BY_PYTHON_MB = 1


def max_size_message(number: int, text: str = BODY) -> tuple[bytes, int]:
    """An IngestContentRequest of ~60 MiB (rows of ~1 MB, each its own
    platform_id), serialized: fields of one Content may come in any order on the
    wire, so each row is its small fields plus one shared text_content field."""
    body = content_pb2.Content(text_content=text).SerializeToString()
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


def live_messages() -> int:
    """How many of the service's protobuf messages are alive in this process."""
    gc.collect()
    return sum(
        1
        for obj in gc.get_objects()
        if isinstance(obj, Message) and obj.DESCRIPTOR.full_name.startswith("observatory.")
    )


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def malloc_held_mb() -> float:
    """What malloc has handed out and not had back, after a collection: the
    blocks in use in every arena, and those it mapped on their own."""
    gc.collect()
    info = _libc.mallinfo2()
    return float(info.uordblks + info.hblkhd) / 2**20


def trimmed_rss_mb() -> float:
    """RSS once garbage is collected and the allocator has returned what it can."""
    gc.collect()
    _libc.malloc_trim(0)
    return rss_mb()


async def settled(read: Callable[[], float]) -> float:
    """`read()` once it stops falling, read for at most 3 s: the server lets go
    of a stream's connection, and of what its call held, a moment after the
    client."""
    level = read()
    for _ in range(30):
        await asyncio.sleep(0.1)
        now = read()
        if now > level - 1:
            return min(now, level)
        level = now
    return level


async def test_a_stream_of_maximum_size_messages_keeps_memory_bounded(app, alice, db):
    async def stream(first: int, text: str = BODY) -> float:
        """One stream of MESSAGES messages on a connection of its own, closed
        once the stream ends; its peak RSS."""
        peaks = [0.0]
        rows_sent = 0

        async def requests():
            nonlocal rows_sent
            for number in range(first, first + MESSAGES):
                message, rows = max_size_message(number, text)
                rows_sent += rows
                yield message
                del message

        async def sample() -> None:
            while True:
                peaks[0] = max(peaks[0], rss_mb())
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                ingest = channel.stream_unary(
                    "/observatory.v1.ContentService/IngestContent",
                    request_serializer=None,
                    response_deserializer=content_pb2.IngestContentResponse.FromString,
                )
                response = await ingest(requests(), metadata=alice.metadata, timeout=600)
        finally:
            sampler.cancel()
        assert response.inserted == rows_sent
        assert response.error_count == 0
        return peaks[0]

    # Two streams: the first warms what is cached once (prepared statements,
    # metric children, gRPC's and the allocator's own structures); what the
    # second leaves held over the first is what a stream leaks.
    before = await settled(trimmed_rss_mb)
    peak = await stream(0) - before
    after_first = await settled(trimmed_rss_mb)
    held_after_first = await settled(malloc_held_mb)
    second_peak = await stream(MESSAGES) - after_first
    retained = await settled(malloc_held_mb) - held_after_first

    messages_before = live_messages()
    tracemalloc.start()
    try:
        await stream(2 * MESSAGES, LONG_WORDS)
        messages_kept = await settled(live_messages) - messages_before
        kept_by_python = tracemalloc.get_traced_memory()[0] / 2**20
        largest = tracemalloc.take_snapshot().statistics("lineno")[:5]
    finally:
        tracemalloc.stop()
    print(
        f"RSS: peak growth {peak:.0f} / {second_peak:.0f} MB; malloc holds "
        f"{retained:.1f} MB more after the second stream than after the first; "
        f"the third kept {messages_kept} messages and {kept_by_python:.3f} MB of Python objects"
    )
    assert max(peak, second_peak) < MAX_GROWTH_MB
    assert messages_kept <= 0, f"{messages_kept} of the stream's messages are still alive"
    assert kept_by_python < KEPT_BY_PYTHON_MB, "\n".join(map(str, largest))
    assert retained < RETAINED_MB

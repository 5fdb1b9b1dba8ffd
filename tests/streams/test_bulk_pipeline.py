"""server.bulk without a database: how batches are cut and how many are written
at once."""

from __future__ import annotations

import asyncio

import pytest
from observatory.v1 import content_pb2

from server import bulk

pytestmark = pytest.mark.asyncio


def element(size: int) -> content_pb2.Content:
    return content_pb2.Content(title="x" * size)


def cut(budget: bulk.Budget, sizes: list[int], refused: set[int] = frozenset()) -> list[tuple]:
    batcher: bulk.Batcher[int] = bulk.Batcher(budget, digest=True)
    batches = []
    for i, size in enumerate(sizes):
        batch = batcher.add(element(size), None if i in refused else i)
        if batch is not None:
            batches.append(batch)
    if (last := batcher.close()) is not None:
        batches.append(last)
    return [(b.first, b.last, b.records, b.digest) for b in batches]


async def test_batches_are_cut_at_the_row_count():
    batches = cut(bulk.Budget(rows=3, bytes=1 << 20), [10] * 8, refused={1})
    assert [(first, last, records) for first, last, records, _ in batches] == [
        (0, 3, [0, 2, 3]),
        (4, 6, [4, 5, 6]),
        (7, 7, [7]),
    ]


async def test_batches_are_cut_at_the_byte_budget_and_a_huge_element_goes_alone():
    batches = cut(bulk.Budget(rows=100, bytes=1000), [400, 400, 400, 5000, 10])
    assert [(first, last) for first, last, _, _ in batches] == [(0, 2), (3, 3), (4, 4)]


async def test_the_digest_of_a_batch_covers_every_element_before_it():
    same = cut(bulk.Budget(rows=2, bytes=1 << 20), [1, 2, 3, 4])
    other = cut(bulk.Budget(rows=2, bytes=1 << 20), [9, 2, 3, 4])
    assert same[0][3] != other[0][3]
    assert same[1][3] != other[1][3]  # the second batch's rows are equal, its digest is not
    assert cut(bulk.Budget(rows=2, bytes=1 << 20), [1, 2, 3, 4]) == same


class Recorder:
    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.order: list[int] = []
        self.release = asyncio.Event()

    async def write(self, batch: bulk.Batch[int]) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
            await asyncio.sleep(0.01 * (3 - batch.first % 3))
            self.order.append(batch.first)
        finally:
            self.running -= 1


async def test_a_stream_writes_at_most_writers_batches_at_once_and_all_streams_share_the_slots():
    loader = bulk.Loader(bulk.Budget(writers=2))
    recorders = [Recorder(), Recorder()]

    async def stream(recorder: Recorder) -> None:
        async with loader.pipeline(recorder.write) as pipeline:
            for first in range(6):
                await pipeline.put(bulk.Batch(first, first, [first]))

    streams = [asyncio.create_task(stream(r)) for r in recorders]
    await asyncio.sleep(0.05)
    assert sum(r.running for r in recorders) == 2
    for recorder in recorders:
        recorder.release.set()
    await asyncio.gather(*streams)
    assert all(r.most <= 2 for r in recorders)
    assert sorted(recorders[0].order) == list(range(6))


async def test_batches_writing_the_same_keys_commit_in_stream_order():
    loader = bulk.Loader(bulk.Budget(writers=4))
    recorder = Recorder()
    recorder.release.set()
    async with loader.pipeline(recorder.write) as pipeline:
        for first in range(6):
            await pipeline.put(bulk.Batch(first, first, [first]), keys=frozenset({"same"}))
    assert recorder.order == list(range(6))


async def test_a_failed_batch_fails_the_stream_and_cancels_the_others():
    loader = bulk.Loader(bulk.Budget(writers=2))
    cancelled = []

    async def write(batch: bulk.Batch[int]) -> None:
        if batch.first == 0:
            raise RuntimeError("refused")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(batch.first)
            raise

    with pytest.raises(RuntimeError, match="refused"):
        async with loader.pipeline(write) as pipeline:
            for first in range(5):
                await pipeline.put(bulk.Batch(first, first, [first]))
    assert cancelled == [1]


async def test_an_in_order_pipeline_writes_one_batch_at_a_time():
    loader = bulk.Loader(bulk.Budget(writers=4))
    recorder = Recorder()
    recorder.release.set()
    async with loader.pipeline(recorder.write, in_order=True) as pipeline:
        for first in range(4):
            await pipeline.put(bulk.Batch(first, first, [first]))
    assert recorder.most == 1
    assert recorder.order == list(range(4))

"""IngestContent under a storm: several OS processes stream the same rows (one
natural key each) at once, each in its own order. Every stream succeeds, each
row is stored once, and the streams' inserted counts add up to the rows."""

import asyncio
import random
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from observatory.v1 import content_pb2, content_pb2_grpc

from tests.helpers import in_processes, make_content

pytestmark = pytest.mark.asyncio
PROCESSES = 3
STREAMS_PER_PROCESS = 2
ROWS = 1200
PER_MESSAGE = 400
START = datetime(2026, 1, 10, tzinfo=UTC)


def storm(port: int, token: str, seeds: list[int]) -> list[tuple[str, int, int, int, int]]:
    """Runs in a child process: one IngestContent stream per seed, all at once;
    (status, received, inserted, duplicates, error_count) for each."""

    async def run() -> list[tuple[str, int, int, int, int]]:
        metadata = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = content_pb2_grpc.ContentServiceStub(channel)

            def messages(seed: int) -> list[content_pb2.IngestContentRequest]:
                order = list(range(ROWS))
                random.Random(seed).shuffle(order)
                rows = [
                    make_content(
                        platform_id=f"storm-{i}",
                        # Two months: the rows span two partitions.
                        published_at=START + timedelta(hours=i),
                        title=f"from stream {seed}",
                    )
                    for i in order
                ]
                return [
                    content_pb2.IngestContentRequest(contents=rows[start : start + PER_MESSAGE])
                    for start in range(0, ROWS, PER_MESSAGE)
                ]

            async def stream(
                sent: list[content_pb2.IngestContentRequest],
            ) -> tuple[str, int, int, int, int]:
                try:
                    answer = await stub.IngestContent(iter(sent), metadata=metadata, timeout=120)
                except grpc.aio.AioRpcError as error:
                    return error.code().name, 0, 0, 0, 0
                return (
                    "OK",
                    answer.received,
                    answer.inserted,
                    answer.duplicates,
                    answer.error_count,
                )

            # Every stream's messages made first, so that the streams overlap.
            prepared = [messages(seed) for seed in seeds]
            return list(await asyncio.gather(*(stream(sent) for sent in prepared)))

    return asyncio.run(run())


async def test_streams_racing_on_the_same_rows_store_each_once(app, alice, db):
    seeds = [
        [1 + process * STREAMS_PER_PROCESS + s for s in range(STREAMS_PER_PROCESS)]
        for process in range(PROCESSES)
    ]
    results = await in_processes(storm, [(app.port, alice.token, s) for s in seeds])
    outcomes = [outcome for result in results for outcome in result]
    assert [(status, received, errors) for status, received, _, _, errors in outcomes] == [
        ("OK", ROWS, 0)
    ] * (PROCESSES * STREAMS_PER_PROCESS)
    assert all(inserted + duplicates == ROWS for _, _, inserted, duplicates, _ in outcomes)
    assert sum(inserted for _, _, inserted, _, _ in outcomes) == ROWS
    stored = await db.fetch("SELECT platform_id FROM content WHERE owner_id = $1", alice.user_id)
    assert sorted(row["platform_id"] for row in stored) == sorted(f"storm-{i}" for i in range(ROWS))

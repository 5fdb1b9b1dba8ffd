"""UpsertItems under a storm: several OS processes stream the same ids into one
collection at once, each in its own order and with its own values. Every
stream succeeds in full and each id is stored once, as one stream's whole item."""

import asyncio
import random

import grpc
import numpy as np
import pytest
from observatory.v1 import vector_pb2, vector_pb2_grpc

from tests.helpers import in_processes
from tests.vectors.helpers import create_collection

pytestmark = pytest.mark.asyncio
PROCESSES = 3
STREAMS_PER_PROCESS = 2
IDS = 1500
PER_MESSAGE = 500


def storm(port: int, token: str, name: str, seeds: list[int]) -> list[tuple[str, int, int, int]]:
    """Runs in a child process: one UpsertItems stream per seed, all at once;
    (status, received, upserted, error_count) for each."""

    async def run() -> list[tuple[str, int, int, int]]:
        metadata = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vector_pb2_grpc.VectorServiceStub(channel)

            async def stream(seed: int) -> tuple[str, int, int, int]:
                order = list(range(IDS))
                random.Random(seed).shuffle(order)
                items = [
                    vector_pb2.Item(id=f"k{i}", vector=[float(seed), float(i), 1.0, 0.5])
                    for i in order
                ]
                messages = [
                    vector_pb2.UpsertItemsRequest(
                        collection=name if start == 0 else "",
                        items=items[start : start + PER_MESSAGE],
                    )
                    for start in range(0, IDS, PER_MESSAGE)
                ]
                try:
                    answer = await stub.UpsertItems(iter(messages), metadata=metadata, timeout=120)
                except grpc.aio.AioRpcError as error:
                    return error.code().name, 0, 0, 0
                return "OK", answer.received, answer.upserted, answer.error_count

            return list(await asyncio.gather(*(stream(seed) for seed in seeds)))

    return asyncio.run(run())


async def test_streams_racing_on_the_same_ids_store_each_id_once(app, vector_stub, alice, db):
    name = await create_collection(vector_stub, alice, 4)
    seeds = [
        [1 + process * STREAMS_PER_PROCESS + s for s in range(STREAMS_PER_PROCESS)]
        for process in range(PROCESSES)
    ]
    results = await in_processes(storm, [(app.port, alice.token, name, s) for s in seeds])
    outcomes = [outcome for result in results for outcome in result]
    assert outcomes == [("OK", IDS, IDS, 0)] * (PROCESSES * STREAMS_PER_PROCESS)

    rows = await db.fetch(
        "SELECT i.id, i.embedding::text AS vector FROM vector_items i "
        "JOIN vector_collections c ON c.id = i.collection_id "
        "WHERE c.owner_id = $1 AND c.name = $2",
        alice.user_id,
        name,
    )
    assert sorted(row["id"] for row in rows) == sorted(f"k{i}" for i in range(IDS))
    every_seed = {seed for group in seeds for seed in group}
    for row in rows:
        seed, index, one, half = np.array(row["vector"].strip("[]").split(","), float)
        # Whichever stream wrote it last, the row is that stream's whole item.
        assert (seed in every_seed, index, one, half) == (True, int(row["id"][1:]), 1.0, 0.5)

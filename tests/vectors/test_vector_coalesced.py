"""Similarity searches are coalesced across callers: the searches of one
collection, SQL shape and settings that arrive while one is in flight run
together as one LATERAL statement. Under a storm of mixed callers (two owners
with collections of the same name, strangers, bad input) every call still gets
exactly the hits it gets alone, and only the calls that should fail do."""

import asyncio
import random

import grpc
import numpy as np
import pytest
import pytest_asyncio
from observatory.v1 import vector_pb2, vector_pb2_grpc

from server.vectors.repository import ItemSearch
from tests.helpers import error_details, new_caller
from tests.vectors.helpers import clustered, collection_name, create_collection, items, upsert

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("drop_vector_collections")]
COUNT = 600
DIMENSION = 12
CALLS = 240
SHAPES = [
    {},
    {"ef_search": 80},
    {"top_k": 3, "with_metadata": True},
    {"filter": {"doc": "d3"}},
    {"where": vector_pb2.Filter(must=[vector_pb2.Condition(key="rank", range={"lt": 4})])},
    {"exact": True},
    {"group_by": "doc", "group_size": 2, "top_k": 5},
]


@pytest.fixture(scope="module")
def owners():
    return new_caller(), new_caller()


@pytest.fixture(scope="module")
def name() -> str:
    return collection_name()


@pytest_asyncio.fixture(scope="module")
async def collections(channel, owners, name) -> dict:
    """The same collection name for both owners, each with data of its own."""
    stub = vector_pb2_grpc.VectorServiceStub(channel)
    samples = {}
    for seed, owner in enumerate(owners, start=1):
        await create_collection(stub, owner, DIMENSION, name=name)
        sample = clustered(COUNT, DIMENSION, seed=seed)
        batch = items(
            sample,
            metadata=[{"doc": f"d{i % 9}", "rank": float(i % 10)} for i in range(COUNT)],
            text=f"owner {seed}",
        )
        assert (await upsert(stub, owner, name, batch)).upserted == COUNT
        samples[owner] = sample
    return samples


def _key(hits) -> list[tuple]:
    return [
        (h.item.id, h.score, h.distance, h.item.SerializeToString(deterministic=True)) for h in hits
    ]


async def _similar(stub, caller, request: vector_pb2.SearchSimilarRequest):
    try:
        return _key([hit async for hit in stub.SearchSimilar(request, metadata=caller.metadata)])
    except grpc.aio.AioRpcError as error:
        assert error_details(error).info is not None
        return error.code().name


async def _batch_of_one(stub, caller, name: str, query: vector_pb2.SimilarQuery):
    request = vector_pb2.SearchSimilarBatchRequest(collection=name, searches=[query])
    try:
        response = await stub.SearchSimilarBatch(request, metadata=caller.metadata)
    except grpc.aio.AioRpcError as error:
        assert error_details(error).info is not None
        return error.code().name
    return _key(response.results[0].hits)


async def test_a_storm_of_mixed_searches_gets_what_each_gets_alone(
    vector_stub, owners, name, collections, monkeypatch
):
    rng = random.Random(5)
    stranger = new_caller()
    queries = clustered(20, DIMENSION, seed=9)
    plans = []  # (caller, via batch?, SimilarQuery)
    for _ in range(CALLS):
        caller = rng.choice([*owners, *owners, stranger])
        shape = rng.choice(SHAPES)
        vector = queries[rng.randrange(len(queries))].tolist()
        if rng.random() < 0.05:
            vector = vector[:-1]  # the wrong dimension: INVALID_ARGUMENT for this call only
        plans.append((caller, rng.random() < 0.5, vector_pb2.SimilarQuery(vector=vector, **shape)))

    async def run(caller, batched: bool, query: vector_pb2.SimilarQuery):
        if batched:
            return await _batch_of_one(vector_stub, caller, name, query)
        fields = {f.name: v for f, v in query.ListFields()}
        request = vector_pb2.SearchSimilarRequest(collection=name, **fields)
        return await _similar(vector_stub, caller, request)

    # Alone, one call at a time: what each call must get.
    expected = [await run(*plan) for plan in plans]
    assert expected.count("NOT_FOUND") == sum(plan[0] is stranger for plan in plans)
    assert "INVALID_ARGUMENT" in expected

    statements: list[int] = []
    shaped = ItemSearch.similar_shaped

    async def spy(self, sql, settings, searches):
        statements.append(len(searches))
        # A slower database: whatever this machine's speed, searches arrive
        # while others are in flight.
        await asyncio.sleep(0.005)
        return await shaped(self, sql, settings, searches)

    monkeypatch.setattr(ItemSearch, "similar_shaped", spy)

    # At most 6 of a caller's streamed searches at once (the per-caller stream
    # limit is 8); unary ones unbounded.
    streams = {caller: asyncio.Semaphore(6) for caller in [*owners, stranger]}

    async def storm(caller, batched: bool, query: vector_pb2.SimilarQuery):
        if batched:
            return await run(caller, batched, query)
        async with streams[caller]:
            return await run(caller, batched, query)

    got = await asyncio.gather(*(storm(*plan) for plan in plans))

    wrong = [i for i, (want, have) in enumerate(zip(expected, got, strict=True)) if want != have]
    assert not wrong, f"{len(wrong)} calls differ from their lone answers, e.g. call {wrong[0]}"
    # The two owners' hits differ (their data does): no call saw the other's.
    texts = {
        item_text
        for (caller, _, _), hits in zip(plans, got, strict=True)
        if isinstance(hits, list)
        for item_text in {vector_pb2.Item.FromString(h[3]).text for h in hits}
        if caller is owners[0]
    }
    assert texts == {"owner 1"}
    # A burst of one shape: more searches than the shape runs statements at
    # once, so they share statements (fewer statements than searches), and
    # each still gets its own hits.
    owner = owners[0]
    burst = [queries[i % len(queries)].tolist() for i in range(64)]
    alone = [
        await _batch_of_one(vector_stub, owner, name, vector_pb2.SimilarQuery(vector=v))
        for v in burst[:8]
    ]
    statements.clear()
    got = await asyncio.gather(
        *(_batch_of_one(vector_stub, owner, name, vector_pb2.SimilarQuery(vector=v)) for v in burst)
    )
    assert got[:8] == alone
    assert len(statements) < sum(statements) == 64
    assert max(statements) > 1


async def test_a_search_alone_is_answered_at_once(vector_stub, owners, name, collections):
    owner = owners[0]
    query = collections[owner][0].tolist()
    request = vector_pb2.SearchSimilarRequest(collection=name, vector=query, top_k=1)

    hits = await asyncio.wait_for(_similar(vector_stub, owner, request), 5)

    assert hits[0][0] == "item-0"


async def test_searches_of_a_deleted_collection_say_not_found(
    vector_stub, owners, name, collections, channel
):
    """A collection deleted while its spec is cached answers NOT_FOUND, also
    for the searches that were coalesced with others."""
    owner = new_caller()
    other = await create_collection(vector_stub, owner, DIMENSION)
    await upsert(vector_stub, owner, other, items(np.ones((3, DIMENSION), dtype=np.float32)))
    request = vector_pb2.SearchSimilarRequest(collection=other, vector=[1.0] * DIMENSION)
    assert len(await _similar(vector_stub, owner, request)) == 3  # the spec is cached now
    await vector_stub.DeleteCollection(
        vector_pb2.DeleteCollectionRequest(name=other), metadata=owner.metadata
    )

    got = await asyncio.gather(*(_similar(vector_stub, owner, request) for _ in range(8)))

    assert got == ["NOT_FOUND"] * 8

"""SearchSimilar, SearchText, HybridSearch and CheckDuplicate on a seeded,
clustered data set, checked against numpy's exact answers."""

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio
from observatory.v1 import common_pb2, vector_pb2

from server.db import create_engine
from server.uow import Database
from server.vectors import repository
from server.vectors.repository import (
    CollectionRepository,
    CollectionSpec,
    Hits,
    SimilarSearch,
    item_search,
)
from tests.conftest import make_settings
from tests.helpers import expect_rpc_error, new_caller
from tests.vectors.helpers import (
    clustered,
    create_collection,
    exact_top,
    index_of,
    items,
    search,
    upsert,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("drop_vector_collections")]
COUNT = 3000
DIMENSION = 48
GROUPS = 100  # metadata {"group": i % 100}: each group is 1% of the items


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    # Items and held-out queries from the same clusters.
    return clustered(COUNT + 40, DIMENSION)


@pytest.fixture(scope="module")
def data(sample) -> np.ndarray:
    return sample[:COUNT]


@pytest.fixture(scope="module")
def queries(sample) -> np.ndarray:
    return sample[COUNT:]


@pytest.fixture(scope="module")
def owner():
    return new_caller()


@pytest_asyncio.fixture(scope="module")
async def cosine(channel, owner, data) -> str:
    from observatory.v1 import vector_pb2_grpc

    stub = vector_pb2_grpc.VectorServiceStub(channel)
    name = await create_collection(stub, owner, DIMENSION, metric=vector_pb2.METRIC_COSINE)
    batch = items(
        data,
        metadata=[{"group": i % GROUPS, "even": i % 2 == 0} for i in range(COUNT)],
    )
    for i, item in enumerate(batch):
        item.text = f"word{i % 7} token{i % 13} shared"
        item.url = f"https://www.example.com/items/{i}/?utm_source=x"
    response = await upsert(stub, owner, name, batch)
    assert response.upserted == COUNT and not response.errors
    return name


def recall(found: list[int], truth: list[int]) -> float:
    return len(set(found) & set(truth)) / len(truth)


async def test_recall_at_10_is_high_at_the_default_ef_search(
    vector_stub, owner, cosine, data, queries
):
    recalls = []
    for query in queries:
        hits = await search(vector_stub, owner, collection=cosine, vector=query, top_k=10)
        assert len(hits) == 10
        recalls.append(recall([index_of(h) for h in hits], exact_top(data, query, 10)))
    assert np.mean(recalls) >= 0.95


async def test_exact_search_finds_exactly_the_true_neighbours(
    vector_stub, owner, cosine, data, queries
):
    for query in queries[:10]:
        hits = await search(
            vector_stub, owner, collection=cosine, vector=query, top_k=10, exact=True
        )
        assert [index_of(h) for h in hits] == exact_top(data, query, 10)


async def test_hits_come_best_first_with_cosine_similarity_as_score(
    vector_stub, owner, cosine, data, queries
):
    query = queries[0]
    hits = await search(vector_stub, owner, collection=cosine, vector=query, top_k=20, exact=True)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    best = data[index_of(hits[0])]
    similarity = float(best @ query / (np.linalg.norm(best) * np.linalg.norm(query)))
    assert hits[0].score == pytest.approx(similarity, abs=1e-4)
    assert hits[0].distance == pytest.approx(1 - similarity, abs=1e-4)


@pytest.mark.parametrize(
    ("metric", "name"),
    [(vector_pb2.METRIC_L2, "l2"), (vector_pb2.METRIC_INNER_PRODUCT, "inner_product")],
)
async def test_each_metric_orders_by_its_own_measure(
    vector_stub, owner, data, queries, metric, name
):
    subset = data[:500]
    collection = await create_collection(vector_stub, owner, DIMENSION, metric=metric)
    await upsert(vector_stub, owner, collection, items(subset))
    query = queries[1]
    for exact in (True, False):
        hits = await search(
            vector_stub, owner, collection=collection, vector=query, top_k=10, exact=exact
        )
        truth = exact_top(subset, query, 10, name)
        if exact:
            assert [index_of(h) for h in hits] == truth
        else:
            assert recall([index_of(h) for h in hits], truth) >= 0.9
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
    best = subset[index_of(hits[0])]
    if name == "l2":
        assert hits[0].score == pytest.approx(-float(np.linalg.norm(best - query)), abs=1e-3)
    else:
        assert hits[0].score == pytest.approx(float(best @ query), rel=1e-4)
        assert hits[0].distance == pytest.approx(-hits[0].score)


async def test_a_one_percent_filter_still_returns_top_k(vector_stub, owner, cosine, data, queries):
    query = queries[2]
    hits = await search(
        vector_stub,
        owner,
        collection=cosine,
        vector=query,
        top_k=10,
        filter={"group": 7},
        with_metadata=True,
    )
    members = np.arange(COUNT)[np.arange(COUNT) % GROUPS == 7]
    truth = [int(members[i]) for i in exact_top(data[members], query, 10)]
    assert [index_of(h) for h in hits] == truth
    assert all(h.item.metadata["group"] == 7 for h in hits)


async def test_a_filter_matching_fewer_than_top_k_returns_every_match_in_order(
    vector_stub, owner, cosine, data, queries
):
    # 30 items match: the index scan comes up short, the exact fallback scores all.
    query = queries[3]
    hits = await search(
        vector_stub, owner, collection=cosine, vector=query, top_k=50, filter={"group": 11}
    )
    members = np.arange(COUNT)[np.arange(COUNT) % GROUPS == 11]
    truth = [int(members[i]) for i in exact_top(data[members], query, len(members))]
    assert [index_of(h) for h in hits] == truth


@pytest_asyncio.fixture
async def units(database_url) -> AsyncIterator[Database]:
    """Units of a pool of their own: tests that change planner settings on a
    connection leave the server's pool alone."""
    database = Database(create_engine(make_settings(), database_url))
    yield database
    await database.dispose()


async def _similar(search, vector, top_k: int, filter_json: str | None, **fields):
    return await search.similar(
        SimilarSearch(vector=vector, top_k=top_k, filter_json=filter_json, **fields)
    )


async def _spec(units: Database, owner, name: str) -> CollectionSpec:
    async with units.read() as uow:
        spec = await CollectionRepository(uow).find(owner.user_id, name)
    assert spec is not None
    return spec


async def test_a_selective_filter_is_answered_by_the_index_scan_alone(
    units, owner, cosine, data, queries
):
    # Iterative index scans must find the 1% of matches on their own: the
    # planner may not take the metadata index here, and the exact fallback
    # never runs.
    spec = await _spec(units, owner, cosine)
    query = queries[3]
    async with units.read() as uow:
        await uow.use_settings({"enable_bitmapscan": "off", "enable_seqscan": "off"})
        search = await item_search(uow, spec)
        rows = await _similar(search, query, 10, '{"group": 11}', exact=False, hits=Hits())
        plan = await search.explain_similar(query, 10, '{"group": 11}', exact=False, analyze=True)
    members = np.arange(COUNT)[np.arange(COUNT) % GROUPS == 11]
    truth = [int(members[i]) for i in exact_top(data[members], query, 10)]
    found = [int(row["id"].removeprefix("item-")) for row in rows]
    index = spec.index_name.strip('"')
    assert f"Index Scan using {index}" in plan, plan
    assert "(never executed)" in plan, plan  # the exact fallback
    assert len(found) == 10 and all(i % GROUPS == 11 for i in found)
    assert recall(found, truth) >= 0.8
    assert [row["distance"] for row in rows] == sorted(row["distance"] for row in rows)


async def test_top_k_above_ef_search_is_still_filled(vector_stub, owner, cosine, queries):
    hits = await search(
        vector_stub, owner, collection=cosine, vector=queries[4], top_k=300, ef_search=20
    )
    assert len(hits) == 300
    assert len({h.item.id for h in hits}) == 300


async def test_score_threshold_cuts_the_tail(vector_stub, owner, cosine, queries):
    hits = await search(vector_stub, owner, collection=cosine, vector=queries[5], top_k=50)
    cut = hits[9].score
    kept = await search(
        vector_stub, owner, collection=cosine, vector=queries[5], top_k=50, score_threshold=cut
    )
    assert [h.item.id for h in kept] == [h.item.id for h in hits[:10]]


async def test_vectors_and_metadata_only_when_asked(vector_stub, owner, cosine, data, queries):
    plain = await search(vector_stub, owner, collection=cosine, vector=queries[6], top_k=3)
    assert not plain[0].item.vector and not plain[0].item.metadata.fields
    assert plain[0].item.text and plain[0].item.url
    full = await search(
        vector_stub,
        owner,
        collection=cosine,
        vector=queries[6],
        top_k=3,
        with_vector=True,
        with_metadata=True,
    )
    assert np.allclose(full[0].item.vector, data[index_of(full[0])])
    assert "group" in full[0].item.metadata


async def _plan(units: Database, spec: CollectionSpec, query, *, exact: bool, filter_json=None):
    async with units.read() as uow:
        search = await item_search(uow, spec)
        return await search.explain_similar(query, 10, filter_json, exact=exact)


async def test_searches_use_the_collections_own_hnsw_index(units, owner, cosine, queries):
    spec = await _spec(units, owner, cosine)
    async with units.read() as uow:
        await uow.driver.execute(f"ANALYZE {spec.partition}")  # as autovacuum would
    index = spec.index_name.strip('"')
    plan = await _plan(units, spec, queries[0], exact=False)
    assert f"Index Scan using {index}" in plan, plan
    filtered = await _plan(units, spec, queries[0], exact=False, filter_json='{"even": true}')
    assert f"Index Scan using {index}" in filtered, filtered
    exact = await _plan(units, spec, queries[0], exact=True)
    assert index not in exact, exact


async def _hnsw_settings(uow) -> dict[str, str]:
    return {
        name: await uow.driver.fetchval(f"SELECT current_setting('{name}', true)")
        for name in repository.index_search_settings()
    }


async def test_a_search_runs_with_its_own_hnsw_settings(app, owner, cosine, queries):
    spec = await _spec(app.units, owner, cosine)
    async with app.units.read() as uow:
        search = await item_search(uow, spec)
        await _similar(search, queries[0], 5, None, exact=False, hits=Hits(), ef_search=321)
        assert await _hnsw_settings(uow) == {
            "hnsw.ef_search": "321",
            "hnsw.iterative_scan": "relaxed_order",
            "hnsw.max_scan_tuples": str(repository.MAX_SCAN_TUPLES),
            "hnsw.scan_mem_multiplier": str(repository.SCAN_MEM_MULTIPLIER),
        }
        await _similar(search, queries[0], 5, '{"even": true}', exact=False, hits=Hits())
        assert (await _hnsw_settings(uow))["hnsw.ef_search"] == "40"
        await _similar(search, queries[0], 5, None, exact=False, hits=Hits(), ef_search=77)
        assert (await _hnsw_settings(uow))["hnsw.ef_search"] == "77"


async def test_a_search_after_one_with_another_ef_search_gets_its_own(
    app, vector_stub, owner, cosine, queries
):
    # Through the server: every pooled connection may carry another search's
    # ef_search; whichever a later search gets, it runs with its own.
    await asyncio.gather(
        *(
            search(vector_stub, owner, collection=cosine, vector=q, top_k=5, ef_search=300 + i)
            for i, q in enumerate(queries[:8])
        )
    )
    spec = await _spec(app.units, owner, cosine)
    for ef_search in (None, 55):
        async with asyncio.TaskGroup() as tasks:
            for _ in range(8):  # several units at once, so several connections
                tasks.create_task(_check_ef(app.units, spec, queries[0], ef_search))


async def _check_ef(units: Database, spec: CollectionSpec, query, ef_search: int | None) -> None:
    async with units.read() as uow:
        search = await item_search(uow, spec)
        await _similar(search, query, 5, None, exact=False, hits=Hits(), ef_search=ef_search)
        assert await uow.driver.fetchval("SHOW hnsw.ef_search") == str(ef_search or 40)
        await asyncio.sleep(0.01)


async def test_cancelling_the_stream_midway_frees_its_connection(
    app, vector_stub, owner, cosine, queries
):
    call = vector_stub.SearchSimilar(
        vector_pb2.SearchSimilarRequest(
            collection=cosine, vector=queries[7].tolist(), top_k=1000, with_vector=True
        ),
        metadata=owner.metadata,
    )
    received = 0
    async for _ in call:
        received += 1
        if received == 5:
            call.cancel()
            break
    assert received == 5
    for _ in range(100):
        if app.units.pool.checkedout() == 0:
            break
        await asyncio.sleep(0.05)
    assert app.units.pool.checkedout() == 0


async def test_search_validates_its_input(vector_stub, owner, cosine):
    cases = [
        ({"vector": [1.0] * (DIMENSION - 1)}, "vector"),
        ({"vector": [float("nan")] * DIMENSION}, "vector"),
        ({"vector": [1.0] * DIMENSION, "top_k": 1001}, "top_k"),
        ({"vector": [1.0] * DIMENSION, "ef_search": 0}, "ef_search"),
        ({"vector": [1.0] * DIMENSION, "score_threshold": float("nan")}, "score_threshold"),
        ({"vector": [1.0] * DIMENSION, "collection": "Bad-Name"}, "collection"),
    ]
    for fields, field in cases:
        request = vector_pb2.SearchSimilarRequest(collection=cosine)
        for key, value in fields.items():
            if key == "vector":
                request.vector.extend(value)
            else:
                setattr(request, key, value)
        details = await expect_rpc_error(
            _drain(vector_stub.SearchSimilar(request, metadata=owner.metadata))
        )
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.fields == [field]


async def _drain(call):
    return [hit async for hit in call]


async def test_float16_collections_of_3072_dimensions_index_and_search(vector_stub, owner):
    vectors = clustered(300, 3072, seed=5)
    name = await create_collection(vector_stub, owner, 3072, precision=vector_pb2.PRECISION_FLOAT16)
    response = await upsert(vector_stub, owner, name, items(vectors), per_message=100)
    assert response.upserted == 300 and not response.errors
    query = vectors[17] + 0.01
    hits = await search(
        vector_stub, owner, collection=name, vector=query, top_k=5, with_vector=True
    )
    assert index_of(hits[0]) == 17
    assert recall([index_of(h) for h in hits], exact_top(vectors, query, 5)) >= 0.8
    assert len(hits[0].item.vector) == 3072
    assert np.allclose(hits[0].item.vector, vectors[17], atol=1e-2)


async def test_search_text_finds_words_best_first(vector_stub, owner, cosine):
    call = vector_stub.SearchText(
        vector_pb2.SearchTextRequest(collection=cosine, query="word3 token5", top_k=20),
        metadata=owner.metadata,
    )
    hits = await _drain(call)
    assert len(hits) == 20
    assert all("word3" in h.item.text and "token5" in h.item.text for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


async def test_search_text_honours_the_filter(vector_stub, owner, cosine):
    call = vector_stub.SearchText(
        vector_pb2.SearchTextRequest(
            collection=cosine, query="shared", top_k=50, filter={"group": 4}
        ),
        metadata=owner.metadata,
    )
    hits = await _drain(call)
    assert len(hits) == COUNT // GROUPS
    assert all(index_of(h) % GROUPS == 4 for h in hits)


async def test_hybrid_search_fuses_both_rankings(vector_stub, owner, cosine, data):
    # The item nearest the vector and an item matching the text both rank.
    target = 123
    call = vector_stub.HybridSearch(
        vector_pb2.HybridSearchRequest(
            collection=cosine,
            vector=data[target].tolist(),
            query=f"word{target % 7} token{target % 13}",
            top_k=10,
        ),
        metadata=owner.metadata,
    )
    hits = await _drain(call)
    assert len(hits) == 10
    # First by vector and among the ~33 items with exactly that text: both add.
    assert index_of(hits[0]) == target
    assert 1 / 61 + 1 / 160 < hits[0].score <= 2 / 61
    assert hits[0].distance == pytest.approx(0, abs=1e-5)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


async def test_check_duplicate_matches_a_normalised_url_first(vector_stub, owner, cosine):
    response = await vector_stub.CheckDuplicate(
        vector_pb2.CheckDuplicateRequest(
            collection=cosine, url="http://EXAMPLE.com/items/42?utm_medium=y"
        ),
        metadata=owner.metadata,
    )
    assert response.is_duplicate
    assert response.kind == common_pb2.DUPLICATE_KIND_URL
    assert response.match_id == "item-42"


async def test_check_duplicate_finds_a_semantic_neighbour(vector_stub, owner, cosine, data):
    near = data[99] * 1.5 + 0.001
    response = await vector_stub.CheckDuplicate(
        vector_pb2.CheckDuplicateRequest(
            collection=cosine, vector=near.tolist(), url="https://elsewhere.org/x"
        ),
        metadata=owner.metadata,
    )
    assert response.is_duplicate
    assert response.kind == common_pb2.DUPLICATE_KIND_SEMANTIC
    assert response.match_id == "item-99"
    assert response.score > 0.99

    far = np.random.default_rng(3).normal(size=DIMENSION)
    response = await vector_stub.CheckDuplicate(
        vector_pb2.CheckDuplicateRequest(collection=cosine, vector=far.tolist(), threshold=0.99),
        metadata=owner.metadata,
    )
    assert not response.is_duplicate
    assert response.kind == common_pb2.DUPLICATE_KIND_UNSPECIFIED
    assert response.score < 0.99

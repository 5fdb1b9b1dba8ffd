"""SearchSimilar, SearchText, HybridSearch and CheckDuplicate on a seeded,
clustered data set, checked against numpy's exact answers."""

import asyncio

import grpc
import numpy as np
import pytest
import pytest_asyncio
from observatory.v1 import common_pb2, vector_pb2

from server.app import App
from server.vectors import service as vector_service
from server.vectors.repository import ItemSearch, lookup_collection, with_vector_codecs
from tests.helpers import expect_rpc_error, new_caller
from tests.vector_helpers import (
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


async def test_a_selective_filter_through_the_index_still_returns_top_k(
    vector_stub, owner, cosine, data, queries, monkeypatch
):
    # With the exact fallback off, iterative index scans must find the matches.
    monkeypatch.setattr(vector_service, "EXACT_FILTER_LIMIT", 1)
    query = queries[3]
    hits = await search(
        vector_stub, owner, collection=cosine, vector=query, top_k=10, filter={"group": 11}
    )
    members = np.arange(COUNT)[np.arange(COUNT) % GROUPS == 11]
    truth = [int(members[i]) for i in exact_top(data[members], query, 10)]
    assert len(hits) == 10
    assert recall([index_of(h) for h in hits], truth) >= 0.8
    assert all(index_of(h) % GROUPS == 11 for h in hits)


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


async def _plan(app: App, owner, name: str, query, *, exact: bool, filter_json=None) -> str:
    async with app.db.lookup() as driver:
        await with_vector_codecs(driver)
        spec = await lookup_collection(driver, owner.user_id, name)
        assert spec is not None
        return await ItemSearch(driver, spec).explain_similar(query, 10, filter_json, exact=exact)


async def test_searches_use_the_collections_own_hnsw_index(app, owner, cosine, queries):
    async with app.db.lookup() as driver:
        spec = await lookup_collection(driver, owner.user_id, cosine)
        assert spec is not None
        await driver.execute(f"ANALYZE {spec.partition}")  # as autovacuum would
    index = spec.index_name.strip('"')
    plan = await _plan(app, owner, cosine, queries[0], exact=False)
    assert f"Index Scan using {index}" in plan, plan
    filtered = await _plan(
        app, owner, cosine, queries[0], exact=False, filter_json='{"even": true}'
    )
    assert f"Index Scan using {index}" in filtered, filtered
    exact = await _plan(app, owner, cosine, queries[0], exact=True)
    assert index not in exact, exact


async def test_ef_search_does_not_leak_to_later_queries(app, vector_stub, owner, cosine, queries):
    await search(vector_stub, owner, collection=cosine, vector=queries[0], top_k=5, ef_search=321)
    for _ in range(app.db.engine.pool.size()):
        async with app.db.lookup() as driver:
            assert await driver.fetchval("SELECT current_setting('hnsw.ef_search', true)") in (
                None,
                "",
                "40",
            )
            assert await driver.fetchval("SELECT current_setting('hnsw.iterative_scan', true)") in (
                None,
                "",
                "off",
            )


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
        if app.db.engine.pool.checkedout() == 0:
            break
        await asyncio.sleep(0.05)
    assert app.db.engine.pool.checkedout() == 0


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


async def test_float32_above_the_hnsw_limit_is_refused(vector_stub, owner):
    details = await expect_rpc_error(create_collection(vector_stub, owner, 2001))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.fields == ["collection.dimension"]


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

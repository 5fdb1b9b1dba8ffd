"""`where` on SearchSimilar, ListItems and CountItems: every operator against
a brute-force answer in Python over the same metadata, before and after the
keys get metadata indexes (which must change nothing but the plan)."""

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from google.protobuf import struct_pb2
from observatory.v1 import vector_pb2

from server.vectors.filters import Params, parse
from server.vectors.repository import CollectionRepository, SimilarSearch, similar_statement
from tests.helpers import expect_rpc_error, new_caller
from tests.vectors.helpers import clustered, create_collection, items, search, upsert

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("drop_vector_collections")]
COUNT = 400
DIMENSION = 8
BASE = datetime(2026, 1, 1, tzinfo=UTC)
MISSING = object()


def _metadata(i: int) -> dict[str, Any]:
    """Varied metadata: numbers, strings, arrays, times, nesting, nulls, keys
    missing, and values of the wrong type."""
    m: dict[str, Any] = {
        "kind": ["news", "blog", "video", "forum"][(i // 3) % 4],
        "n": float(i % 50),
    }
    if i % 10 == 0:
        m["n"] = str(i % 50)  # a number written as a string
    if i % 3:
        m["tags"] = [f"t{i % 5}", f"u{i % 7}"]
    else:
        m["tags"] = f"t{i % 5}"  # a single value, not an array
    if i % 7 == 0:
        m["t"] = "not a time"
    elif i % 11 == 0:
        m["t"] = 12345.0
    else:
        moment = BASE + timedelta(hours=i)
        m["t"] = (
            moment.strftime("%Y-%m-%dT%H:%M:%SZ")
            if i % 2
            else moment.astimezone(__import__("datetime").timezone(timedelta(hours=2))).isoformat()
        )
    if i % 5 == 0:
        m["nested"] = {"x": float(i % 13), "label": f"l{i % 3}"}
    if i % 9 == 0:
        m["maybe"] = None
    elif i % 9 == 1:
        m["maybe"] = True
    if i % 4 == 0:
        del m["kind"]
    return m


METADATA = [_metadata(i) for i in range(COUNT)]


def _value_at(metadata: dict[str, Any], key: str) -> Any:
    value: Any = metadata
    for segment in key.split("."):
        if not isinstance(value, dict) or segment not in value:
            return MISSING
        value = value[segment]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (list, dict)):
        return False
    return type(a) is type(b) and a == b


def _equals(value: Any, wanted: Any) -> bool:
    if value is MISSING:
        return False
    if isinstance(value, list):
        return any(_same(element, wanted) for element in value)
    return _same(value, wanted)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else None


def _holds(metadata: dict[str, Any], condition: dict[str, Any]) -> bool:
    value = _value_at(metadata, condition["key"])
    if "equals" in condition:
        return _equals(value, condition["equals"])
    if "any_of" in condition:
        return any(_equals(value, wanted) for wanted in condition["any_of"])
    if "exists" in condition:
        return (value is not MISSING) == condition["exists"]
    if "range" in condition:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        r = condition["range"]
        return (
            ("gt" not in r or value > r["gt"])
            and ("gte" not in r or value >= r["gte"])
            and ("lt" not in r or value < r["lt"])
            and ("lte" not in r or value <= r["lte"])
        )
    moment = _time(value)
    if moment is None:
        return False
    after, before = condition["time_range"].get("after"), condition["time_range"].get("before")
    return (after is None or moment >= after) and (before is None or moment < before)


def _matches(metadata: dict[str, Any], where: dict[str, list[dict[str, Any]]]) -> bool:
    return (
        all(_holds(metadata, c) for c in where.get("must", []))
        and not any(_holds(metadata, c) for c in where.get("must_not", []))
        and (not where.get("should") or any(_holds(metadata, c) for c in where["should"]))
    )


def _condition(spec: dict[str, Any]) -> vector_pb2.Condition:
    condition = vector_pb2.Condition(key=spec["key"])
    if "equals" in spec:
        value = struct_pb2.Value()
        if spec["equals"] is None:
            value.null_value = struct_pb2.NULL_VALUE
        elif isinstance(spec["equals"], bool):
            value.bool_value = spec["equals"]
        elif isinstance(spec["equals"], float):
            value.number_value = spec["equals"]
        else:
            value.string_value = spec["equals"]
        condition.equals.CopyFrom(value)
    elif "any_of" in spec:
        condition.any_of.extend(spec["any_of"])
    elif "exists" in spec:
        condition.exists = spec["exists"]
    elif "range" in spec:
        condition.range.CopyFrom(vector_pb2.Range(**spec["range"]))
    else:
        window = spec["time_range"]
        if "after" in window:
            condition.time_range.after.FromDatetime(window["after"])
        if "before" in window:
            condition.time_range.before.FromDatetime(window["before"])
    return condition


def _filter(where: dict[str, list[dict[str, Any]]]) -> vector_pb2.Filter:
    return vector_pb2.Filter(
        **{name: [_condition(c) for c in conditions] for name, conditions in where.items()}
    )


WHERES = {
    "equals string": {"must": [{"key": "kind", "equals": "blog"}]},
    "equals number": {"must": [{"key": "n", "equals": 7.0}]},
    "equals bool": {"must": [{"key": "maybe", "equals": True}]},
    "equals null": {"must": [{"key": "maybe", "equals": None}]},
    "equals an array element": {"must": [{"key": "tags", "equals": "u3"}]},
    "equals nested": {"must": [{"key": "nested.label", "equals": "l1"}]},
    "any_of": {"must": [{"key": "tags", "any_of": ["t1", "u2", "zzz"]}]},
    "any_of mixed types": {"must": [{"key": "n", "any_of": [3.0, "3", "40"]}]},
    "range gt lte": {"must": [{"key": "n", "range": {"gt": 10.0, "lte": 20.0}}]},
    "range gte lt": {"must": [{"key": "nested.x", "range": {"gte": 2.0, "lt": 5.0}}]},
    "range open": {"must": [{"key": "n", "range": {}}]},
    "time_range": {
        "must": [
            {
                "key": "t",
                "time_range": {
                    "after": BASE + timedelta(hours=50),
                    "before": BASE + timedelta(hours=150),
                },
            }
        ]
    },
    "time_range after only": {
        "must": [{"key": "t", "time_range": {"after": BASE + timedelta(hours=300)}}]
    },
    "exists": {"must": [{"key": "nested", "exists": True}]},
    "not exists": {"must": [{"key": "kind", "exists": False}]},
    "must_not keeps the keyless": {"must_not": [{"key": "kind", "equals": "news"}]},
    "must_not wrong type": {"must_not": [{"key": "n", "range": {"lt": 25.0}}]},
    "should": {
        "should": [
            {"key": "kind", "equals": "video"},
            {"key": "nested.x", "range": {"gte": 10.0}},
        ]
    },
    "everything": {
        "must": [{"key": "n", "range": {"gte": 5.0}}],
        "should": [{"key": "tags", "equals": "t2"}, {"key": "maybe", "exists": True}],
        "must_not": [{"key": "t", "time_range": {"before": BASE + timedelta(hours=100)}}],
    },
}


@pytest.fixture(scope="module")
def owner():
    return new_caller()


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(COUNT, DIMENSION, seed=11)


@pytest_asyncio.fixture(scope="module")
async def collection(channel, owner, data) -> str:
    from observatory.v1 import vector_pb2_grpc

    stub = vector_pb2_grpc.VectorServiceStub(channel)
    name = await create_collection(stub, owner, DIMENSION)
    response = await upsert(stub, owner, name, items(data, metadata=METADATA))
    assert response.upserted == COUNT and not response.errors
    return name


def _expected(where) -> set[str]:
    return {f"item-{i}" for i in range(COUNT) if _matches(METADATA[i], where)}


async def _listed(stub, owner, name, where, page_size=37) -> list[str]:
    ids, token = [], ""
    while True:
        page = await stub.ListItems(
            vector_pb2.ListItemsRequest(
                collection=name, where=_filter(where), page_size=page_size, page_token=token
            ),
            metadata=owner.metadata,
        )
        ids.extend(item.id for item in page.items)
        token = page.next_page_token
        if not token:
            return ids


async def _check_every_operator(stub, owner, name, data) -> None:
    query = data[5]
    for label, where in WHERES.items():
        expected = _expected(where)
        assert expected, label  # every case selects something...
        assert len(expected) < COUNT, label  # ...and not everything
        count = await stub.CountItems(
            vector_pb2.CountItemsRequest(collection=name, where=_filter(where)),
            metadata=owner.metadata,
        )
        assert count.count == len(expected), label
        listed = await _listed(stub, owner, name, where)
        assert listed == sorted(expected), label
        for exact in (True, False):
            hits = await search(
                stub,
                owner,
                collection=name,
                vector=query,
                top_k=10,
                where=_filter(where),
                exact=exact,
            )
            members = sorted(expected, key=lambda item: int(item.removeprefix("item-")))
            rows = data[[int(m.removeprefix("item-")) for m in members]]
            similarity = rows @ query / (np.linalg.norm(rows, axis=1) * np.linalg.norm(query))
            truth = [members[i] for i in np.argsort(-similarity, kind="stable")[:10]]
            assert [h.item.id for h in hits] == truth, (label, exact)


async def test_every_operator_matches_the_brute_force_answer(vector_stub, owner, collection, data):
    await _check_every_operator(vector_stub, owner, collection, data)


async def test_metadata_indexes_change_the_plan_not_the_answer(
    vector_stub, owner, collection, data, app
):
    for key, kind in [
        ("kind", vector_pb2.METADATA_INDEX_TYPE_KEYWORD),
        ("tags", vector_pb2.METADATA_INDEX_TYPE_KEYWORD),
        ("maybe", vector_pb2.METADATA_INDEX_TYPE_KEYWORD),
        ("n", vector_pb2.METADATA_INDEX_TYPE_NUMBER),
        ("nested.x", vector_pb2.METADATA_INDEX_TYPE_NUMBER),
        ("t", vector_pb2.METADATA_INDEX_TYPE_TIME),
    ]:
        for _ in range(2):  # idempotent
            got = await vector_stub.CreateMetadataIndex(
                vector_pb2.CreateMetadataIndexRequest(collection=collection, key=key, type=kind),
                metadata=owner.metadata,
            )
    assert [(i.key, i.type) for i in got.metadata_indexes][-1] == (
        "t",
        vector_pb2.METADATA_INDEX_TYPE_TIME,
    )
    assert len(got.metadata_indexes) == 6 and got.item_count == COUNT
    await _check_every_operator(vector_stub, owner, collection, data)

    # The range condition reads the NUMBER index's own expression.
    async with app.units.read() as uow:
        spec = await CollectionRepository(uow).find(owner.user_id, collection)
        await uow.driver.execute(f"ANALYZE {spec.partition}")
        where = parse(_filter({"must": [{"key": "n", "range": {"gte": 7.0, "lt": 8.0}}]}))
        sql, params = similar_statement(
            spec, SimilarSearch(vector=data[0], top_k=5, where=where, exact=True)
        )
        await uow.use_settings({"enable_seqscan": "off"})
        try:
            plan = "\n".join(r[0] for r in await uow.driver.fetch("EXPLAIN " + sql, *params.values))
        finally:
            await uow.use_settings({"enable_seqscan": "on"})
    _, index = spec.metadata_index_names("n", "number")
    assert index in plan, plan


async def test_conditions_compile_to_bind_parameters_only():
    where = parse(
        _filter(
            {
                "must": [{"key": "a'); DROP TABLE x; --.b", "equals": "'; DROP TABLE y; --"}],
                "must_not": [{"key": "c", "range": {"gt": 1.0}}],
            }
        )
    )
    from server.vectors.filters import Compiler

    params = Params()
    sql = " AND ".join(Compiler("00", frozenset(), params).where(where))
    assert "DROP" not in sql and "'" not in sql
    assert "a'); DROP TABLE x; --" in params.values
    assert '"\'; DROP TABLE y; --"' in params.values


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        (vector_pb2.Condition(key="a"), "where.must[0]"),
        (vector_pb2.Condition(key="", exists=True), "where.must[0].key"),
        (vector_pb2.Condition(key="a..b", exists=True), "where.must[0].key"),
        (vector_pb2.Condition(key="k" * 256, exists=True), "where.must[0].key"),
        (
            vector_pb2.Condition(key="a", range=vector_pb2.Range(gt=math.nan)),
            "where.must[0].range.gt",
        ),
        (
            vector_pb2.Condition(key="a", equals=struct_pb2.Value(number_value=math.inf)),
            "where.must[0].equals",
        ),
        (
            vector_pb2.Condition(
                key="a",
                equals=struct_pb2.Value(struct_value=struct_pb2.Struct()),
            ),
            "where.must[0].equals",
        ),
    ],
)
async def test_bad_conditions_are_invalid(vector_stub, owner, collection, condition, field):
    details = await expect_rpc_error(
        vector_stub.CountItems(
            vector_pb2.CountItemsRequest(
                collection=collection, where=vector_pb2.Filter(must=[condition])
            ),
            metadata=owner.metadata,
        )
    )
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.fields == [field]


async def test_too_many_conditions_or_values_are_invalid(vector_stub, owner, collection):
    many = vector_pb2.Filter(must=[vector_pb2.Condition(key="a", exists=True)] * 65)
    values = vector_pb2.Condition(key="a")
    values.any_of.extend([str(i) for i in range(101)])
    for where, field in (
        (many, "where.must"),
        (vector_pb2.Filter(should=[values]), "where.should[0].any_of"),
    ):
        details = await expect_rpc_error(
            vector_stub.CountItems(
                vector_pb2.CountItemsRequest(collection=collection, where=where),
                metadata=owner.metadata,
            )
        )
        assert details.fields == [field]


async def test_search_text_and_hybrid_take_where(vector_stub, owner, collection, data):
    where = {"must": [{"key": "kind", "equals": "video"}]}
    expected = _expected(where)
    call = vector_stub.HybridSearch(
        vector_pb2.HybridSearchRequest(
            collection=collection,
            vector=data[0].tolist(),
            query="x",
            top_k=50,
            where=_filter(where),
        ),
        metadata=owner.metadata,
    )
    hits = [hit async for hit in call]
    assert hits and {h.item.id for h in hits} <= expected

"""How a similarity search is put together: its hnsw settings and its SQL
(a made-up collection: no database needed)."""

import uuid
from datetime import UTC, datetime

from server.vectors.repository import (
    MAX_SCAN_TUPLES,
    CollectionSpec,
    Hits,
    index_search_settings,
    similar_sql,
)

SPEC = CollectionSpec(
    id=uuid.UUID("01234567-89ab-7def-8123-456789abcdef"),
    owner_id=uuid.uuid4(),
    name="plan",
    dimension=8,
    metric="cosine",
    precision="float32",
    hnsw_m=16,
    hnsw_ef_construction=64,
    create_time=datetime.now(UTC),
)


def test_every_index_search_states_all_hnsw_settings_it_depends_on():
    settings = index_search_settings(100)
    assert settings == {
        "hnsw.ef_search": "100",
        "hnsw.iterative_scan": "relaxed_order",
        "hnsw.max_scan_tuples": str(MAX_SCAN_TUPLES),
        "hnsw.scan_mem_multiplier": settings["hnsw.scan_mem_multiplier"],
    }
    # Only ef_search varies between searches, so a connection keeps the rest.
    default = index_search_settings()
    assert default["hnsw.ef_search"] == "40"
    assert {k: v for k, v in default.items() if k != "hnsw.ef_search"} == {
        k: v for k, v in settings.items() if k != "hnsw.ef_search"
    }


def test_no_search_sql_begins_commits_or_sets_anything():
    for exact in (True, False):
        for filtered in (True, False):
            sql = similar_sql(SPEC, exact=exact, filtered=filtered, hits=Hits()).upper()
            assert "BEGIN" not in sql and "COMMIT" not in sql and "SET " not in sql


def test_an_unfiltered_index_search_is_one_index_scan_sorted_again():
    sql = similar_sql(SPEC, exact=False, filtered=False, hits=Hits())
    assert SPEC.indexed_expression in sql
    assert "$3" not in sql and "UNION" not in sql
    assert sql.endswith("ORDER BY distance, id")


def test_a_filtered_index_search_falls_back_to_exact_only_when_short():
    sql = similar_sql(SPEC, exact=False, filtered=True, hits=Hits())
    index_part, exact_part = sql.split("UNION ALL")
    assert SPEC.indexed_expression in index_part and "metadata @> $3" in index_part
    # The fallback scores the bare column (no index) and runs only when the
    # index scan returned fewer than the limit.
    assert SPEC.indexed_expression not in exact_part
    assert f"{SPEC.column} <=> $1" in exact_part
    assert "(SELECT count(*) FROM hits_index) < $2" in exact_part
    assert "count(" not in sql.replace("(SELECT count(*) FROM hits_index)", "")


def test_an_exact_search_never_touches_the_index():
    sql = similar_sql(SPEC, exact=True, filtered=True, hits=Hits())
    assert SPEC.indexed_expression not in sql and "UNION" not in sql

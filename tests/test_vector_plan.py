"""How SearchSimilar chooses between an exact scan and an iterative index scan
(a fake collection: no database needed)."""

import pytest

from server.vectors import service
from server.vectors.repository import begin_search_sql

pytestmark = pytest.mark.asyncio


class FakeSearch:
    def __init__(self, matches: int, total: int) -> None:
        self.matches = matches
        self.total = total

    async def count_matching(self, filter_json: str, cap: int) -> tuple[int, int]:
        return min(self.matches, cap), self.total


async def test_no_filter_walks_the_index_with_default_bounds():
    plan = await service._plan(FakeSearch(0, 10**6), None, 10, exact=False)
    assert not plan.exact and plan.max_scan_tuples is None


async def test_exact_is_honoured_whatever_the_filter():
    plan = await service._plan(FakeSearch(10**6, 10**6), '{"a": 1}', 10, exact=True)
    assert plan.exact


async def test_a_filter_matching_few_items_scores_them_all():
    limit = service.EXACT_FILTER_LIMIT
    plan = await service._plan(FakeSearch(limit - 1, 10**7), '{"a": 1}', 1000, exact=False)
    assert plan.exact


async def test_a_broader_filter_lets_the_index_scan_go_far_enough_for_top_k():
    # The count stops at 10,000 matches of a million: at worst 1 visited tuple
    # in 100 is a hit, so 2 x 1000 x 100 tuples find top_k twice over.
    search = FakeSearch(20_000, 1_000_000)
    plan = await service._plan(search, '{"a": 1}', 1000, exact=False)
    assert not plan.exact
    assert plan.max_scan_tuples == 200_000
    huge = await service._plan(FakeSearch(20_000, 10**9), '{"a": 1}', 1000, exact=False)
    assert huge.max_scan_tuples == service.MAX_SCAN_TUPLES


async def test_settings_are_local_to_the_search_transaction():
    sql = begin_search_sql(index=True, ef_search=100, max_scan_tuples=50_000)
    assert sql.startswith("BEGIN READ ONLY; ")
    statements = sql.split("; ")[1:]
    assert statements and all(s.startswith("SET LOCAL hnsw.") for s in statements)
    assert "SET LOCAL hnsw.ef_search = 100" in statements
    assert begin_search_sql(index=False, ef_search=100) == "BEGIN READ ONLY"

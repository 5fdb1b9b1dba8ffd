"""GetContentStats on a small known set."""

import asyncio
from datetime import UTC, datetime

import grpc
import pytest
import pytest_asyncio
from observatory.v1 import content_pb2

from tests.actors.helpers import create_actor
from tests.helpers import expect_rpc_error, make_content

pytestmark = pytest.mark.asyncio

# Stands for alice's actor (author_id must name one of the owner's actors).
ACTOR = "alice's actor"


def at(day: int, month: int = 3) -> datetime:
    return datetime(2026, month, day, 12, tzinfo=UTC)


# (published, arena, likes, shares, comments, terms, author_id, author_platform_id)
ROWS = [
    (at(2), "news", 1, None, None, ["climate", "energy"], ACTOR, "acc1"),  # Monday
    (at(2), "news", 2, 3, None, ["climate"], ACTOR, "acc2"),
    (at(3), "", None, None, None, [], "", "acc9"),
    (at(9), "social", 10, 10, 10, ["energy"], "", "acc9"),  # the next Monday
    (at(20, 4), "social", 100, 0, 0, ["climate"], "", ""),
]
ENGAGEMENT = sorted([1, 5, 0, 30, 100])


@pytest_asyncio.fixture
async def known_set(content_stub, actor_stub, alice, bob):
    """Alice's rows (and one of bob's); returns the ID of alice's actor."""
    actor_id = (await create_actor(actor_stub, alice)).id
    for published, arena, likes, shares, comments, terms, author, account in ROWS:
        author = actor_id if author == ACTOR else author
        counts = {
            name: value
            for name, value in (
                ("likes_count", likes),
                ("shares_count", shares),
                ("comments_count", comments),
            )
            if value is not None
        }
        await content_stub.CreateContent(
            content_pb2.CreateContentRequest(
                content=make_content(
                    published_at=published,
                    arena=arena,
                    search_terms_matched=terms,
                    author_id=author,
                    author_platform_id=account,
                    author_display_name=f"name of {account}" if account else "",
                    **counts,
                )
            ),
            metadata=alice.metadata,
        )
    await content_stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content(published_at=at(2), likes_count=9)),
        metadata=bob.metadata,
    )
    return actor_id


async def stats(stub, caller, **request) -> content_pb2.GetContentStatsResponse:
    return await stub.GetContentStats(
        content_pb2.GetContentStatsRequest(**request), metadata=caller.metadata
    )


def volume(response) -> list[tuple[datetime, int, dict[str, int]]]:
    return [
        (bucket.period_start.ToDatetime(tzinfo=UTC), bucket.count, dict(bucket.by_arena))
        for bucket in response.volume
    ]


def midnight(day: int, month: int = 3) -> datetime:
    return datetime(2026, month, day, tzinfo=UTC)


async def test_volume_by_day_week_and_month(content_stub, alice, known_set):
    by_day = await stats(content_stub, alice, granularity="day")
    assert volume(by_day) == [
        (midnight(2), 2, {"news": 2}),
        (midnight(3), 1, {"": 1}),
        (midnight(9), 1, {"social": 1}),
        (midnight(20, 4), 1, {"social": 1}),
    ]
    by_week = await stats(content_stub, alice, granularity="week")
    assert volume(by_week) == [
        (midnight(2), 3, {"news": 2, "": 1}),
        (midnight(9), 1, {"social": 1}),
        (midnight(20, 4), 1, {"social": 1}),
    ]
    by_month = await stats(content_stub, alice, granularity="month")
    assert volume(by_month) == [
        (midnight(1), 4, {"news": 2, "": 1, "social": 1}),
        (midnight(1, 4), 1, {"social": 1}),
    ]
    assert by_day.total == 5


async def test_engagement_median_p95_and_mean(content_stub, alice, known_set):
    engagement = (await stats(content_stub, alice)).engagement
    assert engagement.median == 5
    # Continuous percentile: 95% of the way from the 1st to the 5th value.
    position = 0.95 * (len(ENGAGEMENT) - 1)
    low = ENGAGEMENT[int(position)]
    expected = low + (position - int(position)) * (ENGAGEMENT[int(position) + 1] - low)
    assert engagement.p95 == pytest.approx(expected)
    assert engagement.mean == pytest.approx(sum(ENGAGEMENT) / len(ENGAGEMENT))


async def test_top_actors_and_terms(content_stub, alice, known_set):
    response = await stats(content_stub, alice, top_n=5)
    actors = [(a.author_id, a.platform, a.author_platform_id, a.count) for a in response.top_actors]
    assert actors == [(known_set, "", "", 2), ("", "twitter", "acc9", 2)]
    assert response.top_actors[1].author_display_name == "name of acc9"
    assert [(t.term, t.count) for t in response.top_terms] == [("climate", 3), ("energy", 2)]
    top_one = await stats(content_stub, alice, top_n=1)
    assert [t.term for t in top_one.top_terms] == ["climate"]


async def test_the_filter_narrows_every_figure(content_stub, alice, known_set):
    response = await stats(content_stub, alice, filter=content_pb2.ContentFilter(arenas=["social"]))
    assert response.total == 2
    assert [(t.term, t.count) for t in response.top_terms] == [("climate", 1), ("energy", 1)]
    assert response.engagement.mean == pytest.approx(65)


async def test_no_rows_gives_zeros(content_stub, alice):
    response = await stats(content_stub, alice)
    assert response.total == 0 and not response.volume and not response.top_terms
    assert response.engagement == content_pb2.Engagement()


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [({"granularity": "hour"}, "granularity"), ({"top_n": 101}, "top_n"), ({"top_n": -1}, "top_n")],
)
async def test_bad_requests_name_the_field(content_stub, alice, request_fields, field):
    error = await expect_rpc_error(stats(content_stub, alice, **request_fields))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == [field]


async def test_every_figure_comes_from_one_snapshot_while_rows_arrive(content_stub, alice, db):
    """Rows land between the statements of GetContentStats: every response still
    counts the same rows in its total, its volume series, its top term and its
    top actor (each row has the one term and the one author account)."""
    stop = asyncio.Event()
    inserted = 0

    async def storm() -> None:
        nonlocal inserted
        while not stop.is_set():
            await db.execute(
                "INSERT INTO content (owner_id, platform, platform_id, published_at, title, "
                "search_terms_matched, author_platform_id, likes_count) "
                "VALUES ($1, 'storm', $2, $3, 'a storm', '{storm}', 'acc', 1)",
                alice.user_id,
                str(inserted),
                at(1 + inserted % 28),
            )
            inserted += 1

    storming = asyncio.create_task(storm())
    totals = []
    try:
        for _ in range(40):
            response = await stats(content_stub, alice)
            total = response.total
            assert sum(bucket.count for bucket in response.volume) == total
            assert sum(sum(bucket.by_arena.values()) for bucket in response.volume) == total
            top_terms = [(t.term, t.count) for t in response.top_terms]
            top_actors = [(a.author_platform_id, a.count) for a in response.top_actors]
            assert top_terms == ([("storm", total)] if total else [])
            assert top_actors == ([("acc", total)] if total else [])
            totals.append(total)
    finally:
        stop.set()
        await storming
    assert len(set(totals)) > 1, "no row arrived while the statistics were computed"
    final = await stats(content_stub, alice)
    assert final.total == inserted

"""ListContent: order, every filter field, page sizes, page tokens, and keyset
paging that stays exact while rows are being inserted."""

import asyncio
import itertools
import random
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from observatory.v1 import content_pb2

from tests.actors.helpers import create_actor
from tests.helpers import expect_rpc_error, make_content, timestamp

pytestmark = pytest.mark.asyncio

INVALID = grpc.StatusCode.INVALID_ARGUMENT
BASE = datetime(2025, 3, 10, 8, 0, tzinfo=UTC)


async def create(stub, caller, **fields):
    request = content_pb2.CreateContentRequest(content=make_content(**fields))
    return await stub.CreateContent(request, metadata=caller.metadata)


async def ingest(stub, caller, contents, batch=500):
    """Stores `contents` for `caller` through IngestContent, `batch` items per message."""
    requests = [
        content_pb2.IngestContentRequest(contents=contents[i : i + batch])
        for i in range(0, len(contents), batch)
    ]
    response = await stub.IngestContent(iter(requests), metadata=caller.metadata)
    assert response.inserted == len(contents), response
    return response


async def list_page(stub, caller, page_size=0, page_token="", **filter_fields):
    request = content_pb2.ListContentRequest(
        filter=content_pb2.ContentFilter(**filter_fields),
        page_size=page_size,
        page_token=page_token,
    )
    return await stub.ListContent(request, metadata=caller.metadata)


async def list_ids(stub, caller, **filter_fields):
    """IDs of every item the filter matches, in listing order, across all pages."""
    ids, token = [], ""
    while True:
        page = await list_page(stub, caller, page_size=1000, page_token=token, **filter_fields)
        ids.extend(item.id for item in page.contents)
        token = page.next_page_token
        if not token:
            return ids


def assert_listing_order(items):
    """Newest published_at first; items published at the same time ordered by ID,
    the same way throughout."""
    keys = [(item.published_at.ToDatetime(), uuid.UUID(item.id)) for item in items]
    published = [key[0] for key in keys]
    assert published == sorted(published, reverse=True)
    tie_directions = {
        later[1] > earlier[1]
        for earlier, later in itertools.pairwise(keys)
        if earlier[0] == later[0]
    }
    assert len(tie_directions) <= 1, "items published at the same time are not ordered by ID"


class TestListContent:
    async def test_lists_newest_published_first(self, content_stub, alice):
        created = [
            await create(content_stub, alice, published_at=BASE + timedelta(hours=hours))
            for hours in (5, 1, 9, 3)
        ]

        page = await list_page(content_stub, alice)

        expected = sorted(created, key=lambda item: item.published_at.ToDatetime(), reverse=True)
        assert [item.id for item in page.contents] == [item.id for item in expected]
        assert not page.next_page_token

    async def test_orders_items_published_at_the_same_time_by_id(self, content_stub, alice):
        for _ in range(6):
            await create(content_stub, alice, published_at=BASE)

        page = await list_page(content_stub, alice)

        assert len(page.contents) == 6
        assert_listing_order(page.contents)

    async def test_returns_full_items(self, content_stub, alice):
        created = await create(
            content_stub, alice, arena="news", likes_count=3, raw_metadata={"k": "v"}
        )

        page = await list_page(content_stub, alice)

        assert list(page.contents) == [created]

    async def test_pages_walk_every_item_once_in_order(self, content_stub, alice):
        created = [
            await create(content_stub, alice, published_at=BASE + timedelta(minutes=i % 4))
            for i in range(11)
        ]
        seen, token, pages = [], "", 0
        while True:
            page = await list_page(content_stub, alice, page_size=3, page_token=token)
            assert len(page.contents) <= 3
            seen.extend(page.contents)
            pages += 1
            token = page.next_page_token
            if not token:
                break

        assert pages == 4
        assert sorted(item.id for item in seen) == sorted(item.id for item in created)
        assert_listing_order(seen)

    async def test_last_page_has_no_next_token(self, content_stub, alice):
        for _ in range(2):
            await create(content_stub, alice)

        page = await list_page(content_stub, alice, page_size=2)

        assert len(page.contents) == 2
        assert page.next_page_token == ""

    async def test_lists_nothing_for_a_caller_without_items(self, content_stub, alice):
        page = await list_page(content_stub, alice)

        assert list(page.contents) == []
        assert page.next_page_token == ""

    async def test_hides_deleted_items(self, content_stub, alice):
        kept = await create(content_stub, alice)
        gone = await create(content_stub, alice)
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=gone.id), metadata=alice.metadata
        )

        assert await list_ids(content_stub, alice) == [kept.id]

    async def test_show_deleted_includes_deleted_items(self, content_stub, alice):
        kept = await create(content_stub, alice, published_at=BASE)
        gone = await create(content_stub, alice, published_at=BASE + timedelta(hours=1))
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=gone.id), metadata=alice.metadata
        )

        page = await list_page(content_stub, alice, show_deleted=True)

        assert [item.id for item in page.contents] == [gone.id, kept.id]
        assert page.contents[0].HasField("delete_time")

    async def test_undeleted_items_are_listed_again(self, content_stub, alice):
        item = await create(content_stub, alice)
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=item.id), metadata=alice.metadata
        )
        await content_stub.UndeleteContent(
            content_pb2.UndeleteContentRequest(id=item.id), metadata=alice.metadata
        )

        assert await list_ids(content_stub, alice) == [item.id]


class TestListContentFilter:
    async def test_platforms_match_any_listed_platform(self, content_stub, alice):
        twitter = await create(content_stub, alice, platform="twitter")
        reddit = await create(content_stub, alice, platform="reddit")
        await create(content_stub, alice, platform="rss")

        ids = await list_ids(content_stub, alice, platforms=["twitter", "reddit"])

        assert sorted(ids) == sorted([twitter.id, reddit.id])

    async def test_arenas_match_any_listed_arena(self, content_stub, alice):
        news = await create(content_stub, alice, arena="news")
        await create(content_stub, alice, arena="sports")
        await create(content_stub, alice)

        assert await list_ids(content_stub, alice, arenas=["news"]) == [news.id]

    async def test_languages_match_any_listed_language(self, content_stub, alice):
        danish = await create(content_stub, alice, language="da")
        german = await create(content_stub, alice, language="de")
        await create(content_stub, alice, language="en")

        ids = await list_ids(content_stub, alice, languages=["da", "de"])

        assert sorted(ids) == sorted([danish.id, german.id])

    async def test_published_after_is_inclusive(self, content_stub, alice):
        early = await create(content_stub, alice, published_at=BASE - timedelta(seconds=1))
        at = await create(content_stub, alice, published_at=BASE)
        late = await create(content_stub, alice, published_at=BASE + timedelta(days=1))

        ids = await list_ids(content_stub, alice, published_after=timestamp(BASE))

        assert ids == [late.id, at.id]
        assert early.id not in ids

    async def test_published_before_is_exclusive(self, content_stub, alice):
        early = await create(content_stub, alice, published_at=BASE - timedelta(seconds=1))
        await create(content_stub, alice, published_at=BASE)
        await create(content_stub, alice, published_at=BASE + timedelta(days=1))

        ids = await list_ids(content_stub, alice, published_before=timestamp(BASE))

        assert ids == [early.id]

    async def test_published_window_is_half_open(self, content_stub, alice):
        items = {
            hours: await create(content_stub, alice, published_at=BASE + timedelta(hours=hours))
            for hours in range(5)
        }

        ids = await list_ids(
            content_stub,
            alice,
            published_after=timestamp(BASE + timedelta(hours=1)),
            published_before=timestamp(BASE + timedelta(hours=3)),
        )

        assert ids == [items[2].id, items[1].id]

    async def test_rejects_published_after_not_before_published_before(self, content_stub, alice):
        error = await expect_rpc_error(
            list_page(
                content_stub,
                alice,
                published_after=timestamp(BASE),
                published_before=timestamp(BASE - timedelta(days=1)),
            )
        )

        assert error.code == INVALID
        assert len(error.fields) == 1
        assert error.fields[0] in {"filter.published_after", "filter.published_before"}

    async def test_author_ids_match_any_listed_author(self, content_stub, actor_stub, alice):
        author_a, author_b, author_c = [
            (await create_actor(actor_stub, alice, name)).id for name in "abc"
        ]
        by_a = await create(content_stub, alice, author_id=author_a)
        by_b = await create(content_stub, alice, author_id=author_b)
        await create(content_stub, alice, author_id=author_c)
        await create(content_stub, alice)

        ids = await list_ids(content_stub, alice, author_ids=[author_a, author_b])

        assert sorted(ids) == sorted([by_a.id, by_b.id])

    async def test_rejects_a_malformed_author_id(self, content_stub, alice):
        error = await expect_rpc_error(
            list_page(content_stub, alice, author_ids=[str(uuid.uuid4()), "not-a-uuid"])
        )

        assert error.code == INVALID
        assert error.reason == "INVALID_FIELD"
        assert error.fields == ["filter.author_ids[1]"]

    @pytest.mark.parametrize(
        ("filter_fields", "field"),
        [
            ({"platforms": ["twitter", "a\x00b"]}, "filter.platforms[1]"),
            ({"arenas": ["\x00"]}, "filter.arenas[0]"),
            ({"languages": ["en\x00"]}, "filter.languages[0]"),
            ({"collection_run_id": "run\x00"}, "filter.collection_run_id"),
            ({"search_term": "\x00"}, "filter.search_term"),
            ({"query": "rain\x00"}, "filter.query"),
        ],
        ids=["platforms", "arenas", "languages", "collection_run_id", "search_term", "query"],
    )
    async def test_rejects_nul_characters_naming_the_field(
        self, content_stub, alice, filter_fields, field
    ):
        error = await expect_rpc_error(list_page(content_stub, alice, **filter_fields))

        assert error.code == INVALID
        assert error.fields == [field]

    async def test_rejects_an_out_of_range_timestamp(self, content_stub, alice):
        too_late = timestamp(BASE)
        too_late.seconds = 10**12

        error = await expect_rpc_error(list_page(content_stub, alice, published_after=too_late))

        assert error.code == INVALID
        assert error.fields == ["filter.published_after"]

    async def test_collection_run_id_matches_that_run(self, content_stub, alice):
        in_run = await create(content_stub, alice, collection_run_id="run-a")
        await create(content_stub, alice, collection_run_id="run-b")
        await create(content_stub, alice)

        assert await list_ids(content_stub, alice, collection_run_id="run-a") == [in_run.id]

    async def test_search_term_matches_search_terms_matched(self, content_stub, alice):
        both = await create(content_stub, alice, search_terms_matched=["climate", "flood"])
        flood = await create(content_stub, alice, search_terms_matched=["flood"])
        await create(content_stub, alice, search_terms_matched=["climate"])
        await create(content_stub, alice)

        ids = await list_ids(content_stub, alice, search_term="flood")

        assert sorted(ids) == sorted([both.id, flood.id])

    async def test_query_matches_title_or_text(self, content_stub, alice):
        in_title = await create(content_stub, alice, title="Glacier melting", text_content="ice")
        in_text = await create(content_stub, alice, title="News", text_content="the glacier shrank")
        await create(content_stub, alice, title="Desert", text_content="sand dunes")

        ids = await list_ids(content_stub, alice, query="glacier")

        assert sorted(ids) == sorted([in_title.id, in_text.id])

    async def test_different_filter_fields_must_all_match(self, content_stub, alice):
        match = await create(content_stub, alice, platform="reddit", language="da", arena="news")
        await create(content_stub, alice, platform="reddit", language="en", arena="news")
        await create(content_stub, alice, platform="twitter", language="da", arena="news")
        await create(content_stub, alice, platform="reddit", language="da", arena="sports")

        ids = await list_ids(
            content_stub, alice, platforms=["reddit"], languages=["da"], arenas=["news"]
        )

        assert ids == [match.id]


class TestListContentPaging:
    async def test_page_size_zero_means_fifty(self, content_stub, alice):
        await ingest(content_stub, alice, [make_content() for _ in range(55)])

        page = await list_page(content_stub, alice, page_size=0)

        assert len(page.contents) == 50
        assert page.next_page_token

    async def test_page_size_above_the_maximum_is_clamped_to_1000(self, content_stub, alice):
        await ingest(content_stub, alice, [make_content() for _ in range(1005)])

        first = await list_page(content_stub, alice, page_size=5000)
        rest = await list_page(
            content_stub, alice, page_size=5000, page_token=first.next_page_token
        )

        assert len(first.contents) == 1000
        assert len(rest.contents) == 5
        assert not rest.next_page_token

    async def test_rejects_a_negative_page_size(self, content_stub, alice):
        error = await expect_rpc_error(list_page(content_stub, alice, page_size=-1))

        assert error.code == INVALID
        assert error.fields == ["page_size"]

    async def test_rejects_a_token_reused_with_another_filter(self, content_stub, alice):
        for _ in range(3):
            await create(content_stub, alice, platform="twitter")
        first = await list_page(content_stub, alice, page_size=1, platforms=["twitter"])

        error = await expect_rpc_error(
            list_page(
                content_stub,
                alice,
                page_size=1,
                page_token=first.next_page_token,
                platforms=["reddit"],
            )
        )

        assert error.code == INVALID
        assert error.fields == ["page_token"]

    async def test_a_token_may_continue_with_another_page_size(self, content_stub, alice):
        created = [await create(content_stub, alice) for _ in range(5)]
        first = await list_page(content_stub, alice, page_size=1)

        rest = await list_page(content_stub, alice, page_size=10, page_token=first.next_page_token)

        assert len(rest.contents) == 4
        seen = {first.contents[0].id, *(item.id for item in rest.contents)}
        assert seen == {item.id for item in created}

    @pytest.mark.parametrize(
        "token",
        ["garbage", "!!!not-base64!!!", "e30", "eyJxIjoxfQ", "bnVsbA", "W10"],
        ids=["word", "not-base64", "empty-object", "no-key", "null", "empty-list"],
    )
    async def test_rejects_a_token_it_did_not_issue(self, content_stub, alice, token):
        error = await expect_rpc_error(list_page(content_stub, alice, page_token=token))

        assert error.code == INVALID
        assert error.fields == ["page_token"]

    async def test_rejects_a_tampered_token(self, content_stub, alice):
        for _ in range(3):
            await create(content_stub, alice)
        token = (await list_page(content_stub, alice, page_size=1)).next_page_token
        tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")

        error = await expect_rpc_error(list_page(content_stub, alice, page_token=tampered))

        assert error.code == INVALID
        assert error.fields == ["page_token"]

    async def test_paging_while_rows_are_inserted_returns_each_row_exactly_once(
        self, content_stub, alice
    ):
        rng = random.Random(20250310)
        span = 3 * 24 * 3600

        def at_random_second():
            # Whole seconds over three days: many rows share a published_at.
            return BASE + timedelta(seconds=rng.randrange(0, span, 60))

        await ingest(
            content_stub,
            alice,
            [make_content(published_at=at_random_second()) for _ in range(1200)],
        )
        original = await list_ids(content_stub, alice)
        assert len(original) == 1200

        page_done = asyncio.Event()
        inserted_between_pages = asyncio.Event()
        stop = asyncio.Event()
        inserted = 0

        async def insert_rows():
            nonlocal inserted
            while not stop.is_set():
                batch = [make_content(published_at=at_random_second()) for _ in range(25)]
                await ingest(content_stub, alice, batch)
                inserted += len(batch)
                inserted_between_pages.set()
                await page_done.wait()
                page_done.clear()

        inserter = asyncio.create_task(insert_rows())
        seen, token = [], ""
        try:
            while True:
                await inserted_between_pages.wait()
                inserted_between_pages.clear()
                page = await list_page(content_stub, alice, page_size=97, page_token=token)
                seen.extend(page.contents)
                page_done.set()
                token = page.next_page_token
                if not token:
                    break
        finally:
            stop.set()
            page_done.set()
            await inserter

        seen_ids = [item.id for item in seen]
        assert inserted >= 25 * 12
        assert len(seen_ids) == len(set(seen_ids)), "a row was returned twice"
        assert set(original) <= set(seen_ids), "a row that existed at the start was skipped"
        assert_listing_order(seen)

"""SearchContent: full-text matching, ranking, snippets and keyset pages."""

import uuid

import grpc
import pytest
from observatory.v1 import content_pb2

from tests.helpers import expect_rpc_error, make_content

pytestmark = pytest.mark.asyncio

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def create(stub, caller, **fields):
    request = content_pb2.CreateContentRequest(content=make_content(**fields))
    return await stub.CreateContent(request, metadata=caller.metadata)


async def search(stub, caller, query, page_size=0, page_token="", **filter_fields):
    request = content_pb2.SearchContentRequest(
        filter=content_pb2.ContentFilter(query=query, **filter_fields),
        page_size=page_size,
        page_token=page_token,
    )
    return await stub.SearchContent(request, metadata=caller.metadata)


async def search_ids(stub, caller, query, **filter_fields):
    return [
        result.content.id
        for result in (await search(stub, caller, query, page_size=1000, **filter_fields)).results
    ]


class TestSearchContent:
    async def test_finds_items_matching_in_title_or_text(self, content_stub, alice):
        in_title = await create(content_stub, alice, title="Volcano erupts", text_content="Ash")
        in_text = await create(
            content_stub, alice, title="Update", text_content="The volcano is quiet"
        )
        await create(content_stub, alice, title="Weather", text_content="Sunny and warm")

        ids = await search_ids(content_stub, alice, "volcano")

        assert sorted(ids) == sorted([in_title.id, in_text.id])

    async def test_returns_full_items(self, content_stub, alice):
        created = await create(content_stub, alice, text_content="pangolin sighting", arena="x")

        response = await search(content_stub, alice, "pangolin")

        assert [result.content for result in response.results] == [created]
        assert not response.next_page_token

    async def test_matching_ignores_case(self, content_stub, alice):
        created = await create(content_stub, alice, text_content="The Heatwave continues")

        assert await search_ids(content_stub, alice, "HEATWAVE") == [created.id]

    async def test_ranks_better_matches_first(self, content_stub, alice):
        weak = await create(
            content_stub,
            alice,
            title="Local news",
            text_content="A long report on many things, and an earthquake was mentioned once.",
        )
        strong = await create(
            content_stub,
            alice,
            title="Earthquake",
            text_content="Earthquake strikes: the earthquake was felt across the region.",
        )
        middle = await create(
            content_stub,
            alice,
            title="Regional report",
            text_content="Earthquake damage. The earthquake hit at dawn.",
        )

        response = await search(content_stub, alice, "earthquake")

        assert [result.content.id for result in response.results] == [
            strong.id,
            middle.id,
            weak.id,
        ]
        ranks = [result.rank for result in response.results]
        assert ranks[0] > ranks[1] > ranks[2] > 0

    async def test_snippet_highlights_matches(self, content_stub, alice):
        await create(
            content_stub,
            alice,
            title="Report",
            text_content="Heavy rain caused a flood in the valley; the flood waters rose fast.",
        )

        (result,) = (await search(content_stub, alice, "flood")).results

        assert "<b>flood</b>" in result.snippet
        assert "valley" in result.snippet

    async def test_snippet_highlights_a_match_found_only_in_the_title(self, content_stub, alice):
        await create(
            content_stub,
            alice,
            title="Tornado warning issued",
            text_content="Residents are told to stay indoors tonight.",
        )

        (result,) = (await search(content_stub, alice, "tornado")).results

        assert "<b>Tornado</b>" in result.snippet

    async def test_snippet_of_an_item_without_text_uses_the_title(self, content_stub, alice):
        await create(content_stub, alice, title="Drought declared", text_content="")

        (result,) = (await search(content_stub, alice, "drought")).results

        assert result.snippet == "<b>Drought</b> declared"

    async def test_quoted_phrase_matches_only_the_phrase(self, content_stub, alice):
        phrase = await create(content_stub, alice, text_content="a solar eclipse tomorrow")
        await create(content_stub, alice, text_content="eclipse of the solar panels market")

        assert await search_ids(content_stub, alice, '"solar eclipse"') == [phrase.id]

    async def test_minus_excludes_a_word(self, content_stub, alice):
        kept = await create(content_stub, alice, text_content="storm over the sea")
        await create(content_stub, alice, text_content="storm over the desert")

        assert await search_ids(content_stub, alice, "storm -desert") == [kept.id]

    async def test_or_matches_either_word(self, content_stub, alice):
        hail = await create(content_stub, alice, text_content="hail damaged cars")
        sleet = await create(content_stub, alice, text_content="sleet on the roads")
        await create(content_stub, alice, text_content="clear skies")

        ids = await search_ids(content_stub, alice, "hail OR sleet")

        assert sorted(ids) == sorted([hail.id, sleet.id])

    async def test_all_words_must_match_by_default(self, content_stub, alice):
        both = await create(content_stub, alice, text_content="wildfire smoke over the city")
        await create(content_stub, alice, text_content="wildfire contained")

        assert await search_ids(content_stub, alice, "wildfire smoke") == [both.id]

    async def test_finds_nothing_when_nothing_matches(self, content_stub, alice):
        await create(content_stub, alice, text_content="ordinary words")

        response = await search(content_stub, alice, "zyzzyva")

        assert list(response.results) == []
        assert not response.next_page_token

    async def test_a_query_of_only_punctuation_finds_nothing(self, content_stub, alice):
        await create(content_stub, alice, text_content="ordinary words")

        response = await search(content_stub, alice, "!!! ??")

        assert list(response.results) == []

    async def test_requires_a_query(self, content_stub, alice):
        error = await expect_rpc_error(
            content_stub.SearchContent(content_pb2.SearchContentRequest(), metadata=alice.metadata)
        )

        assert error.code == INVALID
        assert error.fields == ["filter.query"]

    async def test_rejects_a_blank_query(self, content_stub, alice):
        error = await expect_rpc_error(search(content_stub, alice, "   \t"))

        assert error.code == INVALID
        assert error.fields == ["filter.query"]

    async def test_hides_deleted_items(self, content_stub, alice):
        kept = await create(content_stub, alice, text_content="meteor shower tonight")
        gone = await create(content_stub, alice, text_content="meteor spotted")
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=gone.id), metadata=alice.metadata
        )

        assert await search_ids(content_stub, alice, "meteor") == [kept.id]

    async def test_show_deleted_includes_deleted_items(self, content_stub, alice):
        kept = await create(content_stub, alice, text_content="meteor shower tonight")
        gone = await create(content_stub, alice, text_content="meteor spotted")
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=gone.id), metadata=alice.metadata
        )

        ids = await search_ids(content_stub, alice, "meteor", show_deleted=True)

        assert sorted(ids) == sorted([kept.id, gone.id])

    async def test_other_filter_fields_narrow_the_search(self, content_stub, alice):
        reddit = await create(content_stub, alice, platform="reddit", text_content="comet news")
        await create(content_stub, alice, platform="twitter", text_content="comet news")

        assert await search_ids(content_stub, alice, "comet", platforms=["reddit"]) == [reddit.id]

    async def test_rejects_a_malformed_author_id_in_the_filter(self, content_stub, alice):
        error = await expect_rpc_error(search(content_stub, alice, "x", author_ids=["bad"]))

        assert error.code == INVALID
        assert error.fields == ["filter.author_ids[0]"]

    async def test_rejects_nul_characters_in_the_query(self, content_stub, alice):
        error = await expect_rpc_error(search(content_stub, alice, "rain\x00"))

        assert error.code == INVALID
        assert error.fields == ["filter.query"]


class TestSearchContentPaging:
    async def test_pages_through_results_best_first_without_repeats(self, content_stub, alice):
        created = []
        # Groups with equal text tie on rank, so pages also split ties.
        for repeats in (1, 1, 1, 2, 2, 3, 3, 3, 4):
            text = " ".join(["aurora"] * repeats + ["filler words here"])
            created.append(await create(content_stub, alice, text_content=text))
        results, token, pages = [], "", 0
        while True:
            response = await search(content_stub, alice, "aurora", page_size=2, page_token=token)
            assert len(response.results) <= 2
            results.extend(response.results)
            pages += 1
            token = response.next_page_token
            if not token:
                break

        assert pages == 5
        ids = [result.content.id for result in results]
        assert len(ids) == len(set(ids))
        assert set(ids) == {item.id for item in created}
        ranks = [result.rank for result in results]
        assert ranks == sorted(ranks, reverse=True)
        assert len(set(ranks)) == 4

    async def test_page_size_zero_means_fifty(self, content_stub, alice):
        for _ in range(52):
            await create(content_stub, alice, text_content="narwhal")

        response = await search(content_stub, alice, "narwhal", page_size=0)

        assert len(response.results) == 50
        assert response.next_page_token

    async def test_rejects_a_negative_page_size(self, content_stub, alice):
        error = await expect_rpc_error(search(content_stub, alice, "x", page_size=-5))

        assert error.code == INVALID
        assert error.fields == ["page_size"]

    async def test_rejects_a_token_reused_with_another_query(self, content_stub, alice):
        for _ in range(3):
            await create(content_stub, alice, text_content="lynx and otter")
        first = await search(content_stub, alice, "lynx", page_size=1)

        error = await expect_rpc_error(
            search(content_stub, alice, "otter", page_size=1, page_token=first.next_page_token)
        )

        assert error.code == INVALID
        assert error.fields == ["page_token"]

    async def test_rejects_a_list_token(self, content_stub, alice):
        for _ in range(3):
            await create(content_stub, alice, text_content="lynx")
        listed = await content_stub.ListContent(
            content_pb2.ListContentRequest(
                filter=content_pb2.ContentFilter(query="lynx"), page_size=1
            ),
            metadata=alice.metadata,
        )

        error = await expect_rpc_error(
            search(content_stub, alice, "lynx", page_size=1, page_token=listed.next_page_token)
        )

        assert error.code == INVALID
        assert error.fields == ["page_token"]

    async def test_rejects_a_garbage_token(self, content_stub, alice):
        error = await expect_rpc_error(
            search(content_stub, alice, "x", page_token=uuid.uuid4().hex)
        )

        assert error.code == INVALID
        assert error.fields == ["page_token"]

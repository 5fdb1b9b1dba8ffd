"""FindDuplicates (normalised URL; same text on different platforms or arenas)
and MarkDuplicates."""

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from observatory.v1 import common_pb2, content_pb2

from server.urls import normalize_url
from tests.helpers import expect_rpc_error, ingest_requests, make_content

pytestmark = pytest.mark.asyncio

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
URL = common_pb2.DUPLICATE_KIND_URL
HASH = common_pb2.DUPLICATE_KIND_HASH


async def create(stub, caller, **fields) -> content_pb2.Content:
    return await stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content(**fields)), metadata=caller.metadata
    )


async def find(stub, caller, **filter_fields) -> list[tuple[int, str, list[str], str]]:
    response = await stub.FindDuplicates(
        content_pb2.FindDuplicatesRequest(filter=content_pb2.ContentFilter(**filter_fields)),
        metadata=caller.metadata,
    )
    return [(g.kind, g.key, list(g.content_ids), g.canonical_id) for g in response.groups]


@pytest_asyncio.fixture
async def crafted(content_stub, alice, bob):
    """Alice's rows: three spellings of one URL (one ingested), a lone URL, one
    text on two platforms, one text twice on the same platform and arena."""
    a = await create(
        content_stub,
        alice,
        url="https://www.Example.com/story/?utm_source=x&b=2&a=1",
        text_content="first",
        published_at=T0,
        collected_at=T0 + timedelta(hours=2),
    )
    b = await create(
        content_stub,
        alice,
        url="http://example.com/story?a=1&b=2&fbclid=zz#top",
        text_content="second",
        published_at=T0,
        collected_at=T0 + timedelta(hours=1),  # collected earlier than a: canonical
    )
    await content_stub.IngestContent(
        iter(
            ingest_requests(
                [
                    make_content(
                        url="https://example.com/story?b=2&a=1&gclid=1",
                        text_content="third",
                        published_at=T0 + timedelta(hours=1),
                    )
                ]
            )
        ),
        metadata=alice.metadata,
    )
    c = (
        await content_stub.ListContent(
            content_pb2.ListContentRequest(filter=content_pb2.ContentFilter(platforms=["twitter"])),
            metadata=alice.metadata,
        )
    ).contents
    c_id = next(row.id for row in c if row.text_content == "third")
    lone = await create(content_stub, alice, url="https://example.com/other", text_content="lone")
    tweet = await create(
        content_stub, alice, url="https://t.co/1", text_content="Same words here", published_at=T0
    )
    post = await create(
        content_stub,
        alice,
        platform="reddit",
        url="https://r.com/1",
        text_content="same   WORDS here",
        published_at=T0 + timedelta(minutes=5),
    )
    for i in range(2):
        await create(content_stub, alice, url=f"https://t.co/r{i}", text_content="retweeted")
    await create(content_stub, bob, url="https://example.com/story", text_content="first")
    return {"a": a.id, "b": b.id, "c": c_id, "lone": lone.id, "tweet": tweet.id, "post": post.id}


async def test_groups_by_normalised_url_and_by_hash_across_platforms(content_stub, alice, crafted):
    groups = await find(content_stub, alice)
    story = normalize_url("https://example.com/story?a=1&b=2")
    assert groups == [
        (URL, story, [crafted["b"], crafted["a"], crafted["c"]], crafted["b"]),
        (
            HASH,
            (
                await content_stub.GetContent(
                    content_pb2.GetContentRequest(id=crafted["tweet"]), metadata=alice.metadata
                )
            ).content_hash,
            [crafted["tweet"], crafted["post"]],
            crafted["tweet"],
        ),
    ]


async def test_groups_follow_the_filter(content_stub, alice, crafted):
    assert await find(content_stub, alice, platforms=["reddit"]) == []
    only_twitter = await find(content_stub, alice, platforms=["twitter"])
    assert [group[0] for group in only_twitter] == [URL]


async def test_a_changed_url_joins_its_group(content_stub, alice, crafted):
    moved = content_pb2.Content(id=crafted["lone"], url="https://EXAMPLE.com/story?a=1&b=2&ref=x")
    await content_stub.UpdateContent(
        content_pb2.UpdateContentRequest(
            content=moved, update_mask=field_mask_pb2.FieldMask(paths=["url"])
        ),
        metadata=alice.metadata,
    )
    url_groups = [g for g in await find(content_stub, alice) if g[0] == URL]
    assert len(url_groups) == 1 and crafted["lone"] in url_groups[0][2]


async def test_an_admin_never_sees_groups_across_owners(content_stub, admin, crafted):
    groups = await find(content_stub, admin, platforms=["twitter"])
    # Bob's copy of the story stays out of alice's group: groups never cross owners.
    (story,) = [g for g in groups if crafted["a"] in g[2]]
    assert story[2] == [crafted["b"], crafted["a"], crafted["c"]]


async def mark(stub, caller, canonical, *duplicates) -> int:
    response = await stub.MarkDuplicates(
        content_pb2.MarkDuplicatesRequest(canonical_id=canonical, duplicate_ids=list(duplicates)),
        metadata=caller.metadata,
    )
    return response.updated


async def test_mark_sets_duplicate_of_and_is_audited_once(content_stub, alice, crafted, db):
    assert await mark(content_stub, alice, crafted["b"], crafted["a"], crafted["c"]) == 2
    for key in ("a", "c"):
        row = await content_stub.GetContent(
            content_pb2.GetContentRequest(id=crafted[key]), metadata=alice.metadata
        )
        assert row.duplicate_of == crafted["b"]
    assert await mark(content_stub, alice, crafted["b"], crafted["a"]) == 0
    entries = await db.fetch(
        "SELECT resource, detail FROM audit_log WHERE user_id = $1 AND action = $2",
        alice.user_id,
        "content.mark_duplicates",
    )
    assert len(entries) == 2
    assert {entry["resource"] for entry in entries} == {f"contents/{crafted['b']}"}


@pytest.mark.parametrize(
    ("canonical", "duplicates", "field"),
    [
        ("b", ["b"], "duplicate_ids[0]"),
        ("b", ["a", "not-a-uuid"], "duplicate_ids[1]"),
        ("nope", ["a"], "canonical_id"),
        ("b", [], "duplicate_ids"),
    ],
)
async def test_bad_marks_name_the_field(content_stub, alice, crafted, canonical, duplicates, field):
    ids = {**crafted, "nope": "not-a-uuid", "not-a-uuid": "not-a-uuid"}
    error = await expect_rpc_error(
        mark(content_stub, alice, ids[canonical], *(ids[d] for d in duplicates))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == [field]


async def test_unknown_or_foreign_ids_are_not_found_and_change_nothing(
    content_stub, alice, bob, crafted, db
):
    theirs = await create(content_stub, bob)
    for canonical, duplicate in [
        (crafted["b"], str(uuid.uuid4())),
        (crafted["b"], theirs.id),
        (theirs.id, crafted["a"]),
    ]:
        error = await expect_rpc_error(
            mark(content_stub, alice, canonical, crafted["c"], duplicate)
        )
        assert error.code == grpc.StatusCode.NOT_FOUND
    assert (
        await db.fetchval(
            "SELECT count(*) FROM content WHERE owner_id = $1 AND duplicate_of IS NOT NULL",
            alice.user_id,
        )
        == 0
    )


async def test_a_duplicate_cannot_become_a_canonical(content_stub, alice, crafted):
    await mark(content_stub, alice, crafted["b"], crafted["a"])
    error = await expect_rpc_error(mark(content_stub, alice, crafted["a"], crafted["c"]))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "CANONICAL_IS_DUPLICATE"

"""ListCrossPlatformActors: actors with content on several platforms, most
platforms first, then most content, ties by ID; keyset pages; tenancy."""

import uuid

import grpc
import pytest
import pytest_asyncio
from observatory.v1 import actor_pb2, content_pb2, network_pb2

from tests.helpers import expect_rpc_error, ingest_requests, make_content

pytestmark = pytest.mark.asyncio


async def create_actor(actor_stub, caller, name: str) -> actor_pb2.Actor:
    return await actor_stub.CreateActor(
        actor_pb2.CreateActorRequest(actor=actor_pb2.Actor(canonical_name=name)),
        metadata=caller.metadata,
    )


class Cast:
    """Actors of one owner and their content, tagged with `run`:

    - three: twitter, reddit, facebook (1 each)
    - busy: twitter x2, rss x1
    - pair_a, pair_b: twitter, reddit (1 each): a tie, broken by ID
    - single: twitter x5 (one platform only)
    """

    def __init__(self, run: str, actors: dict[str, actor_pb2.Actor]) -> None:
        self.run = run
        self.actors = actors

    def id(self, name: str) -> str:
        return self.actors[name].id

    def filter(self, **fields: object) -> content_pb2.ContentFilter:
        return content_pb2.ContentFilter(collection_run_id=self.run, **fields)


POSTS = {
    "three": ["twitter", "reddit", "facebook"],
    "busy": ["twitter", "twitter", "rss"],
    "pair_a": ["twitter", "reddit"],
    "pair_b": ["reddit", "twitter"],
    "single": ["twitter"] * 5,
}


async def make_cast(content_stub, actor_stub, caller) -> Cast:
    run = f"run-{uuid.uuid4().hex}"
    actors = {name: await create_actor(actor_stub, caller, name.title()) for name in POSTS}
    contents = [
        make_content(platform=platform, author_id=actors[name].id, collection_run_id=run)
        for name, platforms in POSTS.items()
        for platform in platforms
    ]
    await content_stub.IngestContent(iter(ingest_requests(contents)), metadata=caller.metadata)
    return Cast(run, actors)


@pytest_asyncio.fixture
async def cast(content_stub, actor_stub, alice):
    return await make_cast(content_stub, actor_stub, alice)


async def list_page(stub, caller, filter, **fields):
    return await stub.ListCrossPlatformActors(
        network_pb2.ListCrossPlatformActorsRequest(filter=filter, **fields),
        metadata=caller.metadata,
    )


async def test_most_platforms_first_then_most_content_then_id(network_stub, alice, cast):
    page = await list_page(network_stub, alice, cast.filter())

    pair = sorted([cast.id("pair_a"), cast.id("pair_b")])
    assert [a.actor.id for a in page.actors] == [cast.id("three"), cast.id("busy"), *pair]
    assert not page.next_page_token
    three, busy = page.actors[0], page.actors[1]
    assert three.actor.canonical_name == "Three"
    assert list(three.platforms) == ["facebook", "reddit", "twitter"]
    assert dict(three.content_counts) == {"facebook": 1, "reddit": 1, "twitter": 1}
    assert list(busy.platforms) == ["rss", "twitter"]
    assert dict(busy.content_counts) == {"rss": 1, "twitter": 2}


async def test_min_platforms_raises_the_bar(network_stub, alice, cast):
    page = await list_page(network_stub, alice, cast.filter(), min_platforms=3)
    assert [a.actor.id for a in page.actors] == [cast.id("three")]

    everyone = await list_page(network_stub, alice, cast.filter(), min_platforms=1)
    assert everyone.actors[-1].actor.id == cast.id("single")
    assert len(everyone.actors) == 5


async def test_the_filter_decides_which_content_counts(network_stub, alice, cast):
    page = await list_page(network_stub, alice, cast.filter(platforms=["twitter", "reddit"]))
    # busy is left with twitter only; three with twitter and reddit.
    ids = [a.actor.id for a in page.actors]
    assert cast.id("busy") not in ids
    assert set(ids) == {cast.id("three"), cast.id("pair_a"), cast.id("pair_b")}


async def test_pages_follow_each_other_without_gaps_or_repeats(network_stub, alice, cast):
    seen, token = [], ""
    while True:
        page = await list_page(network_stub, alice, cast.filter(), page_size=1, page_token=token)
        seen += [a.actor.id for a in page.actors]
        token = page.next_page_token
        if not token:
            break
    pair = sorted([cast.id("pair_a"), cast.id("pair_b")])
    assert seen == [cast.id("three"), cast.id("busy"), *pair]


async def test_a_token_with_another_filter_is_invalid(network_stub, alice, cast):
    page = await list_page(network_stub, alice, cast.filter(), page_size=1)
    error = await expect_rpc_error(
        list_page(
            network_stub,
            alice,
            cast.filter(platforms=["twitter"]),
            page_size=1,
            page_token=page.next_page_token,
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == ["page_token"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"min_platforms": -1}, "min_platforms"), ({"page_size": -1}, "page_size")],
)
async def test_bad_requests_name_the_field(network_stub, alice, fields, field):
    error = await expect_rpc_error(
        list_page(network_stub, alice, content_pb2.ContentFilter(), **fields)
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == [field]


async def test_deleted_actors_are_listed_only_with_show_deleted(
    network_stub, actor_stub, alice, cast
):
    await actor_stub.DeleteActor(
        actor_pb2.DeleteActorRequest(id=cast.id("three")), metadata=alice.metadata
    )
    live = await list_page(network_stub, alice, cast.filter())
    assert cast.id("three") not in [a.actor.id for a in live.actors]

    everything = await list_page(network_stub, alice, cast.filter(show_deleted=True))
    assert everything.actors[0].actor.id == cast.id("three")
    assert everything.actors[0].actor.HasField("delete_time")


async def test_users_see_their_own_actors_and_admins_everyone(
    network_stub, content_stub, actor_stub, alice, bob, admin, cast
):
    assert not (await list_page(network_stub, bob, cast.filter())).actors

    theirs = await make_cast(content_stub, actor_stub, bob)
    admin_ids = set()
    for run in (cast.run, theirs.run):
        page = await list_page(
            network_stub, admin, content_pb2.ContentFilter(collection_run_id=run)
        )
        admin_ids |= {a.actor.id for a in page.actors}
    assert admin_ids == {
        c.id(name) for c in (cast, theirs) for name in ("three", "busy", "pair_a", "pair_b")
    }

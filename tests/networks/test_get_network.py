"""GetNetwork on a crafted data set (tests/networks/helpers.py: CONTENTS) whose
three networks are worked out by hand below; filters, min_weight, max_nodes
and truncation, tenancy, and the errors."""

import uuid

import grpc
import pytest
import pytest_asyncio
from observatory.v1 import content_pb2, network_pb2

from server.networks import service
from tests.helpers import expect_rpc_error, ingest_requests, make_content
from tests.networks.helpers import (
    ACTOR,
    ACTOR_CO,
    ACTOR_TERM,
    FB_U2,
    RD_U4,
    TERM,
    TERM_CO,
    TW_U2,
    TW_U3,
    edges_of,
    make_world,
    nodes_of,
    pair,
)

pytestmark = pytest.mark.asyncio

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest_asyncio.fixture
async def world(content_stub, actor_stub, alice):
    return await make_world(content_stub, actor_stub, alice)


async def get(stub, caller, kind, filter, **fields) -> network_pb2.GetNetworkResponse:
    return await stub.GetNetwork(
        network_pb2.GetNetworkRequest(kind=kind, filter=filter, **fields),
        metadata=caller.metadata,
    )


# Terms: contents matching each (a term repeated in one content counts once).
TERM_NODES = {
    "term:climate": ("climate", TERM, 4, 2, []),  # c1 c2 c3 c6
    "term:energy": ("energy", TERM, 3, 1, []),  # c1 c3 c5
    "term:housing": ("housing", TERM, 2, 1, []),  # c4 c6
}


class TestTermCooccurrence:
    async def test_terms_are_linked_by_the_contents_that_matched_both(
        self, network_stub, alice, world
    ):
        network = await get(network_stub, alice, TERM_CO, world.filter())

        assert nodes_of(network) == TERM_NODES
        assert edges_of(network) == {
            ("term:climate", "term:energy"): (2, []),  # c1, c3
            ("term:climate", "term:housing"): (1, []),  # c6
        }
        assert not network.truncated
        # Heaviest first.
        assert [n.id for n in network.nodes] == ["term:climate", "term:energy", "term:housing"]
        assert [e.weight for e in network.edges] == [2, 1]

    async def test_min_weight_drops_light_edges_but_keeps_the_nodes(
        self, network_stub, alice, world
    ):
        network = await get(network_stub, alice, TERM_CO, world.filter(), min_weight=2)

        assert edges_of(network) == {("term:climate", "term:energy"): (2, [])}
        assert {n.id: n.degree for n in network.nodes} == {
            "term:climate": 1,
            "term:energy": 1,
            "term:housing": 0,
        }

    async def test_max_nodes_keeps_the_heaviest_and_the_edges_among_them(
        self, network_stub, alice, world
    ):
        network = await get(network_stub, alice, TERM_CO, world.filter(), max_nodes=2)

        assert network.truncated
        assert nodes_of(network) == {
            "term:climate": ("climate", TERM, 4, 1, []),
            "term:energy": ("energy", TERM, 3, 1, []),
        }
        assert edges_of(network) == {("term:climate", "term:energy"): (2, [])}

    async def test_max_nodes_equal_to_the_node_count_is_not_truncated(
        self, network_stub, alice, world
    ):
        network = await get(network_stub, alice, TERM_CO, world.filter(), max_nodes=3)
        assert not network.truncated and len(network.nodes) == 3

    async def test_the_filter_selects_the_contents(self, network_stub, alice, world):
        twitter = await get(network_stub, alice, TERM_CO, world.filter(platforms=["twitter"]))
        # c1, c3, c4, c6
        assert {n.id: n.weight for n in twitter.nodes} == {
            "term:climate": 3,
            "term:energy": 2,
            "term:housing": 2,
        }
        assert edges_of(twitter) == {
            ("term:climate", "term:energy"): (2, []),
            ("term:climate", "term:housing"): (1, []),
        }

        housing = await get(network_stub, alice, TERM_CO, world.filter(search_term="housing"))
        # c4, c6
        assert {n.id: n.weight for n in housing.nodes} == {"term:housing": 2, "term:climate": 1}
        assert edges_of(housing) == {("term:climate", "term:housing"): (1, [])}


# Actors: contents per actor; A1 is resolved, the rest are platform accounts.
def actor_nodes(world, *, degrees):
    return {
        world.a1: ("Actor One", ACTOR, 2, degrees[0], ["reddit", "twitter"]),  # c1 c2
        TW_U2: ("User Two", ACTOR, 1, degrees[1], ["twitter"]),  # c3
        TW_U3: ("User Three", ACTOR, 1, degrees[2], ["twitter"]),  # c4
        FB_U2: ("u2", ACTOR, 1, degrees[3], ["facebook"]),  # c5: no display name
        RD_U4: ("u4", ACTOR, 1, degrees[4], ["reddit"]),  # c7: no terms
    }


class TestActorCooccurrence:
    async def test_actors_are_linked_by_the_terms_they_share(self, network_stub, alice, world):
        network = await get(network_stub, alice, ACTOR_CO, world.filter())

        # A1 {climate, energy}, tw:u2 {climate, energy}, tw:u3 {housing},
        # fb:u2 {energy}, rd:u4 {}; c6 has no author.
        assert nodes_of(network) == actor_nodes(world, degrees=[2, 2, 0, 2, 0])
        assert edges_of(network) == {
            pair(world.a1, TW_U2): (2, ["climate", "energy"]),
            pair(world.a1, FB_U2): (1, ["energy"]),
            pair(TW_U2, FB_U2): (1, ["energy"]),
        }
        for edge in network.edges:
            assert edge.source < edge.target

    async def test_min_weight_counts_distinct_shared_terms(self, network_stub, alice, world):
        network = await get(network_stub, alice, ACTOR_CO, world.filter(), min_weight=2)
        assert edges_of(network) == {pair(world.a1, TW_U2): (2, ["climate", "energy"])}
        assert nodes_of(network) == actor_nodes(world, degrees=[1, 1, 0, 0, 0])

    async def test_at_most_ten_shared_terms_are_listed_in_order(
        self, network_stub, content_stub, alice, world
    ):
        terms = [f"t{i:02d}" for i in range(12, 0, -1)]
        both = [
            make_content(
                platform="rss",
                author_platform_id=author,
                collection_run_id=world.run,
                search_terms_matched=terms,
            )
            for author in ("x", "y")
        ]
        await content_stub.IngestContent(iter(ingest_requests(both)), metadata=alice.metadata)

        network = await get(network_stub, alice, ACTOR_CO, world.filter(platforms=["rss"]))
        assert edges_of(network) == {
            ("account:rss:x", "account:rss:y"): (12, sorted(terms)[:10]),
        }

    async def test_deleted_content_counts_only_with_show_deleted(
        self, network_stub, content_stub, alice, world
    ):
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=world.ids["c5"]), metadata=alice.metadata
        )

        live = await get(network_stub, alice, ACTOR_CO, world.filter())
        assert FB_U2 not in nodes_of(live)
        assert set(edges_of(live)) == {pair(world.a1, TW_U2)}

        everything = await get(network_stub, alice, ACTOR_CO, world.filter(show_deleted=True))
        assert nodes_of(everything) == actor_nodes(world, degrees=[2, 2, 0, 2, 0])


class TestActorTerm:
    async def test_actors_point_at_the_terms_of_their_content(self, network_stub, alice, world):
        network = await get(network_stub, alice, ACTOR_TERM, world.filter())

        expected_nodes = actor_nodes(world, degrees=[2, 2, 1, 1, 0])
        expected_nodes.update(
            {
                "term:climate": ("climate", TERM, 4, 2, []),
                "term:energy": ("energy", TERM, 3, 3, []),
                "term:housing": ("housing", TERM, 2, 1, []),
            }
        )
        assert nodes_of(network) == expected_nodes
        assert edges_of(network) == {
            (world.a1, "term:climate"): (2, []),  # c1 c2
            (world.a1, "term:energy"): (1, []),  # c1
            (TW_U2, "term:climate"): (1, []),  # c3 (climate twice: one content)
            (TW_U2, "term:energy"): (1, []),  # c3
            (TW_U3, "term:housing"): (1, []),  # c4
            (FB_U2, "term:energy"): (1, []),  # c5
        }

    async def test_truncation_ranks_actors_and_terms_together(self, network_stub, alice, world):
        network = await get(network_stub, alice, ACTOR_TERM, world.filter(), max_nodes=3)

        assert network.truncated
        # climate 4, energy 3, then A1 and housing at 2: the smaller ID wins.
        third = min(world.a1, "term:housing")
        assert [n.id for n in network.nodes] == ["term:climate", "term:energy", third]
        # Only actor -> term edges exist: with A1 kept, its two; otherwise none.
        expected = {(world.a1, "term:climate"), (world.a1, "term:energy")}
        assert set(edges_of(network)) == (expected if third == world.a1 else set())


class TestTenancy:
    async def test_a_user_sees_only_their_own_content(self, network_stub, alice, bob, world):
        for kind in (ACTOR_CO, TERM_CO, ACTOR_TERM):
            network = await get(network_stub, bob, kind, world.filter())
            assert not network.nodes and not network.edges and not network.truncated

    async def test_an_admin_sees_every_owner(
        self, network_stub, content_stub, actor_stub, alice, bob, admin
    ):
        world = await make_world(content_stub, actor_stub, alice)
        theirs = make_content(
            platform="twitter",
            author_platform_id="u2",
            collection_run_id=world.run,
            search_terms_matched=["housing", "energy"],
        )
        await content_stub.IngestContent(iter(ingest_requests([theirs])), metadata=bob.metadata)

        network = await get(network_stub, admin, TERM_CO, world.filter())
        assert {n.id: n.weight for n in network.nodes} == {
            "term:climate": 4,
            "term:energy": 4,
            "term:housing": 3,
        }
        # Bob's twitter:u2 is the same account node as Alice's.
        actors = await get(network_stub, admin, ACTOR_CO, world.filter())
        assert nodes_of(actors)[TW_U2][2] == 2


class TestErrors:
    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"kind": network_pb2.NETWORK_KIND_UNSPECIFIED}, "kind"),
            ({"kind": 42}, "kind"),
            ({"kind": TERM_CO, "min_weight": -1}, "min_weight"),
            ({"kind": TERM_CO, "max_nodes": -5}, "max_nodes"),
            (
                {"kind": TERM_CO, "filter": content_pb2.ContentFilter(author_ids=["nope"])},
                "filter.author_ids[0]",
            ),
        ],
    )
    async def test_bad_requests_name_the_field(self, network_stub, alice, fields, field):
        error = await expect_rpc_error(
            network_stub.GetNetwork(
                network_pb2.GetNetworkRequest(**fields), metadata=alice.metadata
            )
        )
        assert error.code == INVALID
        assert error.fields == [field]

    async def test_max_nodes_above_the_limit_is_clamped(self, network_stub, alice, world):
        network = await get(network_stub, alice, TERM_CO, world.filter(), max_nodes=10**9)
        assert len(network.nodes) == 3 and not network.truncated

    async def test_too_many_edges_is_refused_with_advice(
        self, network_stub, alice, world, monkeypatch
    ):
        monkeypatch.setattr(service, "GET_MAX_EDGES", 1)
        error = await expect_rpc_error(get(network_stub, alice, TERM_CO, world.filter()))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "NETWORK_TOO_LARGE"
        assert "ExportNetwork" in error.message


async def test_another_tenants_actor_lends_no_name(
    network_stub, content_stub, alice, bob, world, db
):
    # Bob's content names Alice's actor as its author (a row from before
    # author_id was checked against the owner's actors): the node is there
    # (its ID is what Bob sent) but without Alice's name for it.
    theirs = make_content(
        platform="twitter",
        author_display_name="Bob's name for it",
        collection_run_id=world.run,
        search_terms_matched=["x"],
    )
    await content_stub.IngestContent(iter(ingest_requests([theirs])), metadata=bob.metadata)
    await db.execute(
        "UPDATE content SET author_id = $1 WHERE owner_id = $2",
        uuid.UUID(world.a1),
        bob.user_id,
    )

    network = await get(network_stub, bob, ACTOR_CO, world.filter())
    assert nodes_of(network) == {world.a1: ("Bob's name for it", ACTOR, 1, 0, ["twitter"])}

"""FindCandidateMatches (exact name, shared username, trigram) and the linking
of ingested and created content to actors by their platform accounts."""

import uuid

import grpc
import pytest
from observatory.v1 import actor_pb2, content_pb2

from tests.actors.helpers import add_alias, add_presence, create_actor
from tests.helpers import expect_rpc_error, ingest_requests, make_content

pytestmark = pytest.mark.asyncio

EXACT = actor_pb2.MATCH_STRATEGY_EXACT_NAME
SHARED = actor_pb2.MATCH_STRATEGY_SHARED_USERNAME
TRIGRAM = actor_pb2.MATCH_STRATEGY_TRIGRAM


async def find(stub, caller, actor_id, **fields):
    return await stub.FindCandidateMatches(
        actor_pb2.FindCandidateMatchesRequest(actor_id=actor_id, **fields),
        metadata=caller.metadata,
    )


async def crafted_set(stub, alice, bob):
    """The actor asked about and, by name, the actors around it."""
    target = await create_actor(stub, alice, "Lars Løkke Rasmussen")
    await add_alias(stub, alice, target.id, "LLR")
    await add_presence(stub, alice, target.id, "twitter", "t1", username="larsloekke")
    actors = {"target": target}
    for key, name in [
        ("same_name", "lars løkke RASMUSSEN"),
        ("alias_llr", "Lars L. R."),
        ("shared_handle", "Venstre Formand"),
        ("close", "Lars Løkke Rasmussen (V)"),
        ("alias_close", "Statsministeren"),
        ("farther", "Lars Løkke"),
        ("unrelated", "Mette Frederiksen"),
        ("deleted", "Lars Løkke Rasmussen"),
    ]:
        actors[key] = await create_actor(stub, alice, name)
    await add_alias(stub, alice, actors["alias_llr"].id, "llr")
    await add_presence(
        stub, alice, actors["shared_handle"].id, "instagram", "i9", username="LarsLoekke"
    )
    await add_presence(stub, alice, actors["shared_handle"].id, "facebook", "f9", username="other")
    await add_alias(stub, alice, actors["alias_close"].id, "Lars Løkke Rasmusen")
    await stub.DeleteActor(
        actor_pb2.DeleteActorRequest(id=actors["deleted"].id), metadata=alice.metadata
    )
    await create_actor(stub, bob, "Lars Løkke Rasmussen")
    return actors


async def test_candidates_come_exact_then_shared_username_then_by_similarity(
    actor_stub, alice, bob
):
    actors = await crafted_set(actor_stub, alice, bob)
    ids = {actor.id: key for key, actor in actors.items()}

    response = await find(actor_stub, alice, actors["target"].id)

    found = [(ids.get(c.actor.id, "?"), c.strategy) for c in response.candidates]
    exact = sorted(
        [("same_name", EXACT), ("alias_llr", EXACT)],
        key=lambda pair: actors[pair[0]].id,
    )
    assert found[:2] == exact
    assert found[2] == ("shared_handle", SHARED)
    assert found[3:] == [("close", TRIGRAM), ("alias_close", TRIGRAM), ("farther", TRIGRAM)]
    similarities = [c.similarity for c in response.candidates]
    assert similarities[:2] == [1.0, 1.0]
    assert similarities[3:] == sorted(similarities[3:], reverse=True)
    assert all(0.4 <= s < 1 for s in similarities[3:])
    by_key = {ids[c.actor.id]: c for c in response.candidates}
    assert list(by_key["shared_handle"].platforms) == ["instagram"]
    assert by_key["shared_handle"].actor.canonical_name == "Venstre Formand"
    # pg_trgm's similarity of the lower-cased best pair of names.
    assert by_key["close"].similarity == pytest.approx(0.909, abs=0.001)
    assert by_key["alias_close"].similarity == pytest.approx(0.857, abs=0.001)
    assert by_key["farther"].similarity == pytest.approx(0.5)


async def test_threshold_and_limit_narrow_the_candidates(actor_stub, alice, bob):
    actors = await crafted_set(actor_stub, alice, bob)
    target = actors["target"].id

    strict = await find(actor_stub, alice, target, threshold=0.95)
    assert TRIGRAM not in {c.strategy for c in strict.candidates}
    assert len(strict.candidates) == 3
    first_two = await find(actor_stub, alice, target, limit=2)
    assert {c.strategy for c in first_two.candidates} == {EXACT}


async def test_an_actor_with_no_look_alikes_has_no_candidates(actor_stub, alice):
    actor = await create_actor(actor_stub, alice, "Quetzalcoatl Industries")
    await create_actor(actor_stub, alice, "Mette Frederiksen")
    assert not (await find(actor_stub, alice, actor.id)).candidates


async def test_bad_requests(actor_stub, alice, bob):
    actor = await create_actor(actor_stub, alice)
    for fields, code, field in [
        ({"threshold": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "threshold"),
        ({"threshold": -0.1}, grpc.StatusCode.INVALID_ARGUMENT, "threshold"),
        ({"limit": -1}, grpc.StatusCode.INVALID_ARGUMENT, "limit"),
    ]:
        error = await expect_rpc_error(find(actor_stub, alice, actor.id, **fields))
        assert (error.code, error.fields) == (code, [field])
    error = await expect_rpc_error(find(actor_stub, alice, "nope"))
    assert error.fields == ["actor_id"]
    for caller, actor_id in [(alice, str(uuid.uuid4())), (bob, actor.id)]:
        error = await expect_rpc_error(find(actor_stub, caller, actor_id))
        assert error.code == grpc.StatusCode.NOT_FOUND


async def test_ingest_links_rows_to_the_actor_of_their_authors_account(
    actor_stub, content_stub, alice, bob, db
):
    actor = await create_actor(actor_stub, alice)
    await add_presence(actor_stub, alice, actor.id, "twitter", "author-1")
    other_author = (await create_actor(actor_stub, alice, "Another author")).id
    rows = [
        make_content(platform="twitter", author_platform_id="author-1", title="linked"),
        make_content(platform="reddit", author_platform_id="author-1", title="other platform"),
        make_content(platform="twitter", author_platform_id="author-2", title="unknown author"),
        make_content(
            platform="twitter",
            author_platform_id="author-1",
            author_id=other_author,
            title="given author",
        ),
    ]
    response = await content_stub.IngestContent(
        iter(ingest_requests(rows)), metadata=alice.metadata
    )
    assert response.inserted == 4
    # Bob's rows never link to Alice's actors.
    await content_stub.IngestContent(
        iter(ingest_requests([make_content(platform="twitter", author_platform_id="author-1")])),
        metadata=bob.metadata,
    )

    stored = await db.fetch(
        "SELECT owner_id, title, author_id FROM content WHERE owner_id = ANY($1::uuid[])",
        [alice.user_id, bob.user_id],
    )
    authors = {(r["owner_id"], r["title"]): r["author_id"] for r in stored}
    assert authors[(alice.user_id, "linked")] == uuid.UUID(actor.id)
    assert authors[(alice.user_id, "other platform")] is None
    assert authors[(alice.user_id, "unknown author")] is None
    assert authors[(alice.user_id, "given author")] == uuid.UUID(other_author)
    assert authors[(bob.user_id, "A title")] is None


async def test_create_content_links_its_author_too(actor_stub, content_stub, alice):
    actor = await create_actor(actor_stub, alice)
    await add_presence(actor_stub, alice, actor.id, "twitter", "author-9")
    created = await content_stub.CreateContent(
        content_pb2.CreateContentRequest(
            content=make_content(platform="twitter", author_platform_id="author-9")
        ),
        metadata=alice.metadata,
    )
    assert created.author_id == actor.id

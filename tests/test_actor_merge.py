"""MergeActors and SplitActor: all or nothing, no orphaned content or
presences, and overlapping merges from many processes stay consistent."""

import asyncio
import uuid
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import grpc
import pytest
from observatory.v1 import actor_pb2, actor_pb2_grpc, content_pb2

from tests.actor_helpers import add_alias, add_presence, create_actor, get_actor, merge
from tests.helpers import error_details, expect_rpc_error, ingest_requests, make_content

pytestmark = pytest.mark.asyncio

NOT_FOUND = grpc.StatusCode.NOT_FOUND


async def write_content(content_stub, caller, authors: dict[tuple[str, str], int]) -> None:
    """Ingests `count` items by each (platform, account); ingest links them to
    the account's actor."""
    rows = [
        make_content(platform=platform, author_platform_id=account)
        for (platform, account), count in authors.items()
        for _ in range(count)
    ]
    response = await content_stub.IngestContent(
        iter(ingest_requests(rows)), metadata=caller.metadata
    )
    assert response.inserted == len(rows)


async def content_by_author(db, caller) -> dict[uuid.UUID | None, int]:
    rows = await db.fetch(
        "SELECT author_id, count(*) AS n FROM content WHERE owner_id = $1 GROUP BY author_id",
        caller.user_id,
    )
    return {row["author_id"]: row["n"] for row in rows}


async def presences_by_actor(db, caller) -> dict[uuid.UUID, int]:
    rows = await db.fetch(
        "SELECT actor_id, count(*) AS n FROM actor_presences WHERE owner_id = $1 GROUP BY actor_id",
        caller.user_id,
    )
    return {row["actor_id"]: row["n"] for row in rows}


async def orphans(db, caller) -> tuple[int, int]:
    """Content and presences whose actor no longer exists."""
    content = await db.fetchval(
        "SELECT count(*) FROM content c WHERE c.owner_id = $1 AND c.author_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM actors a WHERE a.id = c.author_id)",
        caller.user_id,
    )
    presences = await db.fetchval(
        "SELECT count(*) FROM actor_presences p WHERE p.owner_id = $1 "
        "AND NOT EXISTS (SELECT 1 FROM actors a WHERE a.id = p.actor_id)",
        caller.user_id,
    )
    return content, presences


class TestMergeActors:
    async def test_moves_content_presences_and_names_to_the_canonical(
        self, actor_stub, content_stub, alice, bob, db
    ):
        canonical = await create_actor(actor_stub, alice, "Jane Doe")
        one = await create_actor(actor_stub, alice, "J. Doe")
        two = await create_actor(actor_stub, alice, "Jane D")
        await add_alias(actor_stub, alice, one.id, "Janie")
        await add_alias(actor_stub, alice, two.id, "JANE DOE")  # the canonical's own name
        await add_presence(actor_stub, alice, canonical.id, "twitter", "c1")
        await add_presence(actor_stub, alice, one.id, "reddit", "o1")
        await add_presence(actor_stub, alice, two.id, "facebook", "t1")
        await add_presence(actor_stub, alice, two.id, "mastodon", "t2")
        await write_content(
            content_stub,
            alice,
            {("twitter", "c1"): 1, ("reddit", "o1"): 3, ("facebook", "t1"): 2, ("x", "?"): 1},
        )
        # Bob's content naming Alice's actor is Bob's business: left alone.
        bobs = make_content(author_id=one.id)
        await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=bobs), metadata=bob.metadata
        )
        before = await content_by_author(db, alice)

        merged = await merge(actor_stub, alice, canonical.id, one.id, two.id)

        assert merged.id == canonical.id
        assert list(merged.aliases) == ["J. Doe", "Jane D", "Janie"]
        assert sorted(p.platform_user_id for p in merged.presences) == ["c1", "o1", "t1", "t2"]
        after = await content_by_author(db, alice)
        assert sum(after.values()) == sum(before.values()) == 7
        assert after == {uuid.UUID(canonical.id): 6, None: 1}
        assert await presences_by_actor(db, alice) == {uuid.UUID(canonical.id): 4}
        assert await orphans(db, alice) == (0, 0)
        for gone in (one, two):
            error = await expect_rpc_error(get_actor(actor_stub, alice, gone.id))
            assert error.code == NOT_FOUND
        assert await db.fetchval(
            "SELECT author_id FROM content WHERE owner_id = $1", bob.user_id
        ) == uuid.UUID(one.id)
        audit = await db.fetch(
            "SELECT action, resource, detail FROM audit_log WHERE user_id = $1 "
            "AND action = 'actor.merge'",
            alice.user_id,
        )
        assert len(audit) == 1
        assert audit[0]["resource"] == f"actors/{canonical.id}"

    async def test_a_failed_merge_changes_nothing(self, actor_stub, content_stub, alice, bob, db):
        canonical = await create_actor(actor_stub, alice, "Keep")
        dup = await create_actor(actor_stub, alice, "Dup")
        await add_presence(actor_stub, alice, dup.id, "twitter", "d1")
        await write_content(content_stub, alice, {("twitter", "d1"): 2})
        bobs = await create_actor(actor_stub, bob, "Bob's")
        deleted = await create_actor(actor_stub, alice, "Deleted")
        await actor_stub.DeleteActor(
            actor_pb2.DeleteActorRequest(id=deleted.id), metadata=alice.metadata
        )
        before = (await content_by_author(db, alice), await presences_by_actor(db, alice))

        for duplicates, code, field in [
            ([dup.id, str(uuid.uuid4())], NOT_FOUND, None),
            ([dup.id, bobs.id], NOT_FOUND, None),
            ([dup.id, deleted.id], grpc.StatusCode.FAILED_PRECONDITION, None),
            ([], grpc.StatusCode.INVALID_ARGUMENT, "duplicate_ids"),
            ([dup.id, canonical.id], grpc.StatusCode.INVALID_ARGUMENT, "duplicate_ids[1]"),
            ([dup.id, "bad"], grpc.StatusCode.INVALID_ARGUMENT, "duplicate_ids[1]"),
        ]:
            error = await expect_rpc_error(merge(actor_stub, alice, canonical.id, *duplicates))
            assert error.code == code, duplicates
            if field:
                assert error.fields == [field]

        assert (await content_by_author(db, alice), await presences_by_actor(db, alice)) == before
        assert (await get_actor(actor_stub, alice, dup.id)).canonical_name == "Dup"
        assert not (await get_actor(actor_stub, alice, canonical.id)).aliases


class TestSplitActor:
    async def split(self, stub, caller, actor_id, presence_ids, name="Split Off"):
        return await stub.SplitActor(
            actor_pb2.SplitActorRequest(
                actor_id=actor_id, presence_ids=presence_ids, new_canonical_name=name
            ),
            metadata=caller.metadata,
        )

    async def test_moves_the_chosen_presences_and_their_content(
        self, actor_stub, content_stub, alice, db
    ):
        actor = await create_actor(
            actor_stub, alice, "Two People", actor_type=actor_pb2.ACTOR_TYPE_PERSON
        )
        stay = await add_presence(actor_stub, alice, actor.id, "twitter", "s1")
        go_one = await add_presence(actor_stub, alice, actor.id, "reddit", "g1")
        go_two = await add_presence(actor_stub, alice, actor.id, "facebook", "g2")
        await write_content(
            content_stub, alice, {("twitter", "s1"): 2, ("reddit", "g1"): 3, ("facebook", "g2"): 1}
        )
        # Content linked to the actor by hand, with no account, stays with it.
        await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=make_content(author_id=actor.id)),
            metadata=alice.metadata,
        )

        response = await self.split(actor_stub, alice, actor.id, [go_one.id, go_two.id])

        original, new = response.original, response.new_actor
        assert [p.id for p in original.presences] == [stay.id]
        assert sorted(p.id for p in new.presences) == sorted([go_one.id, go_two.id])
        assert new.canonical_name == "Split Off"
        assert new.actor_type == actor_pb2.ACTOR_TYPE_PERSON
        assert await content_by_author(db, alice) == {
            uuid.UUID(actor.id): 3,
            uuid.UUID(new.id): 4,
        }
        assert await orphans(db, alice) == (0, 0)
        assert (
            await db.fetchval(
                "SELECT count(*) FROM audit_log WHERE user_id = $1 AND action = 'actor.split'",
                alice.user_id,
            )
            == 1
        )

    async def test_errors_change_nothing(self, actor_stub, alice, bob, db):
        actor = await create_actor(actor_stub, alice)
        mine = await add_presence(actor_stub, alice, actor.id, "twitter", "m1")
        other = await create_actor(actor_stub, alice, "Other")
        theirs = await add_presence(actor_stub, alice, other.id, "twitter", "o1")

        error = await expect_rpc_error(
            self.split(actor_stub, alice, actor.id, [mine.id, theirs.id])
        )
        assert error.code == NOT_FOUND
        error = await expect_rpc_error(self.split(actor_stub, alice, actor.id, []))
        assert error.fields == ["presence_ids"]
        error = await expect_rpc_error(self.split(actor_stub, alice, actor.id, [mine.id], name=""))
        assert error.fields == ["new_canonical_name"]
        error = await expect_rpc_error(self.split(actor_stub, bob, actor.id, [mine.id]))
        assert error.code == NOT_FOUND
        assert (
            await db.fetchval("SELECT count(*) FROM actors WHERE owner_id = $1", alice.user_id) == 2
        )
        assert await presences_by_actor(db, alice) == {
            uuid.UUID(actor.id): 1,
            uuid.UUID(other.id): 1,
        }


# -- overlapping merges from several processes ---------------------------------

PROCESSES = 4
ACTORS = 12
MERGES_PER_PROCESS = 6


def merge_storm(port: int, token: str, plans: list[tuple[str, list[str]]]) -> list[str]:
    """Runs in a child process: fires every (canonical, duplicates) merge at
    once and returns each one's status code name."""

    async def run() -> list[str]:
        metadata = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = actor_pb2_grpc.ActorServiceStub(channel)

            async def one(canonical: str, duplicates: list[str]) -> str:
                request = actor_pb2.MergeActorsRequest(
                    canonical_id=canonical, duplicate_ids=duplicates
                )
                try:
                    await stub.MergeActors(request, metadata=metadata, timeout=60)
                except grpc.aio.AioRpcError as error:
                    return f"{error.code().name}:{error_details(error).reason}"
                return "OK"

            return list(await asyncio.gather(*(one(c, d) for c, d in plans)))

    return asyncio.run(run())


async def test_overlapping_merges_from_many_processes_keep_every_row(
    app, actor_stub, content_stub, alice, db
):
    actors = [await create_actor(actor_stub, alice, f"Storm {i}") for i in range(ACTORS)]
    authors = {}
    for i, actor in enumerate(actors):
        for platform in ("twitter", "reddit"):
            await add_presence(actor_stub, alice, actor.id, platform, f"{platform}-{i}")
            authors[(platform, f"{platform}-{i}")] = 2
    await write_content(content_stub, alice, authors)
    total_content = sum(authors.values())
    ids = [actor.id for actor in actors]
    # Each merge folds two neighbours into an actor, so every actor is wanted
    # by several merges at once, as canonical and as duplicate.
    plans = [
        [
            (
                ids[(p * 3 + k) % ACTORS],
                [ids[(p * 3 + k + 1) % ACTORS], ids[(p * 3 + k + 5) % ACTORS]],
            )
            for k in range(MERGES_PER_PROCESS)
        ]
        for p in range(PROCESSES)
    ]

    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(PROCESSES, mp_context=get_context("spawn")) as pool:
        results = await asyncio.gather(
            *(
                loop.run_in_executor(pool, merge_storm, app.port, alice.token, plan)
                for plan in plans
            )
        )
    outcomes = [outcome for result in results for outcome in result]

    # A merge that lost the race finds an actor gone: NOT_FOUND. Locking in ID
    # order means none ever deadlocks (which would surface as ABORTED).
    assert set(outcomes) <= {"OK", "NOT_FOUND:NOT_FOUND"}, outcomes
    succeeded = outcomes.count("OK")
    assert succeeded >= 1
    survivors = await db.fetchval("SELECT count(*) FROM actors WHERE owner_id = $1", alice.user_id)
    assert survivors == ACTORS - 2 * succeeded
    assert sum((await content_by_author(db, alice)).values()) == total_content
    assert None not in await content_by_author(db, alice)
    assert sum((await presences_by_actor(db, alice)).values()) == 2 * ACTORS
    assert await orphans(db, alice) == (0, 0)
    audited = await db.fetchval(
        "SELECT count(*) FROM audit_log WHERE user_id = $1 AND action = 'actor.merge'",
        alice.user_id,
    )
    assert audited == succeeded

"""MergeActors and SplitActor: all or nothing, no orphaned content or
presences, and overlapping merges from many processes stay consistent."""

import asyncio
import uuid

import asyncpg
import grpc
import pytest
from observatory.v1 import actor_pb2, content_pb2

from tests.actors.helpers import (
    add_alias,
    add_presence,
    content_by_author,
    create_actor,
    get_actor,
    merge,
    orphans,
    presences_by_actor,
    write_content,
)
from tests.helpers import expect_rpc_error, ingest_requests, make_content, wait_until

pytestmark = pytest.mark.asyncio

NOT_FOUND = grpc.StatusCode.NOT_FOUND


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
        # Bob's content naming Alice's actor (a row from before author_id was
        # checked against the owner's actors) is Bob's business: left alone.
        bobs = await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=make_content()), metadata=bob.metadata
        )
        await db.execute(
            "UPDATE content SET author_id = $1 WHERE id = $2", uuid.UUID(one.id), uuid.UUID(bobs.id)
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

    async def test_an_admin_merges_within_one_owner_only(self, actor_stub, alice, bob, admin):
        canonical = await create_actor(actor_stub, alice, "Alice's canonical")
        dup = await create_actor(actor_stub, alice, "Alice's duplicate")
        bobs = await create_actor(actor_stub, bob, "Bob's")

        error = await expect_rpc_error(merge(actor_stub, admin, canonical.id, bobs.id))
        assert error.code == NOT_FOUND
        merged = await merge(actor_stub, admin, canonical.id, dup.id)
        assert merged.owner_id == str(alice.user_id)
        assert list(merged.aliases) == ["Alice's duplicate"]
        assert (await get_actor(actor_stub, bob, bobs.id)).id == bobs.id


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


class TestContentWrittenDuringAMerge:
    """Content linked to an actor while a merge of that actor is in flight ends
    up on the canonical actor, never on the removed duplicate."""

    async def _has_waiters(self, db, count: int) -> bool:
        """At least `count` backends of this database wait for a lock."""
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return bool(waiting >= count)

    @pytest.mark.parametrize("via", ["ingest", "create"])
    async def test_rows_linked_mid_merge_follow_the_merge(
        self, actor_stub, content_stub, alice, db, database_url, via
    ):
        canonical = await create_actor(actor_stub, alice, "Canonical Person")
        duplicate = await create_actor(actor_stub, alice, "Duplicate Person")
        account = f"acct-{uuid.uuid4().hex[:8]}"
        await add_presence(actor_stub, alice, duplicate.id, "twitter", account)
        await write_content(content_stub, alice, {("twitter", account): 1})

        # Hold the duplicate's existing content row, so the merge stops midway:
        # it has locked both actors and moved the account, but not committed.
        blocker = await asyncpg.connect(database_url)
        try:
            holding = blocker.transaction()
            await holding.start()
            await blocker.execute(
                "SELECT 1 FROM content WHERE author_id = $1 FOR UPDATE",
                uuid.UUID(duplicate.id),
            )
            merging = asyncio.create_task(merge(actor_stub, alice, canonical.id, duplicate.id))
            assert await wait_until(lambda: self._has_waiters(db, 1))

            row = make_content(platform="twitter", author_platform_id=account, title="mid-merge")
            if via == "ingest":
                call = content_stub.IngestContent(
                    iter(ingest_requests([row])), metadata=alice.metadata
                )
            else:
                call = content_stub.CreateContent(
                    content_pb2.CreateContentRequest(content=row), metadata=alice.metadata
                )
            writing = asyncio.ensure_future(call)
            # The writer waits for the merge rather than linking to the duplicate.
            assert await wait_until(lambda: self._has_waiters(db, 2))
            assert not writing.done()
            await holding.rollback()
            await merging
            await writing
        finally:
            await blocker.close()

        authors = await db.fetch(
            "SELECT title, author_id FROM content WHERE owner_id = $1 AND author_platform_id = $2",
            alice.user_id,
            account,
        )
        assert len(authors) == 2
        assert {r["author_id"] for r in authors} == {uuid.UUID(canonical.id)}
        assert await orphans(db, alice) == (0, 0)

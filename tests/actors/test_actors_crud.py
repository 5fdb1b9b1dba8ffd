"""ActorService: create, get, list, update, delete/undelete, aliases,
presences and resolution, with their errors and tenant isolation."""

import asyncio
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from observatory.v1 import actor_pb2, content_pb2

from tests.actors.helpers import add_alias, add_presence, create_actor, get_actor
from tests.helpers import expect_rpc_error, make_content

pytestmark = pytest.mark.asyncio

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def audit_actions(db, caller) -> list[str]:
    rows = await db.fetch(
        "SELECT action FROM audit_log WHERE user_id = $1 ORDER BY create_time, id",
        caller.user_id,
    )
    return [row["action"] for row in rows]


class TestCreateActor:
    async def test_returns_the_stored_actor(self, actor_stub, alice):
        actor = actor_pb2.Actor(
            canonical_name="  Greenpeace Nordic ",
            actor_type=actor_pb2.ACTOR_TYPE_ORGANIZATION,
            description="An NGO",
        )
        actor.metadata.update({"country": "DK", "founded": 1971})
        created = await actor_stub.CreateActor(
            actor_pb2.CreateActorRequest(actor=actor), metadata=alice.metadata
        )

        assert uuid.UUID(created.id)
        assert created.owner_id == str(alice.user_id)
        assert created.canonical_name == "Greenpeace Nordic"
        assert created.actor_type == actor_pb2.ACTOR_TYPE_ORGANIZATION
        assert created.description == "An NGO"
        assert dict(created.metadata) == {"country": "DK", "founded": 1971}
        assert created.HasField("create_time") and not created.HasField("delete_time")
        assert await get_actor(actor_stub, alice, created.id) == created

    async def test_unspecified_type_is_stored_as_unknown(self, actor_stub, alice):
        created = await create_actor(actor_stub, alice)
        assert created.actor_type == actor_pb2.ACTOR_TYPE_UNKNOWN

    @pytest.mark.parametrize(
        ("actor", "field"),
        [
            (actor_pb2.Actor(canonical_name="   "), "actor.canonical_name"),
            (actor_pb2.Actor(canonical_name="x" * 501), "actor.canonical_name"),
            (actor_pb2.Actor(canonical_name="a\x00b"), "actor.canonical_name"),
            (actor_pb2.Actor(canonical_name="ok", actor_type=99), "actor.actor_type"),
        ],
    )
    async def test_bad_fields_are_invalid_argument(self, actor_stub, alice, actor, field):
        error = await expect_rpc_error(
            actor_stub.CreateActor(
                actor_pb2.CreateActorRequest(actor=actor), metadata=alice.metadata
            )
        )
        assert error.code == INVALID
        assert error.fields == [field]

    @pytest.mark.parametrize(
        "metadata",
        [
            {"k" * 256: 1},
            {"outer": {"k" * 256: 1}},
            {"outer": [{"k" * 256: 1}]},
            {"big": "v" * 70_000},
            {f"k{i}": "v" * 1000 for i in range(70)},
        ],
        ids=["long-key", "long-nested-key", "long-key-in-list", "big-value", "many-values"],
    )
    async def test_metadata_beyond_its_limits_is_refused(self, actor_stub, alice, metadata):
        actor = actor_pb2.Actor(canonical_name="n")
        actor.metadata.update(metadata)
        error = await expect_rpc_error(
            actor_stub.CreateActor(
                actor_pb2.CreateActorRequest(actor=actor), metadata=alice.metadata
            )
        )
        assert error.code == INVALID
        assert error.fields == ["actor.metadata"]
        assert len(error.message) < 1000

    async def test_metadata_at_its_limits_is_stored(self, actor_stub, alice):
        actor = actor_pb2.Actor(canonical_name="n")
        actor.metadata.update({"k" * 255: {"é" * 255: "v" * 60_000}})
        created = await actor_stub.CreateActor(
            actor_pb2.CreateActorRequest(actor=actor), metadata=alice.metadata
        )
        assert created.metadata == actor.metadata

    async def test_a_retried_request_id_creates_once(self, actor_stub, alice, db):
        request = actor_pb2.CreateActorRequest(
            actor=actor_pb2.Actor(canonical_name="Retried"), request_id=str(uuid.uuid4())
        )
        first = await actor_stub.CreateActor(request, metadata=alice.metadata)
        second = await actor_stub.CreateActor(request, metadata=alice.metadata)

        assert first == second
        count = await db.fetchval("SELECT count(*) FROM actors WHERE owner_id = $1", alice.user_id)
        assert count == 1
        request.actor.canonical_name = "Different"
        error = await expect_rpc_error(actor_stub.CreateActor(request, metadata=alice.metadata))
        assert error.reason == "REQUEST_ID_REUSED"

    async def test_a_retry_gets_the_first_answer_even_after_a_change(self, actor_stub, alice):
        actor = actor_pb2.Actor(canonical_name="First", description="as created")
        actor.metadata.update({"n": 1.5, "tags": ["a", "b"], "nested": {"ok": True}})
        request = actor_pb2.CreateActorRequest(actor=actor, request_id=str(uuid.uuid4()))
        first = await actor_stub.CreateActor(request, metadata=alice.metadata)
        assert await get_actor(actor_stub, alice, first.id) == first
        await actor_stub.UpdateActor(
            actor_pb2.UpdateActorRequest(
                actor=actor_pb2.Actor(id=first.id, canonical_name="Later")
            ),
            metadata=alice.metadata,
        )

        assert await actor_stub.CreateActor(request, metadata=alice.metadata) == first

    async def test_concurrent_retries_create_once_and_agree(self, actor_stub, alice, db):
        request = actor_pb2.CreateActorRequest(
            actor=actor_pb2.Actor(canonical_name="Raced"), request_id=str(uuid.uuid4())
        )
        answers = await asyncio.gather(
            *(actor_stub.CreateActor(request, metadata=alice.metadata) for _ in range(10))
        )

        assert all(answer == answers[0] for answer in answers)
        assert (
            await db.fetchval("SELECT count(*) FROM actors WHERE owner_id = $1", alice.user_id) == 1
        )
        assert await audit_actions(db, alice) == ["actor.create"]

    async def test_a_request_id_another_method_used_is_reused(
        self, actor_stub, content_stub, alice, bob
    ):
        request_id = str(uuid.uuid4())
        await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=make_content(), request_id=request_id),
            metadata=alice.metadata,
        )
        request = actor_pb2.CreateActorRequest(
            actor=actor_pb2.Actor(canonical_name="Late"), request_id=request_id
        )
        error = await expect_rpc_error(actor_stub.CreateActor(request, metadata=alice.metadata))
        assert error.reason == "REQUEST_ID_REUSED"
        # Request IDs are per caller: another caller's is its own.
        assert (
            await actor_stub.CreateActor(request, metadata=bob.metadata)
        ).canonical_name == "Late"


class TestGetActor:
    async def test_unknown_or_malformed_ids(self, actor_stub, alice):
        error = await expect_rpc_error(get_actor(actor_stub, alice, str(uuid.uuid4())))
        assert error.code == NOT_FOUND
        error = await expect_rpc_error(get_actor(actor_stub, alice, "nope"))
        assert error.code == INVALID
        assert error.fields == ["id"]

    async def test_another_users_actor_is_not_found_but_an_admin_sees_it(
        self, actor_stub, alice, bob, admin
    ):
        actor = await create_actor(actor_stub, alice)
        error = await expect_rpc_error(get_actor(actor_stub, bob, actor.id))
        assert error.code == NOT_FOUND
        assert (await get_actor(actor_stub, admin, actor.id)).id == actor.id


class TestListActors:
    async def list(self, stub, caller, **fields):
        return await stub.ListActors(
            actor_pb2.ListActorsRequest(**fields), metadata=caller.metadata
        )

    async def test_pages_by_name_then_id_without_repeats_or_gaps(self, actor_stub, alice):
        names = ["delta", "Alpha", "charlie", "bravo", "alpha", "Écho", "alpha"]
        created = [await create_actor(actor_stub, alice, name) for name in names]
        seen = []
        token = ""
        while True:
            page = await self.list(actor_stub, alice, page_size=2, page_token=token)
            seen += [(a.canonical_name, a.id) for a in page.actors]
            # Rows added while paging never make a row come twice.
            await create_actor(actor_stub, alice, "zz-later")
            token = page.next_page_token
            if not token:
                break
        originals = sorted((a.canonical_name, a.id) for a in created)
        assert [entry for entry in seen if entry[0] != "zz-later"] == originals
        assert len(seen) == len(set(seen))

    async def test_name_query_is_a_case_insensitive_substring(self, actor_stub, alice):
        for name in ("Danish Red Cross", "RED BULL", "Frederik", "Blue Cross", "Ærø Radio"):
            await create_actor(actor_stub, alice, name)
        page = await self.list(actor_stub, alice, name_query="red")
        assert sorted(a.canonical_name for a in page.actors) == [
            "Danish Red Cross",
            "Frederik",
            "RED BULL",
        ]
        page = await self.list(actor_stub, alice, name_query="ærø")
        assert [a.canonical_name for a in page.actors] == ["Ærø Radio"]

    async def test_like_wildcards_in_the_query_match_literally(self, actor_stub, alice):
        await create_actor(actor_stub, alice, "100% Green")
        await create_actor(actor_stub, alice, "1000 Greens")
        await create_actor(actor_stub, alice, "snake_case")
        await create_actor(actor_stub, alice, "snakeXcase")
        page = await self.list(actor_stub, alice, name_query="0%")
        assert [a.canonical_name for a in page.actors] == ["100% Green"]
        page = await self.list(actor_stub, alice, name_query="e_c")
        assert [a.canonical_name for a in page.actors] == ["snake_case"]

    async def test_filters_by_type_and_hides_deleted(self, actor_stub, alice):
        person = await create_actor(actor_stub, alice, "P", actor_type=actor_pb2.ACTOR_TYPE_PERSON)
        media = await create_actor(actor_stub, alice, "M", actor_type=actor_pb2.ACTOR_TYPE_MEDIA)
        await actor_stub.DeleteActor(
            actor_pb2.DeleteActorRequest(id=media.id), metadata=alice.metadata
        )
        page = await self.list(actor_stub, alice)
        assert [a.id for a in page.actors] == [person.id]
        page = await self.list(
            actor_stub, alice, actor_types=[actor_pb2.ACTOR_TYPE_MEDIA], show_deleted=True
        )
        assert [a.id for a in page.actors] == [media.id]

    async def test_a_page_ends_early_by_size_and_goes_on_from_there(self, actor_stub, alice):
        # 30 actors of ~100,000 characters: about 3 MB, more than one page holds.
        created = [
            await create_actor(actor_stub, alice, f"actor {i:02}", description="d" * 99_000)
            for i in range(30)
        ]
        first = await self.list(actor_stub, alice, page_size=1000)
        assert 0 < len(first.actors) < len(created)
        assert first.ByteSize() <= 2_100_000
        assert first.next_page_token
        seen = [a.id for a in first.actors]
        token = first.next_page_token
        while token:
            page = await self.list(actor_stub, alice, page_size=1000, page_token=token)
            assert page.actors
            seen += [a.id for a in page.actors]
            token = page.next_page_token
        assert seen == [a.id for a in created]

    async def test_shows_only_the_callers_actors(self, actor_stub, alice, bob):
        await create_actor(actor_stub, alice, "Alice's")
        assert not (await self.list(actor_stub, bob)).actors

    async def test_bad_requests(self, actor_stub, alice):
        for _ in range(3):
            await create_actor(actor_stub, alice)
        page = await self.list(actor_stub, alice, page_size=1)
        error = await expect_rpc_error(
            self.list(
                actor_stub, alice, page_size=1, page_token=page.next_page_token, name_query="x"
            )
        )
        assert error.code == INVALID
        assert error.fields == ["page_token"]
        error = await expect_rpc_error(self.list(actor_stub, alice, page_size=-1))
        assert error.fields == ["page_size"]
        error = await expect_rpc_error(self.list(actor_stub, alice, actor_types=[42]))
        assert error.fields == ["actor_types[0]"]


class TestUpdateActor:
    async def test_updates_only_the_masked_fields(self, actor_stub, alice):
        actor = await create_actor(actor_stub, alice, "Old", description="keep me")
        change = actor_pb2.Actor(id=actor.id, canonical_name="New", description="ignored")
        updated = await actor_stub.UpdateActor(
            actor_pb2.UpdateActorRequest(
                actor=change, update_mask=field_mask_pb2.FieldMask(paths=["canonical_name", "id"])
            ),
            metadata=alice.metadata,
        )
        assert updated.canonical_name == "New"
        assert updated.description == "keep me"
        assert updated.update_time.ToDatetime() >= actor.update_time.ToDatetime()

    async def test_errors(self, actor_stub, alice, bob):
        actor = await create_actor(actor_stub, alice)

        async def update(caller, message, *paths):
            return await actor_stub.UpdateActor(
                actor_pb2.UpdateActorRequest(
                    actor=message, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
                ),
                metadata=caller.metadata,
            )

        error = await expect_rpc_error(update(alice, actor_pb2.Actor(id=actor.id), "nope"))
        assert error.fields == ["update_mask.paths[0]"]
        error = await expect_rpc_error(update(alice, actor_pb2.Actor(id=actor.id)))
        assert error.fields == ["actor.canonical_name"]
        error = await expect_rpc_error(
            update(bob, actor_pb2.Actor(id=actor.id, canonical_name="x"))
        )
        assert error.code == NOT_FOUND
        await actor_stub.DeleteActor(
            actor_pb2.DeleteActorRequest(id=actor.id), metadata=alice.metadata
        )
        error = await expect_rpc_error(
            update(alice, actor_pb2.Actor(id=actor.id, canonical_name="x"))
        )
        assert error.code == PRECONDITION
        assert error.reason == "ACTOR_DELETED"


class TestDeleteActor:
    async def test_delete_then_undelete(self, actor_stub, alice, db):
        actor = await create_actor(actor_stub, alice)
        request = actor_pb2.DeleteActorRequest(id=actor.id)
        deleted = await actor_stub.DeleteActor(request, metadata=alice.metadata)
        assert deleted.HasField("delete_time")
        assert (await get_actor(actor_stub, alice, actor.id)).HasField("delete_time")
        error = await expect_rpc_error(actor_stub.DeleteActor(request, metadata=alice.metadata))
        assert error.code == NOT_FOUND

        undelete = actor_pb2.UndeleteActorRequest(id=actor.id)
        restored = await actor_stub.UndeleteActor(undelete, metadata=alice.metadata)
        assert not restored.HasField("delete_time")
        error = await expect_rpc_error(actor_stub.UndeleteActor(undelete, metadata=alice.metadata))
        assert error.code == ALREADY_EXISTS
        assert await audit_actions(db, alice) == ["actor.create", "actor.delete", "actor.undelete"]

    async def test_another_users_actor_cannot_be_deleted(self, actor_stub, alice, bob):
        actor = await create_actor(actor_stub, alice)
        error = await expect_rpc_error(
            actor_stub.DeleteActor(actor_pb2.DeleteActorRequest(id=actor.id), metadata=bob.metadata)
        )
        assert error.code == NOT_FOUND


class TestAddAlias:
    async def test_is_idempotent_and_case_insensitive(self, actor_stub, alice, db):
        actor = await create_actor(actor_stub, alice, "Mette Frederiksen")
        await add_alias(actor_stub, alice, actor.id, "Mette F.")
        await add_alias(actor_stub, alice, actor.id, "statsministeren")
        again = await add_alias(actor_stub, alice, actor.id, " METTE f. ")
        assert list(again.aliases) == ["Mette F.", "statsministeren"]
        assert await audit_actions(db, alice) == [
            "actor.create",
            "actor.add_alias",
            "actor.add_alias",
        ]

    async def test_errors(self, actor_stub, alice, bob):
        actor = await create_actor(actor_stub, alice)
        error = await expect_rpc_error(add_alias(actor_stub, alice, actor.id, " "))
        assert error.fields == ["alias"]
        error = await expect_rpc_error(add_alias(actor_stub, alice, "bad", "x"))
        assert error.fields == ["actor_id"]
        error = await expect_rpc_error(add_alias(actor_stub, bob, actor.id, "x"))
        assert error.code == NOT_FOUND


class TestPresences:
    async def test_add_returns_the_presence_and_the_actor_lists_it(self, actor_stub, alice):
        actor = await create_actor(actor_stub, alice)
        presence = await add_presence(
            actor_stub,
            alice,
            actor.id,
            "twitter",
            "12345",
            username="JaneDoe",
            profile_url="https://x.com/JaneDoe",
            verified=True,
            follower_count=1200,
        )
        assert uuid.UUID(presence.id)
        assert presence.actor_id == actor.id
        assert presence.follower_count == 1200 and presence.verified
        fetched = await get_actor(actor_stub, alice, actor.id)
        assert list(fetched.presences) == [presence]

    async def test_adding_the_same_account_again_refreshes_it(self, actor_stub, alice):
        actor = await create_actor(actor_stub, alice)
        first = await add_presence(actor_stub, alice, actor.id, "twitter", "1", username="old")
        second = await add_presence(actor_stub, alice, actor.id, "twitter", "1", username="new")
        assert second.id == first.id and second.username == "new"
        assert len((await get_actor(actor_stub, alice, actor.id)).presences) == 1

    async def test_an_account_of_another_actor_is_already_exists(self, actor_stub, alice, bob):
        one = await create_actor(actor_stub, alice, "One")
        two = await create_actor(actor_stub, alice, "Two")
        await add_presence(actor_stub, alice, one.id, "twitter", "42")
        error = await expect_rpc_error(add_presence(actor_stub, alice, two.id, "twitter", "42"))
        assert error.code == ALREADY_EXISTS
        # Another owner may track the same account.
        bobs = await create_actor(actor_stub, bob, "Bob's")
        assert (await add_presence(actor_stub, bob, bobs.id, "twitter", "42")).actor_id == bobs.id

    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"platform": ""}, "presence.platform"),
            ({"platform_user_id": ""}, "presence.platform_user_id"),
            ({"profile_url": "ftp://x"}, "presence.profile_url"),
            ({"follower_count": -1}, "presence.follower_count"),
            ({"username": "u" * 501}, "presence.username"),
            ({"actor_id": "bad"}, "presence.actor_id"),
        ],
    )
    async def test_bad_fields(self, actor_stub, alice, fields, field):
        actor = await create_actor(actor_stub, alice)
        values = {"actor_id": actor.id, "platform": "twitter", "platform_user_id": "1", **fields}
        error = await expect_rpc_error(
            actor_stub.AddPresence(
                actor_pb2.AddPresenceRequest(presence=actor_pb2.Presence(**values)),
                metadata=alice.metadata,
            )
        )
        assert error.code == INVALID
        assert error.fields == [field]

    async def test_remove_returns_the_actor_without_it(self, actor_stub, alice, bob, db):
        actor = await create_actor(actor_stub, alice)
        keep = await add_presence(actor_stub, alice, actor.id, "reddit", "k")
        gone = await add_presence(actor_stub, alice, actor.id, "twitter", "g")
        request = actor_pb2.RemovePresenceRequest(id=gone.id)
        error = await expect_rpc_error(actor_stub.RemovePresence(request, metadata=bob.metadata))
        assert error.code == NOT_FOUND
        after = await actor_stub.RemovePresence(request, metadata=alice.metadata)
        assert list(after.presences) == [keep]
        error = await expect_rpc_error(actor_stub.RemovePresence(request, metadata=alice.metadata))
        assert error.code == NOT_FOUND
        assert (await audit_actions(db, alice))[-1] == "actor.remove_presence"


class TestResolveActor:
    async def resolve(self, stub, caller, **fields):
        return await stub.ResolveActor(
            actor_pb2.ResolveActorRequest(**fields), metadata=caller.metadata
        )

    async def test_by_platform_user_id_or_case_insensitive_username(self, actor_stub, alice):
        actor = await create_actor(actor_stub, alice)
        await add_presence(actor_stub, alice, actor.id, "twitter", "777", username="JaneDoe")
        by_id = await self.resolve(actor_stub, alice, platform="twitter", platform_user_id="777")
        by_name = await self.resolve(actor_stub, alice, platform="twitter", username="janedoe")
        assert by_id.id == by_name.id == actor.id
        assert len(by_id.presences) == 1

    async def test_a_reused_username_resolves_to_its_latest_account(self, actor_stub, alice):
        old = await create_actor(actor_stub, alice, "Old owner")
        new = await create_actor(actor_stub, alice, "New owner")
        await add_presence(actor_stub, alice, old.id, "twitter", "1", username="handle")
        await add_presence(actor_stub, alice, new.id, "twitter", "2", username="Handle")
        resolved = await self.resolve(actor_stub, alice, platform="twitter", username="HANDLE")
        assert resolved.id == new.id

    async def test_a_deleted_actor_still_resolves_with_its_delete_time(self, actor_stub, alice):
        actor = await create_actor(actor_stub, alice)
        await add_presence(actor_stub, alice, actor.id, "twitter", "d1")
        await actor_stub.DeleteActor(
            actor_pb2.DeleteActorRequest(id=actor.id), metadata=alice.metadata
        )
        resolved = await self.resolve(actor_stub, alice, platform="twitter", platform_user_id="d1")
        assert resolved.HasField("delete_time")

    async def test_unknown_accounts_and_other_tenants_are_not_found(self, actor_stub, alice, bob):
        actor = await create_actor(actor_stub, alice)
        await add_presence(actor_stub, alice, actor.id, "twitter", "888", username="x")
        for caller, fields in [
            (alice, {"platform": "reddit", "platform_user_id": "888"}),
            (alice, {"platform": "twitter", "platform_user_id": "889"}),
            (bob, {"platform": "twitter", "platform_user_id": "888"}),
            (bob, {"platform": "twitter", "username": "x"}),
        ]:
            error = await expect_rpc_error(self.resolve(actor_stub, caller, **fields))
            assert error.code == NOT_FOUND

    async def test_not_found_quotes_little_of_the_platform(self, actor_stub, alice):
        error = await expect_rpc_error(
            self.resolve(actor_stub, alice, platform="p" * 255, username="nobody")
        )
        assert error.code == NOT_FOUND
        assert "p" * 65 not in error.message

    async def test_needs_a_platform_and_an_account(self, actor_stub, alice):
        error = await expect_rpc_error(self.resolve(actor_stub, alice, platform_user_id="1"))
        assert error.fields == ["platform"]
        error = await expect_rpc_error(self.resolve(actor_stub, alice, platform="twitter"))
        assert error.fields == ["platform_user_id"]

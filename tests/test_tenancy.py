"""Who may see and change what: tokens are required, a user reaches only their
own content (another user's looks exactly like a missing one), an admin
reaches everyone's."""

import time
import uuid

import grpc
import jwt
import pytest
from google.protobuf import field_mask_pb2
from observatory.v1 import content_pb2

from server.auth import issue_token
from tests.helpers import TEST_SECRET, Caller, expect_rpc_error, make_content

pytestmark = pytest.mark.asyncio

NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


async def create(stub, caller, **fields):
    request = content_pb2.CreateContentRequest(content=make_content(**fields))
    return await stub.CreateContent(request, metadata=caller.metadata)


async def get(stub, caller, content_id):
    return await stub.GetContent(
        content_pb2.GetContentRequest(id=content_id), metadata=caller.metadata
    )


def retitle(content_id, title):
    return content_pb2.UpdateContentRequest(
        content=content_pb2.Content(id=content_id, title=title),
        update_mask=field_mask_pb2.FieldMask(paths=["title"]),
    )


def calls_of_every_rpc(stub):
    """One well-formed request per ContentService RPC covered here."""
    some_id = str(uuid.uuid4())
    return {
        "CreateContent": lambda md: stub.CreateContent(
            content_pb2.CreateContentRequest(content=make_content()), metadata=md
        ),
        "GetContent": lambda md: stub.GetContent(
            content_pb2.GetContentRequest(id=some_id), metadata=md
        ),
        "ListContent": lambda md: stub.ListContent(content_pb2.ListContentRequest(), metadata=md),
        "UpdateContent": lambda md: stub.UpdateContent(retitle(some_id, "x"), metadata=md),
        "DeleteContent": lambda md: stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=some_id), metadata=md
        ),
        "UndeleteContent": lambda md: stub.UndeleteContent(
            content_pb2.UndeleteContentRequest(id=some_id), metadata=md
        ),
        "SearchContent": lambda md: stub.SearchContent(
            content_pb2.SearchContentRequest(filter=content_pb2.ContentFilter(query="x")),
            metadata=md,
        ),
    }


RPCS = [
    "CreateContent",
    "GetContent",
    "ListContent",
    "UpdateContent",
    "DeleteContent",
    "UndeleteContent",
    "SearchContent",
]


class TestAuthentication:
    @pytest.mark.parametrize("rpc", RPCS)
    async def test_a_call_without_a_token_is_unauthenticated(self, content_stub, rpc):
        error = await expect_rpc_error(calls_of_every_rpc(content_stub)[rpc](()))

        assert error.code == UNAUTHENTICATED
        assert error.reason == "UNAUTHENTICATED"

    async def test_a_token_signed_with_another_secret_is_unauthenticated(self, content_stub):
        token = issue_token("another-secret-that-is-also-long-enough-for-hs256", uuid.uuid4())

        error = await expect_rpc_error(
            calls_of_every_rpc(content_stub)["ListContent"]((("authorization", f"Bearer {token}"),))
        )

        assert error.code == UNAUTHENTICATED

    async def test_an_expired_token_is_unauthenticated(self, content_stub):
        token = issue_token(TEST_SECRET, uuid.uuid4(), ttl_seconds=-60)

        error = await expect_rpc_error(
            calls_of_every_rpc(content_stub)["ListContent"]((("authorization", f"Bearer {token}"),))
        )

        assert error.code == UNAUTHENTICATED

    @pytest.mark.parametrize(
        "authorization",
        ["Bearer", "Bearer not.a.jwt", "Basic dXNlcjpwYXNz", "token-without-scheme"],
    )
    async def test_a_malformed_authorization_is_unauthenticated(self, content_stub, authorization):
        error = await expect_rpc_error(
            calls_of_every_rpc(content_stub)["ListContent"]((("authorization", authorization),))
        )

        assert error.code == UNAUTHENTICATED

    async def test_an_unauthenticated_create_stores_nothing(self, content_stub, db):
        marker = uuid.uuid4().hex
        content = make_content(collection_run_id=marker)

        await expect_rpc_error(
            content_stub.CreateContent(content_pb2.CreateContentRequest(content=content))
        )

        assert (
            await db.fetchval("SELECT count(*) FROM content WHERE collection_run_id = $1", marker)
            == 0
        )


class TestUserIsolation:
    async def test_owner_comes_from_the_token_not_the_request(self, content_stub, alice, bob):
        content = make_content()
        content.owner_id = str(bob.user_id)

        created = await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=content), metadata=alice.metadata
        )

        assert created.owner_id == str(alice.user_id)
        bobs_page = await content_stub.ListContent(
            content_pb2.ListContentRequest(), metadata=bob.metadata
        )
        assert list(bobs_page.contents) == []

    async def test_getting_another_users_item_is_not_found(self, content_stub, alice, bob):
        bobs = await create(content_stub, bob)

        error = await expect_rpc_error(get(content_stub, alice, bobs.id))

        assert error.code == NOT_FOUND

    async def test_another_users_item_looks_exactly_like_a_missing_one(
        self, content_stub, alice, bob
    ):
        bobs = await create(content_stub, bob)
        missing_id = str(uuid.uuid4())

        foreign = await expect_rpc_error(get(content_stub, alice, bobs.id))
        missing = await expect_rpc_error(get(content_stub, alice, missing_id))

        assert (foreign.code, foreign.reason, foreign.fields) == (
            missing.code,
            missing.reason,
            missing.fields,
        )
        assert foreign.message.replace(bobs.id, "ID") == missing.message.replace(missing_id, "ID")

    async def test_updating_another_users_item_is_not_found(self, content_stub, alice, bob):
        bobs = await create(content_stub, bob, title="Bob's")

        error = await expect_rpc_error(
            content_stub.UpdateContent(retitle(bobs.id, "Alice was here"), metadata=alice.metadata)
        )

        assert error.code == NOT_FOUND
        assert await get(content_stub, bob, bobs.id) == bobs

    async def test_deleting_another_users_item_is_not_found(self, content_stub, alice, bob):
        bobs = await create(content_stub, bob)

        error = await expect_rpc_error(
            content_stub.DeleteContent(
                content_pb2.DeleteContentRequest(id=bobs.id), metadata=alice.metadata
            )
        )

        assert error.code == NOT_FOUND
        assert not (await get(content_stub, bob, bobs.id)).HasField("delete_time")

    async def test_undeleting_another_users_item_is_not_found(self, content_stub, alice, bob):
        bobs = await create(content_stub, bob)
        deleted = await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=bobs.id), metadata=bob.metadata
        )

        error = await expect_rpc_error(
            content_stub.UndeleteContent(
                content_pb2.UndeleteContentRequest(id=bobs.id), metadata=alice.metadata
            )
        )

        assert error.code == NOT_FOUND
        assert (await get(content_stub, bob, bobs.id)).delete_time == deleted.delete_time

    async def test_undeleting_another_users_live_item_is_not_found(self, content_stub, alice, bob):
        bobs = await create(content_stub, bob)

        error = await expect_rpc_error(
            content_stub.UndeleteContent(
                content_pb2.UndeleteContentRequest(id=bobs.id), metadata=alice.metadata
            )
        )

        assert error.code == NOT_FOUND

    async def test_list_shows_only_the_callers_items(self, content_stub, alice, bob):
        alices = await create(content_stub, alice)
        await create(content_stub, bob)

        page = await content_stub.ListContent(
            content_pb2.ListContentRequest(filter=content_pb2.ContentFilter(show_deleted=True)),
            metadata=alice.metadata,
        )

        assert [item.id for item in page.contents] == [alices.id]

    async def test_search_shows_only_the_callers_items(self, content_stub, alice, bob):
        word = "w" + uuid.uuid4().hex
        alices = await create(content_stub, alice, text_content=f"{word} by alice")
        await create(content_stub, bob, text_content=f"{word} by bob")

        response = await content_stub.SearchContent(
            content_pb2.SearchContentRequest(filter=content_pb2.ContentFilter(query=word)),
            metadata=alice.metadata,
        )

        assert [result.content.id for result in response.results] == [alices.id]

    async def test_the_same_natural_key_may_exist_for_two_users(self, content_stub, alice, bob):
        content = make_content(platform_id="shared-key")

        alices = await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=content), metadata=alice.metadata
        )
        bobs = await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=content), metadata=bob.metadata
        )

        assert alices.id != bobs.id
        assert (alices.owner_id, bobs.owner_id) == (str(alice.user_id), str(bob.user_id))

    async def test_another_users_natural_key_does_not_block_an_update(
        self, content_stub, alice, bob
    ):
        bobs = await create(content_stub, bob, platform_id="bobs-key")
        alices = await create(content_stub, alice, platform_id="alices-key")
        change = content_pb2.Content(id=alices.id, platform_id="bobs-key")
        change.published_at.CopyFrom(bobs.published_at)

        updated = await content_stub.UpdateContent(
            content_pb2.UpdateContentRequest(
                content=change,
                update_mask=field_mask_pb2.FieldMask(paths=["platform_id", "published_at"]),
            ),
            metadata=alice.metadata,
        )

        assert updated.platform_id == "bobs-key"

    async def test_a_page_token_cannot_be_used_by_another_user(self, content_stub, alice, bob):
        for _ in range(3):
            await create(content_stub, alice)
        first = await content_stub.ListContent(
            content_pb2.ListContentRequest(page_size=1), metadata=alice.metadata
        )

        error = await expect_rpc_error(
            content_stub.ListContent(
                content_pb2.ListContentRequest(page_size=1, page_token=first.next_page_token),
                metadata=bob.metadata,
            )
        )

        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.fields == ["page_token"]


class TestAdminAccess:
    async def test_admin_gets_any_users_item(self, content_stub, alice, admin):
        alices = await create(content_stub, alice)

        assert await get(content_stub, admin, alices.id) == alices

    async def test_admin_lists_every_users_items(self, content_stub, alice, bob, admin):
        run = uuid.uuid4().hex
        alices = await create(content_stub, alice, collection_run_id=run)
        bobs = await create(content_stub, bob, collection_run_id=run)

        page = await content_stub.ListContent(
            content_pb2.ListContentRequest(filter=content_pb2.ContentFilter(collection_run_id=run)),
            metadata=admin.metadata,
        )

        assert sorted(item.id for item in page.contents) == sorted([alices.id, bobs.id])

    async def test_admin_searches_every_users_items(self, content_stub, alice, bob, admin):
        word = "w" + uuid.uuid4().hex
        alices = await create(content_stub, alice, text_content=word)
        bobs = await create(content_stub, bob, text_content=word)

        response = await content_stub.SearchContent(
            content_pb2.SearchContentRequest(filter=content_pb2.ContentFilter(query=word)),
            metadata=admin.metadata,
        )

        assert sorted(result.content.id for result in response.results) == sorted(
            [alices.id, bobs.id]
        )

    async def test_admin_update_keeps_the_owner(self, content_stub, alice, admin):
        alices = await create(content_stub, alice)

        updated = await content_stub.UpdateContent(
            retitle(alices.id, "Moderated"), metadata=admin.metadata
        )

        assert updated.title == "Moderated"
        assert updated.owner_id == str(alice.user_id)

    async def test_admin_deletes_and_restores_any_users_item(self, content_stub, alice, admin):
        alices = await create(content_stub, alice)

        deleted = await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=alices.id), metadata=admin.metadata
        )
        seen_by_owner = await get(content_stub, alice, alices.id)
        restored = await content_stub.UndeleteContent(
            content_pb2.UndeleteContentRequest(id=alices.id), metadata=admin.metadata
        )

        assert seen_by_owner.delete_time == deleted.delete_time
        assert not restored.HasField("delete_time")
        assert restored.owner_id == str(alice.user_id)

    async def test_admin_creates_items_as_itself(self, content_stub, admin):
        created = await create(content_stub, admin)

        assert created.owner_id == str(admin.user_id)

    async def test_a_user_does_not_see_an_admins_items(self, content_stub, admin, alice):
        admins = await create(content_stub, admin)

        error = await expect_rpc_error(get(content_stub, alice, admins.id))

        assert error.code == NOT_FOUND

    async def test_a_token_without_a_role_claim_is_a_user(self, content_stub, alice):
        alices = await create(content_stub, alice)
        now = int(time.time())
        token = jwt.encode(
            {"sub": str(uuid.uuid4()), "iat": now, "exp": now + 600}, TEST_SECRET, algorithm="HS256"
        )

        error = await expect_rpc_error(
            get(content_stub, Caller(uuid.uuid4(), "user", token), alices.id)
        )

        assert error.code == NOT_FOUND

"""GetActor and ResolveActor are coalesced point reads: the calls that arrive
while a query is in flight are answered together by one query, whoever made
them. Under a storm of mixed callers each still sees only its own rows and
exactly the calls that should fail do."""

import asyncio
import random
import uuid
from dataclasses import dataclass

import grpc
import pytest
from observatory.v1 import actor_pb2

from server.actors.repository import AccountKey, ActorRepository
from tests.actors.helpers import add_presence, create_actor, merge
from tests.helpers import Caller, error_details, new_caller

pytestmark = pytest.mark.asyncio

CALLS = 200
QUERY_DELAY_S = 0.02
NOT_FOUND = "NOT_FOUND"
INVALID = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class Call:
    caller: Caller
    method: str
    request: actor_pb2.GetActorRequest | actor_pb2.ResolveActorRequest
    # The actor ID the answer must carry, or the status code the call must fail with.
    expect: str


class Queries:
    """Records the keys of every coalesced query (a spy on the repository),
    each of which takes a little longer than on an idle machine, so that the
    calls arriving meanwhile queue up however fast the database answers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[list] = []
        originals = {name: getattr(ActorRepository, name) for name in ("by_ids", "by_accounts")}

        def spy(name: str):
            async def read(repo, keys):
                self.batches.append(list(keys))
                await asyncio.sleep(QUERY_DELAY_S)
                return await originals[name](repo, keys)

            return read

        for name in originals:
            monkeypatch.setattr(ActorRepository, name, spy(name))


def get(caller: Caller, actor_id: str, expect: str) -> Call:
    return Call(caller, "GetActor", actor_pb2.GetActorRequest(id=actor_id), expect)


def resolve(caller: Caller, expect: str, **fields: str) -> Call:
    return Call(caller, "ResolveActor", actor_pb2.ResolveActorRequest(**fields), expect)


async def outcome(stub, call: Call) -> str:
    try:
        actor = await getattr(stub, call.method)(call.request, metadata=call.caller.metadata)
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        assert details.info is not None and details.info.reason
        return error.code().name
    # Whatever a caller gets is its own (an admin's may be anyone's).
    assert call.caller.role == "admin" or actor.owner_id == str(call.caller.user_id)
    return actor.id


async def test_a_storm_of_mixed_callers_sees_only_its_own_rows(actor_stub, monkeypatch):
    users = [new_caller() for _ in range(3)]
    admin = new_caller("admin")
    own: dict[Caller, list[str]] = {}
    shared: dict[Caller, str] = {}  # each user's actor of the account all three track
    for n, user in enumerate(users):
        actors = [await create_actor(actor_stub, user, f"User {n} actor {i}") for i in range(4)]
        own[user] = [actor.id for actor in actors]
        for i, actor in enumerate(actors):
            await add_presence(
                actor_stub, user, actor.id, "twitter", f"u{n}-{i}", username=f"Handle{n}x{i}"
            )
        shared[user] = actors[0].id
        await add_presence(
            actor_stub, user, actors[1].id, "mastodon", "everyone", username="SameHandle"
        )
    latest_shared = own[users[-1]][1]  # the last account added wins an admin's resolve
    deleted = own[users[0]][3]
    await actor_stub.DeleteActor(
        actor_pb2.DeleteActorRequest(id=deleted), metadata=users[0].metadata
    )
    merged_away = own[users[1]][3]
    await merge(actor_stub, users[1], own[users[1]][2], merged_away)

    rng = random.Random(10)
    calls: list[Call] = []
    while len(calls) < CALLS:
        n = rng.randrange(3)
        user, other = users[n], users[(n + 1) % 3]
        i = rng.randrange(3)
        calls += [
            get(user, own[user][i], own[user][i]),
            get(user, own[other][i], NOT_FOUND),
            get(user, str(uuid.uuid4()), NOT_FOUND),
            get(user, "not-a-uuid", INVALID),
            resolve(user, own[user][i], platform="twitter", platform_user_id=f"u{n}-{i}"),
            resolve(user, own[user][i], platform="twitter", username=f"HANDLE{n}X{i}"),
            resolve(user, NOT_FOUND, platform="twitter", platform_user_id=f"u{(n + 1) % 3}-{i}"),
            resolve(user, own[user][1], platform="mastodon", platform_user_id="everyone"),
            resolve(user, own[user][1], platform="mastodon", username="samehandle"),
            resolve(user, NOT_FOUND, platform="mastodon", platform_user_id="nobody"),
            get(admin, own[other][i], own[other][i]),
            get(admin, str(uuid.uuid4()), NOT_FOUND),
            resolve(admin, own[user][i], platform="twitter", platform_user_id=f"u{n}-{i}"),
            resolve(admin, latest_shared, platform="mastodon", platform_user_id="everyone"),
            resolve(admin, NOT_FOUND, platform="reddit", username="nobody"),
        ]
    calls += [
        # A soft-deleted actor is still there for its owner (and resolves);
        # an actor merged away is gone for everyone.
        get(users[0], deleted, deleted),
        get(users[1], deleted, NOT_FOUND),
        resolve(users[0], deleted, platform="twitter", platform_user_id="u0-3"),
        get(users[1], merged_away, NOT_FOUND),
        get(admin, merged_away, NOT_FOUND),
        resolve(users[1], own[users[1]][2], platform="twitter", platform_user_id="u1-3"),
    ]
    rng.shuffle(calls)
    queries = Queries(monkeypatch)

    outcomes = await asyncio.gather(*(outcome(actor_stub, call) for call in calls))

    wrong = [
        (call.caller.role, call.method, str(call.request), call.expect, got)
        for call, got in zip(calls, outcomes, strict=True)
        if got != call.expect
    ]
    assert not wrong
    # The reads were coalesced, and batches mixed different owners' keys.
    reads = sum(call.expect != INVALID for call in calls)
    assert sum(len(keys) for keys in queries.batches) <= reads
    assert len(queries.batches) < reads / 4
    owner_of = {actor_id: user.user_id for user, ids in own.items() for actor_id in ids}

    def owners(keys: list) -> set:
        return {
            key.owner_id if isinstance(key, AccountKey) else owner_of.get(str(key)) for key in keys
        } - {None}

    assert any(len(owners(keys)) > 1 for keys in queries.batches)

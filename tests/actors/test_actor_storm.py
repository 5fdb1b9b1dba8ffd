"""ActorService's uniqueness rules and merges under a storm: several OS
processes, each with its own channel and many calls in flight."""

import asyncio

import grpc
import pytest
from observatory.v1 import actor_pb2

from tests.actors.helpers import (
    add_presence,
    content_by_author,
    create_actor,
    orphans,
    presences_by_actor,
    write_content,
)
from tests.helpers import error_details, in_processes

pytestmark = pytest.mark.asyncio
PROCESSES = 4
SERVICE = "/observatory.v1.ActorService"


def fire(port: int, token: str, method: str, requests: list[bytes]) -> list[tuple[str, bytes]]:
    """Runs in a child process: sends every serialized request to `method` at
    once; returns ("OK", response bytes) or ("CODE:REASON", b"") for each."""

    async def run() -> list[tuple[str, bytes]]:
        metadata = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None
            )

            async def one(request: bytes) -> tuple[str, bytes]:
                try:
                    return "OK", await call(request, metadata=metadata, timeout=60)
                except grpc.aio.AioRpcError as error:
                    return f"{error.code().name}:{error_details(error).reason}", b""

            return list(await asyncio.gather(*(one(r) for r in requests)))

    return asyncio.run(run())


async def storm(app, caller, method: str, per_process: list[list[bytes]]):
    calls = [(app.port, caller.token, method, requests) for requests in per_process]
    results = await in_processes(fire, calls)
    return [outcome for result in results for outcome in result]


async def audited(db, caller, action: str) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM audit_log WHERE user_id = $1 AND action = $2",
        caller.user_id,
        action,
    )


async def test_one_account_goes_to_one_actor_whoever_races_for_it(app, actor_stub, alice, db):
    actors = [await create_actor(actor_stub, alice, f"Claimant {i}") for i in range(PROCESSES)]
    # Every process asks, 12 times at once, for the account to go to its own actor.
    per_process = [
        [
            actor_pb2.AddPresenceRequest(
                presence=actor_pb2.Presence(
                    actor_id=actor.id, platform="twitter", platform_user_id="contested"
                )
            ).SerializeToString()
        ]
        * 12
        for actor in actors
    ]

    outcomes = await storm(app, alice, "AddPresence", per_process)

    winners = {
        actor_pb2.Presence.FromString(body).actor_id for status, body in outcomes if status == "OK"
    }
    assert len(winners) == 1
    statuses = {status for status, _ in outcomes}
    assert statuses <= {"OK", "ALREADY_EXISTS:ALREADY_EXISTS"}
    rows = await db.fetch("SELECT actor_id FROM actor_presences WHERE owner_id = $1", alice.user_id)
    assert [str(row["actor_id"]) for row in rows] == list(winners)
    ok = sum(status == "OK" for status, _ in outcomes)
    assert await audited(db, alice, "actor.add_presence") == ok


async def test_one_alias_is_added_once_whoever_races_for_it(app, actor_stub, alice, db):
    actor = await create_actor(actor_stub, alice)
    spellings = ["The Alias", "the alias", "THE ALIAS", "The alias"]
    per_process = [
        [actor_pb2.AddAliasRequest(actor_id=actor.id, alias=spelling).SerializeToString()] * 12
        for spelling in spellings
    ]

    outcomes = await storm(app, alice, "AddAlias", per_process)

    assert {status for status, _ in outcomes} == {"OK"}
    assert (
        await db.fetchval("SELECT count(*) FROM actor_aliases WHERE actor_id = $1::uuid", actor.id)
        == 1
    )
    assert await audited(db, alice, "actor.add_alias") == 1


ACTORS = 12
MERGES_PER_PROCESS = 6


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
    # Each merge folds two others into an actor, so every actor is wanted by
    # several merges at once, as canonical and as duplicate.
    per_process = [
        [
            actor_pb2.MergeActorsRequest(
                canonical_id=ids[(p * 3 + k) % ACTORS],
                duplicate_ids=[ids[(p * 3 + k + 1) % ACTORS], ids[(p * 3 + k + 5) % ACTORS]],
            ).SerializeToString()
            for k in range(MERGES_PER_PROCESS)
        ]
        for p in range(PROCESSES)
    ]

    outcomes = [status for status, _ in await storm(app, alice, "MergeActors", per_process)]

    # A merge that lost the race finds an actor gone: NOT_FOUND. Locking in ID
    # order means none ever deadlocks (which would surface as ABORTED).
    assert set(outcomes) <= {"OK", "NOT_FOUND:NOT_FOUND"}, outcomes
    succeeded = outcomes.count("OK")
    assert succeeded >= 1
    survivors = await db.fetchval("SELECT count(*) FROM actors WHERE owner_id = $1", alice.user_id)
    assert survivors == ACTORS - 2 * succeeded
    by_author = await content_by_author(db, alice)
    assert sum(by_author.values()) == total_content
    assert None not in by_author
    assert sum((await presences_by_actor(db, alice)).values()) == 2 * ACTORS
    assert await orphans(db, alice) == (0, 0)
    assert await audited(db, alice, "actor.merge") == succeeded

"""Uniqueness rules under a storm: several OS processes, each with its own
channel and many calls in flight, racing on one natural key or request_id."""

import asyncio
import uuid
from datetime import UTC, datetime

import grpc
import pytest
from observatory.v1 import content_pb2, content_pb2_grpc

from tests.helpers import error_details, in_processes, make_content, new_caller

pytestmark = pytest.mark.asyncio
PROCESSES = 4
CALLS_PER_PROCESS = 12
PUBLISHED = datetime(2026, 3, 3, 3, 3, tzinfo=UTC)


def storm(
    port: int, token: str, platform_ids: list[str], request_id: str
) -> list[tuple[str, str, str]]:
    """Runs in a child process: fires one CreateContent per platform_id at once
    and returns (status, reason, content id) for each."""

    async def run() -> list[tuple[str, str, str]]:
        metadata = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = content_pb2_grpc.ContentServiceStub(channel)

            async def create(platform_id: str) -> tuple[str, str, str]:
                request = content_pb2.CreateContentRequest(
                    content=make_content(
                        platform_id=platform_id, published_at=PUBLISHED, title="storm", url=""
                    ),
                    request_id=request_id,
                )
                try:
                    created = await stub.CreateContent(request, metadata=metadata, timeout=60)
                except grpc.aio.AioRpcError as error:
                    return error.code().name, error_details(error).reason, ""
                return "OK", "", created.id

            return list(await asyncio.gather(*(create(p) for p in platform_ids)))

    return asyncio.run(run())


async def _storm(app, caller, platform_ids: list[list[str]], request_id: str = ""):
    calls = [(app.port, caller.token, ids, request_id) for ids in platform_ids]
    results = await in_processes(storm, calls)
    return [outcome for result in results for outcome in result]


async def _stored(db, caller) -> int:
    return await db.fetchval("SELECT count(*) FROM content WHERE owner_id = $1", caller.user_id)


async def _audited(db, caller) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM audit_log WHERE user_id = $1 AND action = 'content.create'",
        caller.user_id,
    )


async def test_one_natural_key_is_stored_once_whoever_races_for_it(app, db):
    caller = new_caller()
    outcomes = await _storm(app, caller, [["same-key"] * CALLS_PER_PROCESS] * PROCESSES)

    statuses = [status for status, _, _ in outcomes]
    assert statuses.count("OK") == 1
    assert statuses.count("ALREADY_EXISTS") == PROCESSES * CALLS_PER_PROCESS - 1
    assert await _stored(db, caller) == 1
    assert await _audited(db, caller) == 1


async def test_one_request_id_creates_once_and_every_retry_gets_its_answer(app, db):
    caller = new_caller()
    request_id = str(uuid.uuid4())
    outcomes = await _storm(
        app, caller, [["retried"] * CALLS_PER_PROCESS] * PROCESSES, request_id=request_id
    )

    assert {status for status, _, _ in outcomes} == {"OK"}
    assert len({content_id for _, _, content_id in outcomes}) == 1
    assert await _stored(db, caller) == 1
    assert await _audited(db, caller) == 1


async def test_one_request_id_with_different_payloads_does_one_of_them(app, db):
    caller = new_caller()
    request_id = str(uuid.uuid4())
    payloads = [[f"variant-{p}"] * CALLS_PER_PROCESS for p in range(PROCESSES)]
    outcomes = await _storm(app, caller, payloads, request_id=request_id)

    succeeded = [content_id for status, _, content_id in outcomes if status == "OK"]
    reused = [reason for status, reason, _ in outcomes if status != "OK"]
    assert len(set(succeeded)) == 1
    assert set(reused) <= {"REQUEST_ID_REUSED"}
    assert len(succeeded) + len(reused) == PROCESSES * CALLS_PER_PROCESS
    assert await _stored(db, caller) == 1

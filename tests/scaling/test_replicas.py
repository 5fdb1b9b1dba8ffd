"""Read replicas: a server with a primary (DATABASE_URL) and a hot standby of
it (DATABASE_READ_URL), both real PostgreSQL servers on loopback.

Which server answered a read is told by the data: with the standby's replay
paused, a row written since is on the primary only."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from server import replicas
from server.app import App, create_server
from server.health import REPLICA_SERVICE
from tests.conftest import make_settings
from tests.helpers import Caller, error_details, make_content
from tests.ops.helpers import http_json
from tests.scaling.cluster import Cluster
from tests.scaling.conftest import DATABASE, MAX_LAG_S, wait_for_replay

pytestmark = pytest.mark.asyncio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LSN_TEXT = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")


@pytest.fixture
def stub(replicated_channel: grpc.aio.Channel) -> content_pb2_grpc.ContentServiceStub:
    return content_pb2_grpc.ContentServiceStub(replicated_channel)


@pytest_asyncio.fixture
async def standby_sql(cluster: Cluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cluster.standby.url(DATABASE))
    yield conn
    if not conn.is_closed():
        await conn.close()


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service)
    )
    return int(response.status)


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Seconds until `check()` holds; fails after `timeout`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < timeout:
        if await check():
            return loop.time() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


async def _create(
    stub: content_pb2_grpc.ContentServiceStub, caller: Caller
) -> tuple[content_pb2.Content, str]:
    """Creates a content; returns it and the x-observatory-lsn of the call."""
    call = stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content()), metadata=caller.metadata
    )
    created = await call
    trailers = dict(await call.trailing_metadata() or ())
    return created, str(trailers[replicas.LSN_KEY])


async def _listed_ids(
    stub: content_pb2_grpc.ContentServiceStub, caller: Caller, min_lsn: str | None = None
) -> set[str]:
    metadata = caller.metadata
    if min_lsn is not None:
        metadata = (*metadata, (replicas.MIN_LSN_KEY, min_lsn))
    response = await stub.ListContent(
        content_pb2.ListContentRequest(page_size=1000), metadata=metadata
    )
    return {item.id for item in response.contents}


async def _paused(standby: asyncpg.Connection, paused: bool) -> None:
    await standby.execute(
        "SELECT pg_wal_replay_pause()" if paused else "SELECT pg_wal_replay_resume()"
    )


async def test_read_units_use_the_standby_and_write_units_the_primary(replicated: App):
    units = replicated.units
    for unit in (units.read, units.snapshot):
        async with unit() as uow:
            assert uow.on_replica
            assert await uow.driver.fetchval("SELECT pg_is_in_recovery()")
    for unit in (units.write, units.autocommit):
        async with unit() as uow:
            assert not uow.on_replica
            assert not await uow.driver.fetchval("SELECT pg_is_in_recovery()")


async def test_read_rpcs_are_served_by_the_standby(
    replicated: App, replicated_channel, stub, alice, cluster, standby_sql
):
    created, _ = await _create(stub, alice)
    await wait_for_replay(cluster)
    served = replicated.replica.reads_served
    assert created.id in await _listed_ids(stub, alice)
    got = await stub.GetContent(
        content_pb2.GetContentRequest(id=created.id), metadata=alice.metadata
    )
    assert got.title == created.title
    assert replicated.replica.reads_served >= served + 2
    # The standby's own view: the server's pooled sessions read content there.
    readers = await standby_sql.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = 'observatory' AND query ILIKE 'SELECT content.id%FROM content%'"
    )
    assert readers >= 1
    assert await _health(replicated_channel, REPLICA_SERVICE) == SERVING
    state = replicas.replica_state(replicated.replica)
    assert state["status"] == "serving"
    assert state["in_recovery"] is True


async def test_every_write_returns_the_wal_position_after_its_commit(stub, alice, cluster):
    created, lsn = await _create(stub, alice)
    assert LSN_TEXT.fullmatch(lsn)
    updated = stub.UpdateContent(
        content_pb2.UpdateContentRequest(
            content=content_pb2.Content(id=created.id, title="New"),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        ),
        metadata=alice.metadata,
    )
    await updated
    later = dict(await updated.trailing_metadata() or ())[replicas.LSN_KEY]
    assert replicas.parse_lsn(later) > replicas.parse_lsn(lsn)
    # The position is one the standby reaches, and then it has the write.
    await wait_for_replay(cluster, later)
    standby = await asyncpg.connect(cluster.standby.url(DATABASE))
    try:
        title = await standby.fetchval(
            "SELECT title FROM content WHERE id = $1", uuid.UUID(created.id)
        )
    finally:
        await standby.close()
    assert title == "New"


async def test_reads_without_writes_return_no_position(stub, alice):
    call = stub.ListContent(content_pb2.ListContentRequest(), metadata=alice.metadata)
    await call
    assert replicas.LSN_KEY not in dict(await call.trailing_metadata() or ())


async def test_min_lsn_reads_wait_for_the_standby_or_go_to_the_primary(
    replicated: App, stub, alice, cluster, standby_sql
):
    replica = replicated.replica
    replica.max_lag_s = 3600  # this test is about read-your-writes, not lag
    await _paused(standby_sql, True)
    try:
        created, lsn = await _create(stub, alice)
        # Without the position: the paused standby answers, without the write.
        assert created.id not in await _listed_ids(stub, alice)
        # With it: the standby has not replayed that far, so the primary answers.
        diverted = replica.reads_diverted
        assert created.id in await _listed_ids(stub, alice, min_lsn=lsn)
        got = await stub.GetContent(
            content_pb2.GetContentRequest(id=created.id),
            metadata=(*alice.metadata, (replicas.MIN_LSN_KEY, lsn)),
        )
        assert got.id == created.id
        assert replica.reads_diverted >= diverted + 2
    finally:
        await _paused(standby_sql, False)
        replica.max_lag_s = MAX_LAG_S
    await wait_for_replay(cluster, lsn)
    await _eventually(lambda: _is(replicated, "serving"), 5, "the standby in use")
    # Once replayed, the standby serves the same request.
    served = replica.reads_served
    assert created.id in await _listed_ids(stub, alice, min_lsn=lsn)
    assert replica.reads_served == served + 1


async def test_a_malformed_min_lsn_is_invalid_argument(stub, alice):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _listed_ids(stub, alice, min_lsn="not-a-position")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(caught.value)
    assert details.info.reason == "INVALID_FIELD"
    assert details.bad_request.field_violations[0].field == replicas.MIN_LSN_KEY


async def test_a_standby_past_the_lag_bound_is_left_until_it_catches_up(
    replicated: App, replicated_channel, stub, alice, standby_sql
):
    await _paused(standby_sql, True)
    try:
        created, _ = await _create(stub, alice)
        took = await _eventually(
            lambda: _is(replicated, "lagging"), MAX_LAG_S + 5, "the standby counted as lagging"
        )
        assert took < MAX_LAG_S + 3
        state = replicas.replica_state(replicated.replica)
        assert state["replay_paused"] is True
        assert state["lag_s"] > MAX_LAG_S
        # Reads now come from the primary, which has the write.
        assert created.id in await _listed_ids(stub, alice)
        await _eventually(
            lambda: _health_is(replicated_channel, REPLICA_SERVICE, NOT_SERVING),
            3,
            "health reporting the replica unused",
        )
    finally:
        await _paused(standby_sql, False)
    await _eventually(lambda: _is(replicated, "serving"), 5, "the standby in use again")
    served = replicated.replica.reads_served
    assert created.id in await _listed_ids(stub, alice)
    assert replicated.replica.reads_served == served + 1


async def test_reads_fall_back_to_the_primary_when_the_standby_stops(
    replicated: App, replicated_channel, stub, alice, cluster
):
    created, _ = await _create(stub, alice)
    await wait_for_replay(cluster)
    assert await _is(replicated, "serving")
    await asyncio.to_thread(cluster.standby.stop)
    try:
        # Not one read fails: the first ones find the pooled standby
        # connections closed, and every one after goes to the primary.
        for _ in range(20):
            assert created.id in await _listed_ids(stub, alice)
        assert await _is(replicated, "down")
        await _eventually(
            lambda: _health_is(replicated_channel, REPLICA_SERVICE, NOT_SERVING),
            3,
            "health reporting the replica down",
        )
        assert await _health(replicated_channel, "") == SERVING
    finally:
        await asyncio.to_thread(cluster.standby.start)
    took = await _eventually(lambda: _is(replicated, "serving"), 10, "the standby back in use")
    assert took < 5
    served = replicated.replica.reads_served
    assert created.id in await _listed_ids(stub, alice)
    assert replicated.replica.reads_served == served + 1


async def test_reads_go_on_from_the_standby_while_the_primary_is_down(
    replicated: App, replicated_channel, stub, alice, cluster
):
    created, _ = await _create(stub, alice)
    await wait_for_replay(cluster)
    await asyncio.to_thread(cluster.primary.stop)
    try:
        await _eventually(
            lambda: _health_is(replicated_channel, "", NOT_SERVING), 5, "health NOT_SERVING"
        )
        assert await _health(replicated_channel, REPLICA_SERVICE) == SERVING
        for _ in range(5):
            assert created.id in await _listed_ids(stub, alice)
            got = await stub.GetContent(
                content_pb2.GetContentRequest(id=created.id), metadata=alice.metadata
            )
            assert got.id == created.id
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _create(stub, alice)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await asyncio.to_thread(cluster.primary.start)
    await _eventually(lambda: _health_is(replicated_channel, "", SERVING), 10, "health SERVING")
    again, lsn = await _create(stub, alice)
    assert LSN_TEXT.fullmatch(lsn)
    assert again.id in await _listed_ids(stub, alice, min_lsn=lsn)


async def _is(app: App, status: str) -> bool:
    return replicas.replica_state(app.replica)["status"] == status


async def _health_is(channel: grpc.aio.Channel, service: str, status: int) -> bool:
    return await _health(channel, service) == status


async def test_a_coalesced_point_read_still_honours_its_min_lsn(
    replicated: App, stub, alice, cluster, standby_sql
):
    replica = replicated.replica
    replica.max_lag_s = 3600
    others = [(await _create(stub, alice))[0].id for _ in range(3)]
    await wait_for_replay(cluster)
    await _paused(standby_sql, True)
    try:
        created, lsn = await _create(stub, alice)
        fresh = (*alice.metadata, (replicas.MIN_LSN_KEY, lsn))
        # Reads without the header keep a batch in flight; the fresh ones queue.
        calls = []
        for round_ in range(20):
            calls.append(
                stub.GetContent(
                    content_pb2.GetContentRequest(id=others[round_ % 3]), metadata=alice.metadata
                )
            )
            calls.append(
                stub.GetContent(content_pb2.GetContentRequest(id=created.id), metadata=fresh)
            )
        results = await asyncio.gather(*calls, return_exceptions=True)
        missed = [r for r in results[1::2] if isinstance(r, grpc.aio.AioRpcError)]
        assert not missed, f"{len(missed)} of 20 fresh reads did not see the write"
    finally:
        await _paused(standby_sql, False)
        replica.max_lag_s = MAX_LAG_S


async def test_readyz_reports_the_replica(cluster):
    await wait_for_replay(cluster)
    settings = make_settings(
        DATABASE_READ_URL=cluster.standby.url(DATABASE),
        OBSERVATORY_MAX_REPLICA_LAG_S=MAX_LAG_S,
        OBSERVATORY_HTTP_LISTEN="127.0.0.1:0",
    )
    app = await create_server(settings, cluster.primary.url(DATABASE))
    try:
        status, body = await http_json(app.side_port.port, "/readyz")
        assert status == 200
        assert body["replica"]["configured"] is True
        assert body["replica"]["in_recovery"] is True
        assert body["replica"]["lag_s"] <= MAX_LAG_S
    finally:
        await app.stop(0)

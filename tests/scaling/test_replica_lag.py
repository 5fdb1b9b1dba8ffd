"""server.replicas without a replica: WAL positions, the lag bound, and a
replica that cannot be reached."""

from __future__ import annotations

import pytest
import sqlalchemy.exc

from server import errors, replicas
from server.db import connect_directly, create_engine
from server.replicas import Observation, Replica, replay_lag
from server.uow import Database
from tests.conftest import make_settings
from tests.scaling.cluster import free_port

NOW = 1000.0


def _seen(received: int | None, replayed: int | None, since_replay_s: float | None) -> Observation:
    return Observation(
        in_recovery=True,
        received=received,
        replayed=replayed,
        since_replay_s=since_replay_s,
        paused=False,
    )


@pytest.mark.parametrize("text", ["0/0", "0/1A2B3C4", "16/B374D848", "FFFFFFFF/FFFFFFFF"])
def test_wal_positions_round_trip_in_postgresqls_text_form(text):
    assert replicas.format_lsn(replicas.parse_lsn(text)) == text


def test_wal_positions_compare_as_numbers():
    assert replicas.parse_lsn("1/0") > replicas.parse_lsn("0/FFFFFFFF")
    assert replicas.parse_lsn("0/1a") == 0x1A


@pytest.mark.parametrize("text", ["", "0", "0/", "/1", "0/123456789", "g/1", "0/1/2", "-1/0"])
def test_malformed_positions_are_refused(text):
    with pytest.raises(ValueError):
        replicas.parse_lsn(text)
    with pytest.raises(errors.InvalidArgument):
        _ = replicas.CallLsn(text or "x").min_lsn


def test_a_call_keeps_the_furthest_position_it_wrote():
    call = replicas.CallLsn()
    for position in (5, 9, 7):
        call.wrote(position)
    assert call.written == 9


def test_caught_up_is_no_lag_however_old_the_last_commit():
    # An idle primary: the last replayed commit is an hour old.
    assert replay_lag(_seen(100, 100, 3600.0), None, NOW) == 0.0


def test_a_replica_that_is_not_in_recovery_has_no_lag():
    seen = Observation(False, None, None, None, None)
    assert replay_lag(seen, None, NOW) == 0.0


def test_behind_under_steady_writes_the_last_replayed_commit_bounds_the_lag():
    assert replay_lag(_seen(200, 100, 0.2), NOW - 60, NOW) == pytest.approx(0.2)


def test_behind_after_a_quiet_spell_the_last_caught_up_probe_bounds_the_lag():
    # The last replayed commit is an hour old, but a probe 0.5 s ago found the
    # replica caught up: what it lacks is younger than that.
    assert replay_lag(_seen(200, 100, 3600.0), NOW - 0.5, NOW) == pytest.approx(0.5)


def test_behind_with_nothing_to_bound_it_is_unknown():
    assert replay_lag(_seen(200, 100, None), None, NOW) is None
    assert replay_lag(_seen(None, None, None), None, NOW) is None


@pytest.mark.asyncio
async def test_an_unreachable_replica_is_down_and_reads_use_the_primary(database_url):
    settings = make_settings()
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/observatory"
    replica = Replica(
        create_engine(settings, nowhere),
        lambda: connect_directly(nowhere),
        max_lag_s=5,
        interval=0.5,
    )
    units = Database(create_engine(settings, database_url), None, replica)
    try:
        await replica.probe()
        assert replicas.replica_state(replica)["status"] == "down"
        assert replicas.replica_state(replica)["error"]
        async with units.read() as uow:
            assert not uow.on_replica
            assert await uow.driver.fetchval("SELECT 1") == 1
        # Even a replica believed usable costs the read nothing when it fails.
        replica.usable = True
        async with units.snapshot() as uow:
            assert not uow.on_replica
        assert not replica.usable
        assert replica.reads_diverted == 1
    finally:
        await units.dispose()


@pytest.mark.asyncio
async def test_a_busy_replica_pool_is_not_a_failure():
    replica = Replica(
        create_engine(make_settings(), "postgresql://postgres@127.0.0.1:1/none"),
        lambda: connect_directly("postgresql://postgres@127.0.0.1:1/none"),
        max_lag_s=5,
        interval=0.5,
    )
    replica.usable = True
    await replica.failed(sqlalchemy.exc.TimeoutError("pool exhausted"))
    assert replica.usable
    await replica.dispose()


def test_no_replica_reports_not_configured():
    assert replicas.replica_state(None) == {"configured": False}
    assert replicas.from_settings(make_settings()) is None

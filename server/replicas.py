"""A streaming read replica (`DATABASE_READ_URL`) and read-your-writes.

`server.uow.Database` sends `read()` and `snapshot()` units to the replica
while `Replica.usable` holds (its probe reached it and its replay lag is within
`OBSERVATORY_MAX_REPLICA_LAG_S`), and everything else to the primary. The
choice is made when a unit opens, from what the probe last saw, so it costs no
round trip; a replica connection that fails marks the replica down at once,
and the units that follow go to the primary until a probe reaches it again.

Read-your-writes: each RPC has a `CallLsn` (set by the interceptor). A write
unit that commits records the primary's WAL insert position after its commit,
which the RPC returns as trailing metadata `x-observatory-lsn`; a read unit of
an RPC that carries `x-observatory-min-lsn` uses the replica only once the
replica has replayed that far.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import sqlalchemy.exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from server import errors
from server.db import connect_directly, create_engine
from server.periodic import Periodic
from server.settings import Settings

log = logging.getLogger(__name__)

LSN_KEY = "x-observatory-lsn"
MIN_LSN_KEY = "x-observatory-min-lsn"

# PostgreSQL's text form of a pg_lsn: two hexadecimal halves of 1 to 8 digits.
_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")

# What the probe asks the replica. `clock_timestamp()`, not `now()`: the time of
# this statement, not of a transaction. Replay pause is asked only in recovery,
# where the function is defined.
PROBE_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       pg_last_wal_receive_lsn()::text AS received,
       pg_last_wal_replay_lsn()::text AS replayed,
       extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8
           AS since_replay,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS paused
"""
REPLAY_LSN_SQL = "SELECT pg_last_wal_replay_lsn()::text"
# Where the primary's WAL ends right after a commit: at or past the end of that
# commit's record, whatever synchronous_commit is (pg_current_wal_lsn(), the
# write position, can still be before it when commits are asynchronous).
WRITTEN_LSN_SQL = "SELECT pg_current_wal_insert_lsn()::text"


def parse_lsn(text: str) -> int:
    """`'16/B374D848'` -> its 64-bit position; ValueError when malformed."""
    match = _LSN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a WAL position: {text[:40]!r}")
    return int(match[1], 16) << 32 | int(match[2], 16)


def format_lsn(position: int) -> str:
    """PostgreSQL's text form of a WAL position, e.g. `0/1A2B3C4`."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


class CallLsn:
    """The WAL positions of one RPC: the `x-observatory-min-lsn` it asked for
    and the furthest position its write units committed at. Mutable and shared
    by reference, so tasks an RPC spawns record into the same one."""

    __slots__ = ("_min_lsn", "_min_lsn_text", "written")

    def __init__(self, min_lsn_text: str | None = None) -> None:
        self._min_lsn_text = min_lsn_text
        self._min_lsn: int | None = None
        self.written: int | None = None

    @property
    def min_lsn(self) -> int | None:
        """The position the caller's reads must reflect; InvalidArgument when
        the header is malformed."""
        if self._min_lsn is None and self._min_lsn_text:
            try:
                self._min_lsn = parse_lsn(self._min_lsn_text)
            except ValueError:
                raise errors.InvalidArgument(
                    MIN_LSN_KEY, "must be a WAL position as PostgreSQL prints it, e.g. 0/1A2B3C4"
                ) from None
        return self._min_lsn

    def wrote(self, position: int) -> None:
        if self.written is None or position > self.written:
            self.written = position


_current_call: contextvars.ContextVar[CallLsn | None] = contextvars.ContextVar(
    "observatory_call_lsn", default=None
)


def begin_call(min_lsn_text: str | None) -> CallLsn:
    """Starts the WAL bookkeeping of the RPC running in this context."""
    call = CallLsn(min_lsn_text)
    _current_call.set(call)
    return call


def current_call() -> CallLsn | None:
    return _current_call.get()


def lsn_trailer() -> tuple[str, str] | None:
    """`(x-observatory-lsn, position)` when the current RPC committed a write."""
    call = _current_call.get()
    if call is None or call.written is None:
        return None
    return (LSN_KEY, format_lsn(call.written))


@dataclass(frozen=True, slots=True)
class Observation:
    """What one probe saw."""

    in_recovery: bool
    received: int | None
    replayed: int | None
    since_replay_s: float | None
    paused: bool | None


def replay_lag(seen: Observation, caught_up_at: float | None, now: float) -> float | None:
    """Seconds by which the replica's data trails the primary's, at most; None
    when nothing bounds it.

    Caught up (it replayed all it received) is 0, also when the primary has
    been idle for hours, or is down and no more WAL comes. Behind, the oldest
    unreplayed change is younger than both the last replayed commit (whose
    timestamp the replica knows) and the last probe that found it caught up, so
    the lag is at most the smaller of those two ages: the first is the tighter
    one under a steady stream of writes, the second after a burst that follows
    a quiet spell. WAL the replica has not received is not seen from here."""
    if not seen.in_recovery:
        return 0.0  # a primary of its own (promoted, or not a replica at all)
    if seen.replayed is None:
        return None
    if seen.received is None or seen.replayed >= seen.received:
        return 0.0
    bounds = [
        age
        for age in (
            seen.since_replay_s,
            None if caught_up_at is None else now - caught_up_at,
        )
        if age is not None
    ]
    return max(0.0, min(bounds)) if bounds else None


class Replica:
    """A streaming replica of the primary: its pool, and its state as the
    probe (every `interval` seconds, on a connection of its own) last saw it."""

    def __init__(
        self,
        engine: AsyncEngine,
        connect_directly: Callable[[], Awaitable[asyncpg.Connection]],
        *,
        max_lag_s: float,
        interval: float,
    ) -> None:
        self.engine = engine
        self.max_lag_s = max_lag_s
        self._connect = connect_directly
        self._interval = interval
        self._probe_conn: asyncpg.Connection | None = None
        self._loop = Periodic("replica-monitor", interval, self.probe)
        self._seen: Observation | None = None
        self._reachable: bool | None = None
        self._error: str | None = None
        self._lag_s: float | None = None
        self._caught_up_at: float | None = None
        self._replayed: int | None = None
        self._checked_at: float | None = None
        self.usable = False
        # Read units opened on the replica, and those sent to the primary
        # instead because it could not be reached or had not replayed far enough.
        self.reads_served = 0
        self.reads_diverted = 0

    # -- what units ask ------------------------------------------------------------

    def has_replayed(self, position: int) -> bool:
        """True when the replica is known to have replayed up to `position`."""
        return self._replayed is not None and self._replayed >= position

    def saw_replay(self, replayed: str | None) -> None:
        """A unit asked the replica how far it has replayed."""
        if replayed is not None:
            position = parse_lsn(replayed)
            if self._replayed is None or position > self._replayed:
                self._replayed = position

    async def failed(self, exc: BaseException) -> None:
        """Opening or using a replica connection failed. Units go to the primary
        until a probe reaches the replica again; its pooled connections, which
        predate the failure, are dropped. A pool with no free connection is not
        a failure: that one unit goes to the primary."""
        if isinstance(exc, sqlalchemy.exc.TimeoutError):
            return
        self._mark_down(exc)
        await self.engine.dispose(close=False)

    # -- the probe -------------------------------------------------------------------

    async def probe(self) -> None:
        """Asks the replica where it stands and updates `usable`."""
        try:
            # asyncio.timeout, not wait_for (see HealthMonitor.probe).
            async with asyncio.timeout(max(self._interval * 2, 2.0)):
                row = await self._ask()
        except Exception as exc:  # any failure to reach the replica
            if self._reachable is not False:
                await self.engine.dispose(close=False)
            self._mark_down(exc)
            return
        now = time.monotonic()
        seen = Observation(
            in_recovery=row["in_recovery"],
            received=None if row["received"] is None else parse_lsn(row["received"]),
            replayed=None if row["replayed"] is None else parse_lsn(row["replayed"]),
            since_replay_s=row["since_replay"],
            paused=row["paused"],
        )
        lag = replay_lag(seen, self._caught_up_at, now)
        if lag == 0.0:
            self._caught_up_at = now
        self._seen = seen
        self._reachable = True
        self._error = None
        self._lag_s = lag
        self._checked_at = now
        if seen.replayed is not None:
            self._replayed = seen.replayed
        self._set_usable(lag is not None and lag <= self.max_lag_s)

    async def _ask(self) -> asyncpg.Record:
        if self._probe_conn is None or self._probe_conn.is_closed():
            self._probe_conn = await self._connect()
        try:
            row: asyncpg.Record = await self._probe_conn.fetchrow(PROBE_SQL)
        except BaseException:
            probe, self._probe_conn = self._probe_conn, None
            probe.terminate()
            raise
        return row

    def _mark_down(self, exc: BaseException) -> None:
        self._reachable = False
        self._error = repr(exc)[:500]
        self._lag_s = None
        self._caught_up_at = None
        self._checked_at = time.monotonic()
        self._set_usable(False)

    def _set_usable(self, usable: bool) -> None:
        if usable == self.usable:
            return
        self.usable = usable
        if usable:
            log.info("read replica in use", extra={"lag_s": self._lag_s})
        else:
            log.warning(
                "read replica not in use: reads go to the primary",
                extra={"status": self.status, "lag_s": self._lag_s, "error": self._error},
            )

    # -- reporting ---------------------------------------------------------------------

    @property
    def status(self) -> str:
        """`serving` (reads go to it), `lagging` (reachable, too far behind),
        `down` (unreachable) or `unknown` (not probed yet)."""
        if self._reachable is None:
            return "unknown"
        if not self._reachable:
            return "down"
        return "serving" if self.usable else "lagging"

    def state(self) -> dict[str, Any]:
        """The replica's state for health and readiness reports."""
        seen = self._seen
        return {
            "configured": True,
            "status": self.status,
            "lag_s": None if self._lag_s is None else round(self._lag_s, 3),
            "max_lag_s": self.max_lag_s,
            "in_recovery": None if seen is None else seen.in_recovery,
            "replay_lsn": None if self._replayed is None else format_lsn(self._replayed),
            "replay_paused": None if seen is None else seen.paused,
            "checked_s_ago": (
                None if self._checked_at is None else round(time.monotonic() - self._checked_at, 3)
            ),
            "reads_served": self.reads_served,
            "reads_diverted": self.reads_diverted,
            "error": self._error,
        }

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._loop.start()

    async def dispose(self) -> None:
        await self._loop.stop()
        if self._probe_conn is not None:
            self._probe_conn.terminate()
            self._probe_conn = None
        await self.engine.dispose()


def from_settings(settings: Settings) -> Replica | None:
    """The replica `DATABASE_READ_URL` names (its pool sized like the
    primary's), or None when it is unset. Connects nothing yet."""
    url = settings.database_read_url
    if not url:
        return None
    # The probe's session says what it is in the replica's pg_stat_activity.
    probe_url = (
        make_url(url)
        .update_query_dict({"application_name": "observatory-replica-probe"})
        .render_as_string(hide_password=False)
    )
    return Replica(
        create_engine(settings, url),
        lambda: connect_directly(probe_url),
        max_lag_s=settings.max_replica_lag_s,
        interval=settings.health_interval,
    )


def replica_state(replica: Replica | None) -> dict[str, Any]:
    """The replica's state (`Replica.state()`), or `{"configured": False}`."""
    return {"configured": False} if replica is None else replica.state()

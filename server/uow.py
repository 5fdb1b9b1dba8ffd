"""Units of work: each RPC gets one pooled connection and at most one
transaction, opened and closed here and nowhere else.

An RPC declares what it needs:

- `Database.read()`: reads of one statement each. No transaction and no
  BEGIN/COMMIT round trips: every statement is its own consistent read.
- `Database.snapshot()`: several reads that must agree: one
  REPEATABLE READ READ ONLY transaction, so they all see one snapshot.
- `Database.write()`: a READ COMMITTED read-write transaction that commits
  when its block succeeds and rolls back on any error.
- `Database.autocommit()`: statements that write, each its own transaction
  (one statement that does all its work, e.g. a data-modifying CTE or a
  server-side function, needs no BEGIN/COMMIT round trips).

`read()` and `snapshot()` units use the read replica (DATABASE_READ_URL)
while it is usable and the primary otherwise; the other two always use the
primary (see server.replicas). A read unit must therefore never write. Inside
an RPC, a `write()` or `autocommit()` unit that succeeds records the primary's
WAL position after it, for the RPC's `x-observatory-lsn`: asked once for all
the units that committed meanwhile, on a connection of its own, after the
unit has given its pooled connection back (WalPositions).

Inside, `uow.conn` (SQLAlchemy Core) and `uow.driver` (the raw asyncpg
connection, for COPY, cursors and prepared statements) are the same
connection and the same transaction. SQLAlchemy runs in autocommit mode and
never opens a transaction of its own; the transaction is the driver's, started
and ended by the unit.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import Pool, PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from server import deadlines, errors, replicas
from server.coalesce import Batches
from server.db import classify_database_error, sqlstate
from server.replicas import Replica

log = logging.getLogger(__name__)


class Mode(enum.Enum):
    READ = "read"
    SNAPSHOT = "snapshot"
    WRITE = "write"
    AUTOCOMMIT = "autocommit"


# Session settings (SET, not SET LOCAL) last as long as the pooled connection;
# what each connection was last told is remembered here, so a setting costs a
# round trip only when it changes.
_session_settings: weakref.WeakKeyDictionary[asyncpg.Connection, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(slots=True)
class UnitOfWork:
    """One RPC's connection, seen through SQLAlchemy Core (`conn`) and the
    driver (`driver`), and its mode."""

    conn: AsyncConnection
    driver: asyncpg.Connection
    mode: Mode
    # True when the unit reads from the replica rather than the primary.
    on_replica: bool = False

    @property
    def writable(self) -> bool:
        return self.mode is Mode.WRITE or self.mode is Mode.AUTOCOMMIT

    def savepoint(self) -> Any:
        """A nested transaction (SAVEPOINT) inside a write: a failure inside it
        undoes only its own statements. Use as `async with uow.savepoint():`."""
        assert self.mode is Mode.WRITE, "savepoints belong to write units"
        return self.driver.transaction()

    async def try_advisory_lock(self, name: str) -> bool:
        """Takes the transaction-scoped advisory lock `name` if no other session
        holds it: work that every server of a fleet runs (sweeps, clean-ups)
        runs on one at a time, and the others skip their turn."""
        assert self.mode is Mode.WRITE, "a transaction-scoped lock needs a write unit"
        taken: bool = await self.driver.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext($1))", name
        )
        return taken

    async def use_settings(self, values: Mapping[str, str]) -> None:
        """Makes the session settings `values` (e.g. `hnsw.ef_search`) hold on
        this connection, in one round trip and only for those that differ from
        what this connection already has. Everything that depends on such a
        setting must call this first, since the connection is shared."""
        known = _session_settings.setdefault(self.driver, {})
        changed = {name: value for name, value in values.items() if known.get(name) != value}
        if not changed:
            return
        # set_config takes its values as parameters: nothing is spliced into SQL.
        names = list(changed)
        await self.driver.execute(
            "SELECT "
            + ", ".join(
                f"set_config(${2 * i + 1}, ${2 * i + 2}, false)" for i in range(len(names))
            ),
            *[part for name in names for part in (name, changed[name])],
        )
        if not self.driver.is_in_transaction():
            known.update(changed)
        else:
            # Inside a transaction a SET is undone by a rollback: remember it
            # only once the unit has committed (see Database._unit).
            _pending_settings[self.driver] = {**_pending_settings.get(self.driver, {}), **changed}

    async def export_snapshot(self) -> ExportedSnapshot:
        """This snapshot unit's snapshot, for `Database.snapshot_of` units to
        read too (on another connection, e.g. to run a statement beside this
        unit's). It can be imported while this unit lasts."""
        assert self.mode is Mode.SNAPSHOT, "only a snapshot unit exports its snapshot"
        snapshot_id = str(await self.driver.fetchval("SELECT pg_export_snapshot()"))
        return ExportedSnapshot(snapshot_id, self.on_replica)

    async def use_local_settings(self, values: Mapping[str, str]) -> None:
        """Makes the settings `values` hold for the rest of this unit's
        transaction only (SET LOCAL), in one round trip: they end with it,
        committed or rolled back, and the connection goes back to the pool as
        it was. Needs a unit with a transaction (snapshot or write)."""
        assert self.mode is Mode.SNAPSHOT or self.mode is Mode.WRITE, (
            "local settings belong to units with a transaction"
        )
        if not values:
            return
        # set_config takes its values as parameters: nothing is spliced into SQL.
        await self.driver.execute(
            "SELECT "
            + ", ".join(
                f"set_config(${2 * i + 1}, ${2 * i + 2}, true)" for i in range(len(values))
            ),
            *[part for item in values.items() for part in item],
        )


_pending_settings: weakref.WeakKeyDictionary[asyncpg.Connection, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True, slots=True)
class ExportedSnapshot:
    """A snapshot unit's snapshot (`UnitOfWork.export_snapshot`): its ID as
    pg_export_snapshot() gives it, and which server holds it."""

    id: str
    on_replica: bool


# What pg_export_snapshot() returns (e.g. 00000003-0000001B-1): checked before
# it is spliced into SET TRANSACTION SNAPSHOT, which takes no parameters.
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?")


def _connection_is_sound(exc: BaseException) -> bool:
    """True when the connection is fine after `exc` and can be rolled back and
    reused: our own errors, errors the server reported about a statement, and
    errors the driver raised before sending anything. False when a statement
    may have been interrupted (cancellation) or the connection broke."""
    if isinstance(exc, errors.ObservatoryError):
        return True
    driver_error = getattr(exc, "orig", None) or exc.__cause__ or exc
    if isinstance(driver_error, asyncpg.DataError) and sqlstate(exc) in (None, "22000"):
        # Refused by the driver while binding a parameter: the statement was
        # parsed but never run, and the session is left inside an implicit
        # transaction that the next unit would trip over.
        return False
    classified = classify_database_error(exc)
    if classified is not None:
        return not isinstance(classified, errors.Unavailable)
    return sqlstate(exc) is not None


def _database_went_away(exc: BaseException) -> bool:
    """The server itself shut down or the network to it failed (not merely one
    session ended): the other pooled connections are suspect too."""
    code = sqlstate(exc)
    return code is not None and (code.startswith("08") or code in {"57P01", "57P02", "57P03"})


class Database:
    """Hands out units of work: writes from the primary's pool, reads from the
    replica's while it is usable (see server.replicas), otherwise from the
    primary's. Nothing else in the code base begins, commits or rolls back a
    transaction."""

    def __init__(
        self,
        engine: AsyncEngine,
        connect_directly: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
        replica: Replica | None = None,
        statement_timeout_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.replica = replica
        # OBSERVATORY_STATEMENT_TIMEOUT_S, which every pooled session starts
        # with (server.db.create_engine); a call with a nearer deadline gets less.
        self.statement_timeout_s = statement_timeout_s
        self._connect_directly = connect_directly
        self._probe: asyncpg.Connection | None = None
        self.wal_positions = WalPositions(engine, connect_directly)

    def read(self) -> Any:
        """`async with db.read() as uow`: single-statement reads, no transaction;
        on the replica when it is usable."""
        return self._unit(Mode.READ)

    def snapshot(self) -> Any:
        """`async with db.snapshot() as uow`: reads of one consistent snapshot;
        on the replica when it is usable."""
        return self._unit(Mode.SNAPSHOT)

    def write(self) -> Any:
        """`async with db.write() as uow`: one read-write transaction."""
        return self._unit(Mode.WRITE)

    def autocommit(self) -> Any:
        """`async with db.autocommit() as uow`: statements that may write, each
        committing on its own (no BEGIN/COMMIT round trips), on the primary."""
        return self._unit(Mode.AUTOCOMMIT)

    def driver_read(self) -> Any:
        """`async with db.driver_read() as uow`: a `read()` unit for work done
        on `uow.driver` alone (server.coalesce's batches). Its connection comes
        from the pool without a SQLAlchemy Connection around it, which halves
        the cost of the checkout; `uow.conn` is never started and raises if
        used."""
        return self._unit(Mode.READ, driver_only=True)

    def driver_autocommit(self) -> Any:
        """`async with db.driver_autocommit() as uow`: an `autocommit()` unit
        for writes done on `uow.driver` alone (one statement that does all its
        work, e.g. a server-side function); the cheaper checkout of
        `driver_read()`, and `uow.conn` raises if used."""
        return self._unit(Mode.AUTOCOMMIT, driver_only=True)

    def snapshot_of(self, exported: ExportedSnapshot) -> Any:
        """`async with db.snapshot_of(exported) as uow`: a snapshot unit that
        reads exactly the snapshot `exported` (of a unit still open), on the
        same server, on a connection of its own."""
        if not _SNAPSHOT_ID.fullmatch(exported.id):
            raise ValueError(f"not a snapshot ID: {exported.id!r}")
        return self._unit(Mode.SNAPSHOT, imported=exported)

    def has_idle_connection(self, on_replica: bool = False) -> bool:
        """Whether the pool (the replica's, or the primary's) has an idle
        connection right now: a unit opened now, which is optional work,
        would take no connection that another caller is waiting for."""
        engine = self.replica.engine if on_replica and self.replica is not None else self.engine
        checkedin = getattr(engine.pool, "checkedin", None)
        return checkedin is not None and int(checkedin()) > 0

    @asynccontextmanager
    async def _unit(
        self,
        mode: Mode,
        *,
        driver_only: bool = False,
        imported: ExportedSnapshot | None = None,
    ) -> AsyncIterator[UnitOfWork]:
        if imported is None:
            conn, driver, on_replica = await self._open(mode, driver_only)
        else:
            engine = self.engine
            if imported.on_replica:
                assert self.replica is not None, "a replica's snapshot without a replica"
                engine = self.replica.engine
            conn, driver = await _checkout(engine)
            on_replica = imported.on_replica
        committed = False
        try:
            timeout = self._statement_timeout(driver)
            if mode is Mode.READ or mode is Mode.AUTOCOMMIT:
                unit = UnitOfWork(conn, driver, mode, on_replica)
                if timeout is not None:
                    await unit.use_settings({"statement_timeout": timeout})
                yield unit
            else:
                transaction = driver.transaction(
                    isolation="repeatable_read" if mode is Mode.SNAPSHOT else "read_committed",
                    readonly=mode is Mode.SNAPSHOT,
                )
                await transaction.start()
                if imported is not None:
                    # First in the transaction, before any query (checked ID).
                    await driver.execute(f"SET TRANSACTION SNAPSHOT '{imported.id}'")
                if (
                    timeout is not None
                    and timeout != _session_settings[driver]["statement_timeout"]
                ):
                    # For this transaction only (SET LOCAL): nothing to remember.
                    await driver.execute(
                        "SELECT set_config('statement_timeout', $1, true)", timeout
                    )
                try:
                    yield UnitOfWork(conn, driver, mode, on_replica)
                except BaseException as exc:
                    _pending_settings.pop(driver, None)
                    if _connection_is_sound(exc):
                        await transaction.rollback()
                    raise
                await transaction.commit()
                settled = _pending_settings.pop(driver, None)
                if settled:
                    _session_settings.setdefault(driver, {}).update(settled)
            committed = mode is Mode.WRITE or mode is Mode.AUTOCOMMIT
        except BaseException as exc:
            if not _connection_is_sound(exc):
                # Cancelled mid-statement, or the connection broke: its state is
                # unknown, so it is closed instead of going back to the pool.
                _session_settings.pop(driver, None)
                _pending_settings.pop(driver, None)
                await conn.invalidate()
                if isinstance(classify_database_error(exc), errors.Unavailable):
                    if on_replica:
                        assert self.replica is not None
                        await self.replica.failed(exc)
                    elif _database_went_away(exc):
                        # The server restarted or went away: the other pooled
                        # connections date from before it, so none is reused.
                        # (One session ended, e.g. by a timeout, costs only
                        # itself; closed connections are skipped at checkout.)
                        await self.engine.dispose(close=False)
            raise
        finally:
            _check_in(conn)
        if committed:
            await self._record_written_lsn()

    async def _record_written_lsn(self) -> None:
        """After a write unit committed inside an RPC: the primary's WAL position
        then, which the RPC returns as x-observatory-lsn (read-your-writes). The
        write stands whatever happens here; should the question fail, the RPC
        answers without the position."""
        call = replicas.current_call()
        if call is None:
            return
        try:
            position = await self.wal_positions.after_commit()
        except Exception as exc:
            log.warning(
                "could not read the WAL position after a commit", extra={"error": repr(exc)}
            )
            return
        call.wrote(position)

    def _statement_timeout(self, driver: asyncpg.Connection) -> str | None:
        """The statement_timeout this unit's statements must run under: the
        ceiling, or less when the call's deadline is nearer (rounded to a short
        ladder, so a steady client's units rarely change it)."""
        if self.statement_timeout_s is None:
            return None
        ceiling = f"{max(1, int(self.statement_timeout_s * 1000))}ms"  # as create_engine sets it
        # A fresh session starts with the ceiling: nothing to send for it.
        _session_settings.setdefault(driver, {}).setdefault("statement_timeout", ceiling)
        return f"{deadlines.statement_timeout_ms(self.statement_timeout_s)}ms"

    async def _open(
        self, mode: Mode, driver_only: bool = False
    ) -> tuple[AsyncConnection, asyncpg.Connection, bool]:
        """The unit's connection: the replica's when the unit only reads, the
        replica is usable and (for a caller that sent x-observatory-min-lsn) has
        replayed far enough; otherwise the primary's."""
        if mode is Mode.READ or mode is Mode.SNAPSHOT:
            call = replicas.current_call()
            min_lsn = None if call is None else call.min_lsn
            if self.replica is not None and self.replica.usable:
                opened = await _open_on_replica(self.replica, min_lsn, driver_only)
                if opened is not None:
                    self.replica.reads_served += 1
                    return (*opened, True)
                self.replica.reads_diverted += 1
        return (*await _checkout(self.engine, driver_only), False)

    @property
    def pool(self) -> Pool:
        return self.engine.pool

    async def ping(self) -> None:
        """`SELECT 1` on the primary, on a connection of the probe's own outside
        the pool, so callers who hold every pooled connection never make the
        database look down (without `connect_directly`, through the pool)."""
        if self._connect_directly is None:
            conn, driver = await _checkout(self.engine)
            try:
                await driver.execute("SELECT 1")
            except BaseException:
                await conn.invalidate()
                raise
            finally:
                await conn.close()
            return
        if self._probe is None or self._probe.is_closed():
            self._probe = await self._connect_directly()
        try:
            await self._probe.execute("SELECT 1")
        except BaseException:
            probe, self._probe = self._probe, None
            probe.terminate()
            raise

    async def dispose(self) -> None:
        """Closes the pools, the replica's included, and the probe connections."""
        if self._probe is not None:
            self._probe.terminate()
            self._probe = None
        self.wal_positions.close()
        if self.replica is not None:
            await self.replica.dispose()
        await self.engine.dispose()


class _PooledDriver(AsyncConnection):
    """A pooled connection checked out without a SQLAlchemy Connection around
    it (`Database.driver_read()`). It is never started, so using it through
    SQLAlchemy raises; `invalidate()` and `close()` act on the pooled
    connection."""

    def __init__(self, engine: AsyncEngine, pooled: PoolProxiedConnection) -> None:
        super().__init__(engine)
        self._pooled: PoolProxiedConnection | None = pooled

    async def get_raw_connection(self) -> PoolProxiedConnection:
        assert self._pooled is not None, "the connection was given back"
        return self._pooled

    async def invalidate(self, exception: BaseException | None = None) -> None:
        pooled, self._pooled = self._pooled, None
        if pooled is not None:
            await greenlet_spawn(pooled.invalidate, exception)  # also checks it in

    async def close(self) -> None:
        self.check_in()

    def check_in(self) -> None:
        pooled, self._pooled = self._pooled, None
        if pooled is not None:
            pooled.close()


def _check_in(conn: AsyncConnection) -> None:
    """Gives a unit's connection back to the pool right here, not in a
    greenlet of its own as `await conn.close()` would: SQLAlchemy never began
    a transaction on it (it runs in autocommit; the unit's transaction is the
    driver's, already ended), so resetting it awaits nothing. A new greenlet
    costs ~15 us of CPU: CPython 3.11 maps and unmaps a frame-stack chunk for
    each one."""
    if isinstance(conn, _PooledDriver):
        conn.check_in()
    elif conn.sync_connection is not None:
        conn.sync_connection.close()


async def _checkout(
    engine: AsyncEngine, driver_only: bool = False
) -> tuple[AsyncConnection, asyncpg.Connection]:
    """A pooled connection in autocommit mode (the unit, not SQLAlchemy, owns
    any transaction) and its driver connection; with `driver_only`, taken
    from the pool directly (see _PooledDriver). Pooled connections the server
    has already closed (it restarted, or ended their sessions) are dropped on
    the way, which costs no round trip and spares the caller an error."""
    for _ in range(_MAX_CLOSED_SKIPPED):
        conn: AsyncConnection
        if driver_only:
            conn = _PooledDriver(engine, await engine.raw_connection())
        else:
            conn = await engine.connect()
        try:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert isinstance(driver, asyncpg.Connection)
        except BaseException:
            await conn.close()
            raise
        if not driver.is_closed():
            return conn, driver
        await conn.invalidate()
        await conn.close()
    raise asyncpg.ConnectionDoesNotExistError("every pooled connection was closed")


# More than any pool holds: new connections are open, so the loop ends sooner.
_MAX_CLOSED_SKIPPED = 256


async def _open_on_replica(
    replica: Replica, min_lsn: int | None, driver_only: bool = False
) -> tuple[AsyncConnection, asyncpg.Connection] | None:
    """A replica connection for a read unit, or None when the unit should go to
    the primary: the replica could not be reached (it is then marked down), or
    it has not yet replayed `min_lsn`. Asks the replica only when its last known
    replay position is short of `min_lsn`."""
    try:
        conn, driver = await _checkout(replica.engine, driver_only)
    except Exception as exc:
        await replica.failed(exc)
        return None
    if min_lsn is None or replica.has_replayed(min_lsn):
        return conn, driver
    try:
        replica.saw_replay(await driver.fetchval(replicas.REPLAY_LSN_SQL))
    except BaseException as exc:
        await conn.invalidate()
        await conn.close()
        if not isinstance(exc, Exception):
            raise
        await replica.failed(exc)
        return None
    if replica.has_replayed(min_lsn):
        return conn, driver
    await conn.close()
    return None


# Commits one WAL-position question answers at the most (all that queued).
_MAX_ANSWERED = 100_000


class WalPositions:
    """Where the primary's WAL ends right after commits (WRITTEN_LSN_SQL), for
    x-observatory-lsn. One question answers every unit that committed before
    it was sent: a unit that finds a question in flight (sent, perhaps,
    before its commit) waits for the next one (server.coalesce.Batches). The
    questions go one at a time over a connection of their own outside the
    pool (without `connect_directly`, a pooled one per question), so a write
    unit's pooled connection goes back as soon as it commits, and concurrent
    writers share one round trip."""

    def __init__(
        self,
        engine: AsyncEngine,
        connect_directly: Callable[[], Awaitable[asyncpg.Connection]] | None,
    ) -> None:
        self._engine = engine
        self._connect_directly = connect_directly
        self._conn: asyncpg.Connection | None = None
        self._one_at_a_time = asyncio.Lock()
        self._batches: Batches[None, None, int] = Batches(self._ask, _MAX_ANSWERED)

    async def after_commit(self) -> int:
        """A WAL position at or past the end of every commit made before the call."""
        return (await self._batches.submit(None, (None,)))[0]

    async def _ask(self, _: None, commits: Sequence[None]) -> list[int]:
        async with self._one_at_a_time:
            position = replicas.parse_lsn(await self._fetch())
        return [position] * len(commits)

    async def _fetch(self) -> str:
        if self._connect_directly is None:
            conn, driver = await _checkout(self._engine, driver_only=True)
            try:
                return str(await driver.fetchval(replicas.WRITTEN_LSN_SQL))
            except BaseException as exc:
                if not _connection_is_sound(exc):
                    await conn.invalidate()
                raise
            finally:
                await conn.close()
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect_directly()
        try:
            return str(await self._conn.fetchval(replicas.WRITTEN_LSN_SQL))
        except BaseException:
            # Cancelled mid-question, or the connection broke: the next
            # question opens a new one.
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

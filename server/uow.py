"""Units of work: each RPC gets one pooled connection and at most one
transaction, opened and closed here and nowhere else.

An RPC declares what it needs:

- `Database.read()`: reads of one statement each. No transaction and no
  BEGIN/COMMIT round trips: every statement is its own consistent read.
- `Database.snapshot()`: several reads that must agree: one
  REPEATABLE READ READ ONLY transaction, so they all see one snapshot.
- `Database.write()`: a READ COMMITTED read-write transaction that commits
  when its block succeeds and rolls back on any error.

Inside, `uow.conn` (SQLAlchemy Core) and `uow.driver` (the raw asyncpg
connection, for COPY, cursors and prepared statements) are the same
connection and the same transaction. SQLAlchemy runs in autocommit mode and
never opens a transaction of its own; the transaction is the driver's, started
and ended by the unit.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import Pool

from server import errors
from server.db import classify_database_error, sqlstate


class Mode(enum.Enum):
    READ = "read"
    SNAPSHOT = "snapshot"
    WRITE = "write"


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

    @property
    def writable(self) -> bool:
        return self.mode is Mode.WRITE

    def savepoint(self) -> Any:
        """A nested transaction (SAVEPOINT) inside a write: a failure inside it
        undoes only its own statements. Use as `async with uow.savepoint():`."""
        assert self.mode is Mode.WRITE, "savepoints belong to write units"
        return self.driver.transaction()

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
        if self.mode is Mode.READ:
            known.update(changed)
        else:
            # Inside a transaction a SET is undone by a rollback: remember it
            # only once the unit has committed (see Database._unit).
            _pending_settings[self.driver] = {**_pending_settings.get(self.driver, {}), **changed}


_pending_settings: weakref.WeakKeyDictionary[asyncpg.Connection, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


def _connection_is_sound(exc: BaseException) -> bool:
    """True when `exc` is an error the server reported about a statement (the
    connection is fine and can be rolled back and reused)."""
    if isinstance(exc, errors.ObservatoryError):
        return True
    code = sqlstate(exc)
    if code is None:
        return False
    return not isinstance(classify_database_error(exc), errors.Unavailable)


class Database:
    """Hands out units of work from one pool. Nothing else in the code base
    begins, commits or rolls back a transaction."""

    def __init__(
        self,
        engine: AsyncEngine,
        connect_directly: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
    ) -> None:
        self.engine = engine
        self._connect_directly = connect_directly
        self._probe: asyncpg.Connection | None = None

    def read(self) -> Any:
        """`async with db.read() as uow`: single-statement reads, no transaction."""
        return self._unit(Mode.READ)

    def snapshot(self) -> Any:
        """`async with db.snapshot() as uow`: reads of one consistent snapshot."""
        return self._unit(Mode.SNAPSHOT)

    def write(self) -> Any:
        """`async with db.write() as uow`: one read-write transaction."""
        return self._unit(Mode.WRITE)

    @asynccontextmanager
    async def _unit(self, mode: Mode) -> AsyncIterator[UnitOfWork]:
        conn = await self.engine.connect()
        try:
            # TRANSITIONAL: until every domain uses units, the engine is not
            # autocommit; SQLAlchemy must never open a transaction of its own.
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert isinstance(driver, asyncpg.Connection)
        except BaseException:
            await conn.close()
            raise
        try:
            if mode is Mode.READ:
                yield UnitOfWork(conn, driver, mode)
                return
            transaction = driver.transaction(
                isolation="repeatable_read" if mode is Mode.SNAPSHOT else "read_committed",
                readonly=mode is Mode.SNAPSHOT,
            )
            await transaction.start()
            try:
                yield UnitOfWork(conn, driver, mode)
            except BaseException as exc:
                _pending_settings.pop(driver, None)
                if _connection_is_sound(exc):
                    await transaction.rollback()
                raise
            await transaction.commit()
            settled = _pending_settings.pop(driver, None)
            if settled:
                _session_settings.setdefault(driver, {}).update(settled)
        except BaseException as exc:
            if not _connection_is_sound(exc):
                # Cancelled mid-statement, or the connection broke: its state is
                # unknown, so it is closed instead of going back to the pool.
                _session_settings.pop(driver, None)
                _pending_settings.pop(driver, None)
                await conn.invalidate()
                if isinstance(classify_database_error(exc), errors.Unavailable):
                    # As SQLAlchemy does on a disconnect: the other pooled
                    # connections date from before it, so none is reused.
                    await self.engine.dispose(close=False)
            raise
        finally:
            await conn.close()

    @property
    def pool(self) -> Pool:
        return self.engine.pool

    async def ping(self) -> None:
        """`SELECT 1` on a connection of the probe's own, outside the pool, so
        callers who hold every pooled connection never make the database look
        down (without `connect_directly`, through the pool)."""
        if self._connect_directly is None:
            async with self.read() as uow:
                await uow.driver.execute("SELECT 1")
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
        if self._probe is not None:
            self._probe.terminate()
            self._probe = None
        await self.engine.dispose()

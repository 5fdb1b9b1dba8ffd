"""Engine construction, units of work, and database error classification."""

from __future__ import annotations

import ssl as ssl_module
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import sqlalchemy.exc
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.util import greenlet_spawn

from server import errors
from server.settings import Settings

# libpq's sslmode names are also what asyncpg's `ssl` argument takes.
_SSL_MODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}
# libpq-only parameters that asyncpg does not understand; dropped with no effect
# on security (asyncpg negotiates SCRAM channel binding on its own when it can).
_DROPPED_PARAMS = {"channel_binding", "gssencmode", "target_session_attrs", "pgbouncer"}


def normalize_database_url(raw: str) -> tuple[URL, dict[str, Any]]:
    """Turn any of postgres://, postgresql://, postgresql+asyncpg:// into an
    asyncpg SQLAlchemy URL plus the connect arguments its query implied."""
    url = make_url(
        raw.replace("postgres://", "postgresql://", 1) if raw.startswith("postgres://") else raw
    )
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"DATABASE_URL must be a PostgreSQL URL, not {url.get_backend_name()!r}")
    query = dict(url.query)
    connect_args: dict[str, Any] = {}
    sslmode = query.pop("sslmode", None) or query.pop("ssl", None)
    if sslmode is not None:
        mode = str(sslmode)
        if mode not in _SSL_MODES:
            raise ValueError(f"unknown sslmode {mode!r}")
        if mode != "disable":
            root_cert = query.pop("sslrootcert", None)
            if root_cert and mode in {"verify-ca", "verify-full"}:
                context = ssl_module.create_default_context(cafile=str(root_cert))
                context.check_hostname = mode == "verify-full"
                connect_args["ssl"] = context
            else:
                connect_args["ssl"] = mode
        else:
            connect_args["ssl"] = False
    if "application_name" in query:
        connect_args["server_settings"] = {"application_name": str(query.pop("application_name"))}
    if "connect_timeout" in query:
        connect_args["timeout"] = float(str(query.pop("connect_timeout")))
    for name in _DROPPED_PARAMS:
        query.pop(name, None)
    return url.set(drivername="postgresql+asyncpg", query=query), connect_args


async def connect_directly(database_url: str) -> asyncpg.Connection:
    """A driver connection of its own, outside the pool (for the health probe)."""
    url, connect_args = normalize_database_url(database_url)
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    connection: asyncpg.Connection = await asyncpg.connect(dsn, **connect_args)
    return connection


def wants_pgbouncer(raw: str) -> bool:
    """`?pgbouncer=true` in the URL, the convention other tools use."""
    flag = make_url(raw.replace("postgres://", "postgresql://", 1)).query.get("pgbouncer", "")
    return str(flag).lower() in {"1", "true", "yes"}


def create_engine(settings: Settings, database_url: str) -> AsyncEngine:
    url, connect_args = normalize_database_url(database_url)
    connect_args.setdefault("server_settings", {}).setdefault("application_name", "observatory")
    if settings.pgbouncer or wants_pgbouncer(database_url):
        # Transaction-mode poolers hand each transaction a different backend:
        # no statement caches, and unique names for the unnamed statements.
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = lambda: f"__asyncpg_{uuid.uuid4()}__"
    return create_async_engine(
        url,
        # QueuePool closes an overflow connection as soon as it is returned, so
        # steady concurrency above pool_size would open and close connections
        # all the time. Instead the pool opens connections as they are needed,
        # up to pool_size + max_overflow, and keeps them (pool_recycle bounds
        # their age).
        pool_size=settings.pool_size + settings.max_overflow,
        max_overflow=0,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
        connect_args=connect_args,
    )


class Database:
    """Hands out the connection for one unit of work, from one pool.

    `write()` is a transaction that commits when its block succeeds and rolls
    back on any error; nothing else in the code base commits. `read()` and
    `lookup()` run each statement on its own, for reads of one statement.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads that need one statement each: every statement
        is its own consistent read, with no BEGIN/COMMIT round trips."""
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    @asynccontextmanager
    async def lookup(self) -> AsyncIterator[asyncpg.Connection]:
        """A bare driver connection from the same pool, outside any transaction,
        for hot single-statement reads (see PreparedStatement): it skips
        SQLAlchemy's per-connection work. A connection that fails or is
        cancelled mid-statement is discarded, not reused."""
        raw = await self.engine.raw_connection()
        try:
            driver = raw.driver_connection
            assert isinstance(driver, asyncpg.Connection)
            yield driver
        except errors.ObservatoryError:
            raise
        except BaseException as exc:
            raw.invalidate()
            if isinstance(classify_database_error(exc), errors.Unavailable):
                # As SQLAlchemy does on a disconnect: the other pooled
                # connections date from before it, so none is reused.
                await self.engine.dispose(close=False)
            raise
        finally:
            await greenlet_spawn(raw.close)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")

    async def dispose(self) -> None:
        await self.engine.dispose()


async def driver_connection(conn: AsyncConnection) -> asyncpg.Connection:
    """The raw asyncpg connection under `conn`, for COPY, cursors and prepared
    statements, inside `conn`'s transaction."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert isinstance(driver, asyncpg.Connection)
    # SQLAlchemy opens its transaction lazily, at its first statement; a driver
    # statement must not run ahead of it, outside the unit of work.
    assert not conn.in_transaction() or driver.is_in_transaction(), (
        "run a statement through the connection before using its driver"
    )
    return driver


def rows_affected(status: str) -> int:
    """The row count of a driver command status such as 'INSERT 0 12' or 'DELETE 3'."""
    return int(status.rsplit(" ", 1)[-1])


class PreparedStatement:
    """A fixed-shape Core statement, compiled once for asyncpg and run as a
    server-side prepared statement on the driver connection: the fast path for
    hot reads, skipping SQLAlchemy's per-execution work. Parameters are the
    statement's `bindparam` names."""

    _dialect = asyncpg_dialect()  # type: ignore[no-untyped-call]

    def __init__(self, statement: ClauseElement) -> None:
        compiled = statement.compile(dialect=self._dialect)
        self.sql = compiled.string
        self._names = tuple(getattr(compiled, "positiontup", None) or ())

    async def fetchrow(self, driver: asyncpg.Connection, **params: Any) -> asyncpg.Record | None:
        return await driver.fetchrow(self.sql, *(params[name] for name in self._names))

    async def fetch(self, driver: asyncpg.Connection, **params: Any) -> list[asyncpg.Record]:
        return list(await driver.fetch(self.sql, *(params[name] for name in self._names)))


# SQLSTATE classes and codes that mean "the database is not there right now".
_UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "53300", "53400"}


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, also when SQLAlchemy wrapped it."""
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str):
            return code
    return None


def classify_database_error(exc: BaseException) -> errors.ObservatoryError | None:
    """Map a driver or pool exception to the error a client should see, or None
    when it is not a database condition (then it is a bug)."""
    if isinstance(exc, sqlalchemy.exc.TimeoutError):
        return errors.Unavailable("no database connection became free in time")
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return errors.Unavailable("the database connection was lost")
    code = sqlstate(exc)
    if code is not None:
        if code.startswith("08") or code in _UNAVAILABLE_SQLSTATES:
            return errors.Unavailable("the database is unavailable")
        if code in {"40001", "40P01", "55P03"}:
            return errors.Aborted("the transaction conflicted with another one; retry it")
        if code == "57014":
            return errors.DeadlineExceeded("the statement was cancelled")
        if code == "23505":
            return errors.AlreadyExists("a row with the same unique key already exists")
        if code.startswith("22"):
            return errors.InvalidArgument(
                "", "a value is out of range or malformed for the database"
            )
        return None
    interface_errors: tuple[type[BaseException], ...] = (
        OSError,
        ConnectionError,
        asyncpg.exceptions.InterfaceError,
        asyncpg.exceptions.ConnectionDoesNotExistError,
        asyncpg.exceptions.CannotConnectNowError,
        asyncpg.exceptions.PostgresConnectionError,
    )
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, interface_errors):
            return errors.Unavailable("the database is unavailable")
        if isinstance(cause, sqlalchemy.exc.InterfaceError | sqlalchemy.exc.OperationalError):
            return errors.Unavailable("the database is unavailable")
        cause = getattr(cause, "orig", None) or cause.__cause__
    return None

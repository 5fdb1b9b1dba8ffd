"""Engine construction, units of work, and database error classification."""

from __future__ import annotations

import socket
import ssl as ssl_module
import uuid
from typing import Any

import asyncpg
import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import ClauseElement

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
    server_settings = connect_args.setdefault("server_settings", {})
    server_settings.setdefault("application_name", "observatory")
    if settings.pgbouncer or wants_pgbouncer(database_url):
        # Transaction-mode poolers hand each transaction a different backend:
        # no statement caches, and unique names for the unnamed statements.
        # (They refuse other start-up parameters: set the timeouts below on
        # the database role instead.)
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = lambda: f"__asyncpg_{uuid.uuid4()}__"
    else:
        # Every session starts with the longest a statement may run (a unit of
        # work lowers it to a nearer client deadline, see server.deadlines),
        # and is ended by the server should it sit idle in a transaction that
        # long, so no session ever holds its locks and snapshot indefinitely.
        limit = f"{max(1, int(settings.statement_timeout_s * 1000))}ms"
        server_settings.setdefault("statement_timeout", limit)
        server_settings.setdefault("idle_in_transaction_session_timeout", limit)
    engine = create_async_engine(
        url,
        # Units of work (server.uow) own every transaction: SQLAlchemy never
        # opens one of its own.
        isolation_level="AUTOCOMMIT",
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
    event.listen(engine.sync_engine, "connect", _widen_unix_send_buffer)
    return engine


# A connection over a Unix-domain socket (the embedded database, or a
# DATABASE_URL with host=/a/directory) can have no more unsent bytes queued
# than its socket's send buffer, 208 KiB by default: unlike TCP's, a Unix
# socket's buffer does not grow with the traffic. A bulk stream's COPY is fed
# by the event loop, which converts the next batch meanwhile and comes back
# to the socket every few milliseconds; 208 KiB lasted PostgreSQL ~1.3 ms of
# an UpsertItems COPY, whose backend then waited for data (ClientRead) 38% of
# its time. Each pooled connection's buffer is raised to this (the kernel caps
# it at net.core.wmem_max). It bounds what may wait in the kernel; memory is
# taken only by bytes actually queued, by bulk writes alone in practice.
UNIX_SEND_BUFFER_BYTES = 4 * 1024 * 1024


def _widen_unix_send_buffer(dbapi_connection: Any, _record: Any) -> None:
    """The "connect" hook that raises a Unix-socket connection's send buffer
    to UNIX_SEND_BUFFER_BYTES (TCP connections keep the kernel's autotuning,
    which an explicit size would switch off)."""
    sock = unix_socket(getattr(dbapi_connection, "driver_connection", None))
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER_BYTES)


def unix_socket(driver: asyncpg.Connection | None) -> Any:
    """The driver connection's socket when it is a Unix-domain one, else None.
    (asyncpg offers no public handle on its transport.)"""
    transport = getattr(driver, "_transport", None)
    sock = None if transport is None else transport.get_extra_info("socket")
    return sock if sock is not None and sock.family == socket.AF_UNIX else None


def rows_affected(status: str) -> int:
    """The row count of a driver command status such as 'INSERT 0 12' or 'DELETE 3'."""
    return int(status.rsplit(" ", 1)[-1])


_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]


def compile_for_driver(statement: ClauseElement) -> tuple[str, list[Any]]:
    """`statement` as asyncpg SQL text ($n parameters) and its arguments, for
    statements run once on the driver (COPY, cursors) rather than prepared."""
    compiled = statement.compile(dialect=_DIALECT, compile_kwargs={"render_postcompile": True})
    names = getattr(compiled, "positiontup", None) or ()
    return compiled.string, [compiled.params[name] for name in names]


class PreparedStatement:
    """A fixed-shape Core statement, compiled once for asyncpg and run as a
    server-side prepared statement on the driver connection: the fast path for
    hot reads, skipping SQLAlchemy's per-execution work. Parameters are the
    statement's `bindparam` names."""

    _dialect = _DIALECT

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
# Classes of errors that a statement's values cause: data exceptions (22: out of
# range, malformed, NUL in text, ...) and program limits (54: an index row, a
# tsquery, a jsonb value or an array too large; a statement too complex).
# Validation at the edge should refuse such input first; these are the net.
_BAD_INPUT_CLASSES = ("22", "54")


UNIQUE_VIOLATION = "23505"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, also when SQLAlchemy wrapped it."""
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str):
            return code
    return None


def _driver_error(exc: BaseException) -> BaseException:
    """The innermost driver exception under SQLAlchemy's wrappers."""
    cause: BaseException | None = exc
    seen: BaseException = exc
    while cause is not None:
        seen = cause
        cause = getattr(cause, "orig", None) or cause.__cause__
    return seen


def _lost_connection(exc: BaseException) -> bool:
    """An asyncpg InterfaceError that says the connection is gone (as opposed
    to one about how it was used, such as too many query arguments)."""
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    return "connection is closed" in str(exc) or "connection was closed" in str(exc)


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
        if code == "25P03":
            return errors.Aborted("the transaction stayed idle too long and was ended; retry it")
        if code == UNIQUE_VIOLATION:
            return errors.AlreadyExists("a row with the same unique key already exists")
        if code.startswith(_BAD_INPUT_CLASSES):
            return _bad_input(code, exc)
        return None
    driver = _driver_error(exc)
    if isinstance(driver, asyncpg.exceptions.InterfaceError) and not _lost_connection(driver):
        if "number of query arguments" in str(driver):
            return errors.InvalidArgument("", "the request holds too many values for one query")
        return None  # a misuse of the driver: a bug
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


def _bad_input(code: str, exc: BaseException) -> errors.InvalidArgument:
    """INVALID_ARGUMENT for a value the database refused, naming the column when
    the database does (the server's own text is not echoed: it may quote the
    value)."""
    column = getattr(_driver_error(exc), "column_name", None) or ""
    if code.startswith("54"):
        return errors.InvalidArgument(column, "a value is too large for the database to store")
    return errors.InvalidArgument(column, "a value is out of range or malformed for the database")

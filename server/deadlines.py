"""The deadline of the RPC being served, for the statements it runs.

The interceptor records each call's deadline here (`begin_call`); units of work
read `statement_timeout_ms` to run their statements under a timeout no longer
than what is left of the call and than OBSERVATORY_STATEMENT_TIMEOUT_S (the
session default every pooled connection starts with, see server.db).

Timeouts are rounded down to a short ladder of values, so that a client that
always sends the same deadline finds the same setting on a pooled connection
most of the time (a setting that is already there costs no round trip).
"""

from __future__ import annotations

import bisect
import contextvars
import time

# time.monotonic() at which the current call's deadline passes; None when the
# client set none (or outside an RPC).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "call_deadline", default=None
)

# Statement timeouts a deadline is rounded down to, in milliseconds.
LADDER_MS = (
    50,
    100,
    200,
    300,
    500,
    750,
    1_000,
    1_500,
    2_000,
    3_000,
    4_000,
    5_000,
    7_500,
    10_000,
    15_000,
    20_000,
    30_000,
    45_000,
    60_000,
    90_000,
    120_000,
    300_000,
    600_000,
)


def begin_call(time_remaining: float | None) -> None:
    """Called by the interceptor as an RPC starts, with the seconds its client
    allows (grpc's `context.time_remaining()`), or None for no deadline."""
    _deadline.set(None if time_remaining is None else time.monotonic() + time_remaining)


def remaining() -> float | None:
    """Seconds left before the current call's deadline (at most 0 once it has
    passed), or None when it has none."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def statement_timeout_ms(ceiling_s: float) -> int:
    """The statement_timeout (milliseconds) for a statement of the current call:
    the ceiling (OBSERVATORY_STATEMENT_TIMEOUT_S), or less when the call's
    deadline is nearer, rounded down to LADDER_MS (never below its first step:
    a statement that short would only be cancelled by the deadline anyway)."""
    ceiling = max(1, int(ceiling_s * 1000))
    left = remaining()
    if left is None or left * 1000 >= ceiling:
        return ceiling
    step = bisect.bisect_right(LADDER_MS, left * 1000) - 1
    return min(ceiling, LADDER_MS[max(step, 0)])

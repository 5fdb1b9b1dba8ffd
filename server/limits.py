"""Per-worker limits, so that no caller can take what the others need.

- `OBSERVATORY_MAX_CONCURRENT_RPCS`: the RPCs one worker serves at once,
  counted from the moment a call arrives until it ends.
- `OBSERVATORY_MAX_STREAMS_PER_CALLER`: the streaming RPCs (IngestContent,
  UpsertItems, ExportContent, the search streams, ExportNetwork: any RPC
  with a stream on either side) one caller has open at once on this worker,
  keyed by the verified token's user ID.

`Limits` is the admission of the one interceptor (server.interceptor): it
counts every call in as it arrives (`enter_rpc`) and out as it ends
(`leave_rpc`), and is asked once the caller is authenticated (`admit`), so a
refusal gets the same error mapping, access log line and metrics as any
other error.

A call past either limit is refused at once with RESOURCE_EXHAUSTED, reason
LIMIT_EXCEEDED and metadata `limit` (the setting's name) and `max`: nobody
queues for a slot, so a greedy caller never makes anyone else wait. The
health service and server reflection are never counted nor refused, so a
probe always gets its answer.

The same object holds the budgets of the long-running streams, so that
together they never hold more than part of the pool and the rest stays for
everyone else's calls: the bulk streams' rows and bytes per batch and the
connections their batches are written on at once (server.bulk); the
snapshot connections exports hold at once (half of pool_size + max_overflow;
an export past them waits for one to be released, without a connection);
and how long an export may wait for a client that does not read
(`OBSERVATORY_EXPORT_IDLE_S`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from server import bulk, errors
from server.auth import Principal
from server.settings import Settings

MAX_CONCURRENT_RPCS = "OBSERVATORY_MAX_CONCURRENT_RPCS"
MAX_STREAMS_PER_CALLER = "OBSERVATORY_MAX_STREAMS_PER_CALLER"


def _nothing() -> None:
    pass


class Limits:
    """One worker's limits and the counts they are checked against. Made once
    per worker by create_server; everything here runs on its event loop."""

    def __init__(self, settings: Settings) -> None:
        self.max_rpcs = settings.max_concurrent_rpcs
        self.max_streams = settings.max_streams_per_caller
        self.export_idle_s = settings.export_idle_s
        self.max_export_connections = max(1, (settings.pool_size + settings.max_overflow) // 2)
        self.export_slots = asyncio.Semaphore(self.max_export_connections)
        self.bulk = bulk.Loader(
            bulk.Budget(
                rows=bulk.BATCH_ROWS,
                bytes=settings.bulk_batch_bytes,
                writers=settings.bulk_writers or bulk.default_writers(settings.pool_size),
            )
        )
        self.rpcs = 0
        self._streams: dict[uuid.UUID, int] = {}

    def streams_of(self, caller: uuid.UUID) -> int:
        return self._streams.get(caller, 0)

    def enter_rpc(self) -> bool:
        """Counts a call in; False (and not counted) when the worker is full."""
        if self.rpcs >= self.max_rpcs:
            return False
        self.rpcs += 1
        return True

    def leave_rpc(self) -> None:
        self.rpcs -= 1

    def admit(
        self, method: str, streaming: bool, caller: Principal, counted: bool
    ) -> Callable[[], None]:
        """Run once the caller is known: raises LimitExceeded for a call past a
        limit (`counted` False: it found the worker full as it arrived),
        otherwise returns what to call when the RPC ends."""
        if not counted:
            raise errors.LimitExceeded(
                f"this server is serving {self.max_rpcs} calls already; retry later",
                limit=MAX_CONCURRENT_RPCS,
                maximum=self.max_rpcs,
            )
        if not streaming:
            return _nothing
        user = caller.user_id
        open_streams = self._streams.get(user, 0)
        if open_streams >= self.max_streams:
            raise errors.LimitExceeded(
                f"this caller has {self.max_streams} streams open already; "
                "finish one before opening another",
                limit=MAX_STREAMS_PER_CALLER,
                maximum=self.max_streams,
            )
        self._streams[user] = open_streams + 1

        def release() -> None:
            left = self._streams[user] - 1
            if left:
                self._streams[user] = left
            else:
                del self._streams[user]

        return release

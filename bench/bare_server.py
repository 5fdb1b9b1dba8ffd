"""The framework's own ceiling: a bare grpc.aio server with the service's
server options and worker count, no interceptor and no database, whose point
reads and pages return constant messages. Like the service's workers, it
keeps its start-up heap out of the garbage collector's walks once started.

    python -m bench.bare_server --listen 127.0.0.1:PORT --workers N \
        --get get.bin [--list list.bin] [--resolve-actor actor.bin] \
        [--get-balance balance.bin] [--search-similar hits.bin] \
        [--event-loop asyncio|uvloop]

    python -m bench.bare_server --listen 127.0.0.1:PORT --workers N \
        --thin-search DSN --search-sql SQL --ef-search 40 [--event-loop ...]

Each file holds the real service's serialized answer to the benchmarked
request (so the responses have the same serialized size): a Content for
ContentService.GetContent, a ListContentResponse for ListContent, an Actor for
ActorService.ResolveActor, a Balance for CreditService.GetBalance, and a
SearchSimilarBatchResponse whose first result's hits VectorService.SearchSimilar
streams, one message per hit (as the service does), and which
VectorService.SearchSimilarBatch answers whole. A service
whose answer is not given is not served. It also serves grpc.health.v1 so the
bench can wait for it the same way. `--event-loop` runs the worker on uvloop
or on asyncio's own loop (the default), as OBSERVATORY_EVENT_LOOP does for the
service.

With `--thin-search` it is the thin server instead: the framework and the
driver with nothing of the service between them. It serves only
VectorService.SearchSimilar and SearchSimilarBatch (its first query), each
call running `--search-sql` ($1 the query vector, $2 top_k) on an asyncpg
pool of THIN_POOL connections whose hnsw settings were applied once (and are
kept: no reset query when a connection goes back), and
answering the hits as the service does (score, distance, id, text, url,
content_id). No authentication, validation, unit of work, coalescing,
metrics or log line: what one database round trip per call costs inside
grpc.aio, the ceiling of any service built on the two.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from observatory.v1 import (
    actor_pb2,
    actor_pb2_grpc,
    content_pb2,
    content_pb2_grpc,
    credit_pb2,
    credit_pb2_grpc,
    vector_pb2,
    vector_pb2_grpc,
)

from server.settings import Settings
from server.workers import run_forked


class ConstantContent(content_pb2_grpc.ContentServiceServicer):
    def __init__(
        self, get: content_pb2.Content, listing: content_pb2.ListContentResponse | None
    ) -> None:
        self._get = get
        self._list = listing or content_pb2.ListContentResponse()

    async def GetContent(
        self, request: content_pb2.GetContentRequest, context: Any
    ) -> content_pb2.Content:
        return self._get

    async def ListContent(
        self, request: content_pb2.ListContentRequest, context: Any
    ) -> content_pb2.ListContentResponse:
        return self._list


class ConstantActor(actor_pb2_grpc.ActorServiceServicer):
    def __init__(self, actor: actor_pb2.Actor) -> None:
        self._actor = actor

    async def ResolveActor(
        self, request: actor_pb2.ResolveActorRequest, context: Any
    ) -> actor_pb2.Actor:
        return self._actor


class ConstantBalance(credit_pb2_grpc.CreditServiceServicer):
    def __init__(self, balance: credit_pb2.Balance) -> None:
        self._balance = balance

    async def GetBalance(
        self, request: credit_pb2.GetBalanceRequest, context: Any
    ) -> credit_pb2.Balance:
        return self._balance


class ConstantHits(vector_pb2_grpc.VectorServiceServicer):
    def __init__(self, hits: vector_pb2.SearchSimilarBatchResponse) -> None:
        self._batch = hits
        self._hits = list(hits.results[0].hits)

    async def SearchSimilarBatch(
        self, request: vector_pb2.SearchSimilarBatchRequest, context: Any
    ) -> vector_pb2.SearchSimilarBatchResponse:
        return self._batch

    async def SearchSimilar(
        self, request: vector_pb2.SearchSimilarRequest, context: Any
    ) -> AsyncIterator[vector_pb2.ScoredItem]:
        for hit in self._hits:
            yield hit


# The thin server's connections per worker: one per search in flight at 8 streams.
THIN_POOL = 8


class ThinSearch(vector_pb2_grpc.VectorServiceServicer):
    """SearchSimilar and SearchSimilarBatch as one statement per call, and
    nothing else (see the module's docstring)."""

    def __init__(self, pool: asyncpg.Pool, sql: str) -> None:
        self._pool = pool
        self._sql = sql

    async def _hits(self, vector: Any, top_k: int) -> list[vector_pb2.ScoredItem]:
        query = np.asarray(vector, dtype=np.float32)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(self._sql, query, top_k or 10)
        hits = []
        for row in rows:
            hit = vector_pb2.ScoredItem(score=1.0 - row["distance"], distance=row["distance"])
            hit.item.id = row["id"]
            hit.item.text = row["text"] or ""
            hit.item.url = row["url"] or ""
            if row["content_id"] is not None:
                hit.item.content_id = str(row["content_id"])
            hits.append(hit)
        return hits

    async def SearchSimilarBatch(
        self, request: vector_pb2.SearchSimilarBatchRequest, context: Any
    ) -> vector_pb2.SearchSimilarBatchResponse:
        first = request.searches[0]
        response = vector_pb2.SearchSimilarBatchResponse()
        response.results.add().hits.extend(await self._hits(first.vector, first.top_k))
        return response

    async def SearchSimilar(
        self, request: vector_pb2.SearchSimilarRequest, context: Any
    ) -> AsyncIterator[vector_pb2.ScoredItem]:
        for hit in await self._hits(request.vector, request.top_k):
            yield hit


@dataclass(frozen=True)
class Thin:
    """The thin server's database, statement and ef_search."""

    dsn: str
    sql: str
    ef_search: int


async def thin_pool(thin: Thin) -> asyncpg.Pool:
    from pgvector.asyncpg import register_vector

    from bench.vectors import SEARCH_SETTINGS

    async def setup(conn: asyncpg.Connection) -> None:
        await register_vector(conn)
        await conn.execute(SEARCH_SETTINGS, str(thin.ef_search))

    async def keep(conn: asyncpg.Connection) -> None:
        """No reset query on release (asyncpg's default sends one, a round
        trip per call): the service's pool does not reset either."""

    pool = await asyncpg.create_pool(
        thin.dsn, min_size=THIN_POOL, max_size=THIN_POOL, init=setup, reset=keep
    )
    assert pool is not None
    return pool


@dataclass(frozen=True)
class Answers:
    """The serialized constant answers (None: that service is not served)."""

    get: bytes | None = None
    listing: bytes | None = None
    actor: bytes | None = None
    balance: bytes | None = None
    hits: bytes | None = None


async def serve(listen: str, workers: int, answers: Answers, thin: Thin | None = None) -> None:
    # (no gRPC server object before forking)
    from server.app import served_by_generic_handlers, server_options
    from server.workers import settle_heap

    settings = Settings(OBSERVATORY_LISTEN=listen, OBSERVATORY_WORKERS=workers)
    server = grpc.aio.server(options=server_options(settings))
    # Registered as the service registers its own: by generic handlers only.
    registry = served_by_generic_handlers(server)
    if answers.get is not None:
        listing = answers.listing
        content_pb2_grpc.add_ContentServiceServicer_to_server(
            ConstantContent(
                content_pb2.Content.FromString(answers.get),
                None if listing is None else content_pb2.ListContentResponse.FromString(listing),
            ),
            registry,
        )
    if answers.actor is not None:
        actor_pb2_grpc.add_ActorServiceServicer_to_server(
            ConstantActor(actor_pb2.Actor.FromString(answers.actor)), registry
        )
    if answers.balance is not None:
        credit_pb2_grpc.add_CreditServiceServicer_to_server(
            ConstantBalance(credit_pb2.Balance.FromString(answers.balance)), registry
        )
    if answers.hits is not None:
        vector_pb2_grpc.add_VectorServiceServicer_to_server(
            ConstantHits(vector_pb2.SearchSimilarBatchResponse.FromString(answers.hits)), registry
        )
    pool = None
    if thin is not None:
        pool = await thin_pool(thin)
        vector_pb2_grpc.add_VectorServiceServicer_to_server(ThinSearch(pool, thin.sql), registry)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), registry)
    server.add_insecure_port(listen)
    await server.start()
    settle_heap()  # as each of the service's workers does once it is built
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(0)
    if pool is not None:
        await pool.close()


def command(port: int, workers: int, event_loop: str = "asyncio") -> list[str]:
    """The command line that runs this module on 127.0.0.1:`port`; add the
    answers' flags (or thin_command's)."""
    return [
        sys.executable, "-m", "bench.bare_server", "--listen", f"127.0.0.1:{port}",
        "--workers", str(workers), "--event-loop", event_loop,
    ]  # fmt: skip


def thin_command(
    port: int, workers: int, dsn: str, sql: str, ef_search: int, event_loop: str = "asyncio"
) -> list[str]:
    """The command line of the thin server for `sql` on the database `dsn`."""
    return [
        *command(port, workers, event_loop),
        "--thin-search", dsn, "--search-sql", sql, "--ef-search", str(ef_search),
    ]  # fmt: skip


def run_loop(event_loop: str, main: Coroutine[Any, Any, None]) -> None:
    """`main` on uvloop or on asyncio's own loop, as the service runs its workers."""
    if event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
        return
    asyncio.run(main)


def _worker(
    listen: str, workers: int, answers: Answers, event_loop: str, thin: Thin | None
) -> None:
    run_loop(event_loop, serve(listen, workers, answers, thin))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--get", type=Path, help="a serialized Content (GetContent's answer)")
    parser.add_argument("--list", type=Path, help="a serialized ListContentResponse")
    parser.add_argument("--resolve-actor", type=Path, help="a serialized Actor")
    parser.add_argument("--get-balance", type=Path, help="a serialized Balance")
    parser.add_argument(
        "--search-similar", type=Path, help="a serialized SearchSimilarBatchResponse"
    )
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--thin-search", metavar="DSN", help="be the thin server on this database")
    parser.add_argument("--search-sql", help="the thin server's statement ($1 vector, $2 top_k)")
    parser.add_argument("--ef-search", type=int, default=40, help="the thin server's (40)")
    args = parser.parse_args()

    def read(path: Path | None) -> bytes | None:
        return None if path is None else path.read_bytes()

    answers = Answers(
        get=read(args.get),
        listing=read(args.list),
        actor=read(args.resolve_actor),
        balance=read(args.get_balance),
        hits=read(args.search_similar),
    )
    if args.list is not None and args.get is None:
        parser.error("--list needs --get (both are ContentService's)")
    thin = None
    if args.thin_search is not None:
        if args.search_sql is None or args.search_similar is not None:
            parser.error("--thin-search needs --search-sql, and serves no constant hits")
        thin = Thin(args.thin_search, args.search_sql, args.ef_search)
    worker_args = (args.listen, args.workers, answers, args.event_loop, thin)
    if args.workers == 1:
        _worker(*worker_args)
        return
    run_forked(args.workers, _worker, worker_args)


if __name__ == "__main__":
    main()

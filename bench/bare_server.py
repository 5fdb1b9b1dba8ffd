"""The framework's own ceiling: a bare grpc.aio ContentService with the
service's server options and worker count, no interceptor and no database,
whose GetContent and ListContent return constant messages.

    python -m bench.bare_server --listen 127.0.0.1:PORT --workers N \
        --get get.bin --list list.bin

`get.bin` holds a serialized Content and `list.bin` a serialized
ListContentResponse (the real service's answers to the benchmarked requests,
so the responses have the same serialized size). It also serves
grpc.health.v1 so the bench can wait for it the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from observatory.v1 import content_pb2, content_pb2_grpc

from server.settings import Settings
from server.workers import run_forked


class ConstantContent(content_pb2_grpc.ContentServiceServicer):
    def __init__(self, get: content_pb2.Content, listing: content_pb2.ListContentResponse) -> None:
        self._get = get
        self._list = listing

    async def GetContent(
        self, request: content_pb2.GetContentRequest, context: Any
    ) -> content_pb2.Content:
        return self._get

    async def ListContent(
        self, request: content_pb2.ListContentRequest, context: Any
    ) -> content_pb2.ListContentResponse:
        return self._list


async def serve(listen: str, workers: int, get: bytes, listing: bytes) -> None:
    from server.app import server_options  # no gRPC server object before forking

    settings = Settings(OBSERVATORY_LISTEN=listen, OBSERVATORY_WORKERS=workers)
    server = grpc.aio.server(options=server_options(settings))
    content_pb2_grpc.add_ContentServiceServicer_to_server(
        ConstantContent(
            content_pb2.Content.FromString(get), content_pb2.ListContentResponse.FromString(listing)
        ),
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    server.add_insecure_port(listen)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(0)


def _worker(listen: str, workers: int, get: bytes, listing: bytes) -> None:
    asyncio.run(serve(listen, workers, get, listing))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--get", type=Path, required=True)
    parser.add_argument("--list", type=Path, required=True)
    args = parser.parse_args()
    get, listing = args.get.read_bytes(), args.list.read_bytes()
    if args.workers == 1:
        _worker(args.listen, 1, get, listing)
        return
    run_forked(args.workers, _worker, (args.listen, args.workers, get, listing))


if __name__ == "__main__":
    main()

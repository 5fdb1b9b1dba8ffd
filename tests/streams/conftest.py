"""Servers with their own limits, for the tests of streams and limits."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from server.app import App, create_server
from tests.conftest import make_settings


@contextlib.asynccontextmanager
async def serving(
    database_url: str, **settings: Any
) -> AsyncIterator[tuple[App, grpc.aio.Channel]]:
    """A server of its own with `settings` (environment names) and a channel to it."""
    app = await create_server(make_settings(**settings), database_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield app, channel
    finally:
        await app.stop(0)

"""Streams that open and then wait, as an idle or hostile client's would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from tests.helpers import Caller


class HeldStreams:
    """Client streams that send `first` (if any) and then nothing until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[Any] = []

    def open(self, method: Any, caller: Caller, first: Sequence[Any] = ()) -> Any:
        release = self.release

        async def requests() -> AsyncIterator[Any]:
            for message in first:
                yield message
            await release.wait()

        call = method(requests(), metadata=caller.metadata)
        self.calls.append(call)
        return call

    async def close(self) -> None:
        for call in self.calls:
            call.cancel()
        await asyncio.gather(*self.calls, return_exceptions=True)


def unread_export(channel: grpc.aio.Channel, caller: Caller) -> Any:
    """An export whose client never reads past its first chunk."""
    stub = content_pb2_grpc.ContentServiceStub(channel)
    return stub.ExportContent(
        content_pb2.ExportContentRequest(format=content_pb2.EXPORT_FORMAT_CSV),
        metadata=caller.metadata,
    )


async def health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return response.status


def rss_mb() -> float:
    """This process's resident memory now (the in-process server's included)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class BrokenStream:
    """A client stream of `method` (e.g. `stub.IngestContent`) that sends
    `messages`, then waits, until the test breaks it off."""

    def __init__(self, method: Any, caller: Caller, messages: Sequence[Any]) -> None:
        self.sent = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            for message in messages:
                yield message
            self.sent.set()
            await asyncio.Event().wait()

        self.call = method(requests(), metadata=caller.metadata)

    async def break_off(self) -> None:
        self.call.cancel()
        try:
            await self.call
        except asyncio.CancelledError:
            return
        raise AssertionError("the broken-off stream still finished")

"""Helpers for the operations tests: scraping /metrics, a server process."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import TEST_SECRET

ROOT = Path(__file__).resolve().parent.parent.parent

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.read()


async def http_json(port: int, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.json()


async def scrape(port: int) -> Samples:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def start_server(
    port: int, http_port: int | None, env: Mapping[str, str] | None = None, **popen: Any
) -> subprocess.Popen[bytes]:
    """`python -m server` on `port` (and the side port on `http_port`)."""
    environment = {
        **os.environ,
        "OBSERVATORY_LISTEN": f"127.0.0.1:{port}",
        "OBSERVATORY_HTTP_LISTEN": f"127.0.0.1:{http_port}" if http_port else "",
        "OBSERVATORY_JWT_SECRET": TEST_SECRET,
        "OBSERVATORY_SHUTDOWN_GRACE": "2",
        **(env or {}),
    }
    environment.pop("GRPC_ENABLE_FORK_SUPPORT", None)
    return subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=environment, **popen)


async def wait_ready(http_port: int, process: subprocess.Popen[bytes], timeout: float = 90) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            status, _ = await http_get(http_port, "/readyz")
            if status == 200:
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("the server never became ready")


async def stop_server(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if process.poll() is None:
        process.terminate()
    try:
        return await asyncio.wait_for(asyncio.to_thread(process.wait), timeout)
    except TimeoutError:
        process.kill()
        raise

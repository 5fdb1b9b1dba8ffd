"""A fleet: three `python -m server` processes started at once on one empty
database, and the nginx recipe of docs/fleet.md in front of them (when nginx
is installed)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from tests.helpers import TEST_SECRET, make_content, new_caller
from tests.scaling.cluster import free_port

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "docs" / "fleet.md"
SERVING = health_pb2.HealthCheckResponse.SERVING
NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)),
    None,
)


@dataclass
class Node:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def served(self, method: str) -> int:
        """How many `method` RPCs its access log shows."""
        return self.log.read_text().count(f'"method": "/observatory.v1.{method}"')


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="observatory-fleet-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture(scope="module")
async def empty_database(postgres) -> AsyncIterator[str]:
    """A database of this module's own with nothing in it yet."""
    if postgres.embedded is None:
        pytest.skip("needs the embedded database, to make an empty database on it")
    name = f"observatory_fleet_{os.getpid()}"
    url = await asyncio.to_thread(postgres.embedded.ensure_database, name, fresh=True)
    yield url
    await asyncio.to_thread(postgres.embedded.drop_database, name)


@pytest_asyncio.fixture(scope="module")
async def fleet(empty_database: str, workdir: Path) -> AsyncIterator[list[Node]]:
    """Three servers, started together, each one worker on a port of its own."""
    nodes = [_start(free_port(), empty_database, workdir / f"server-{i}.log") for i in range(3)]
    try:
        await asyncio.gather(*(_wait_serving(node) for node in nodes))
        yield nodes
    finally:
        for node in nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                await asyncio.to_thread(node.process.wait, 20)
            except subprocess.TimeoutExpired:
                node.process.kill()


def _start(port: int, database_url: str, log: Path) -> Node:
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "OBSERVATORY_LISTEN": f"127.0.0.1:{port}",
        "OBSERVATORY_JWT_SECRET": TEST_SECRET,
        "OBSERVATORY_WORKERS": "1",
        "OBSERVATORY_HTTP_LISTEN": "",
        "OBSERVATORY_SHUTDOWN_GRACE": "5",
    }
    environment.pop("GRPC_ENABLE_FORK_SUPPORT", None)
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "server"], cwd=ROOT, env=environment, stderr=output
        )
    return Node(port, process, log)


async def _wait_serving(node: Node, timeout: float = 60) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
        await _wait_health(channel, timeout, node)


async def _wait_health(channel: grpc.aio.Channel, timeout: float, node: Node | None = None) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if node is not None and node.process.poll() is not None:
            raise AssertionError(f"the server exited:\n{node.log.read_text()[-3000:]}")
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if response.status == SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("never SERVING")


async def test_three_servers_start_at_once_on_an_empty_database(fleet, empty_database):
    conn = await asyncpg.connect(empty_database)
    try:
        versions = await conn.fetch("SELECT version_num FROM alembic_version")
        partitions = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'content'::regclass"
        )
    finally:
        await conn.close()
    assert len(versions) == 1
    assert partitions >= 13  # the default one and a year of months, made once
    caller = new_caller()
    for node in fleet:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
            stub = content_pb2_grpc.ContentServiceStub(channel)
            await stub.CreateContent(
                content_pb2.CreateContentRequest(content=make_content()), metadata=caller.metadata
            )


def nginx_config(workdir: Path, listen_port: int, upstream_ports: list[int]) -> Path:
    """docs/fleet.md's nginx block with these ports, in a minimal nginx.conf
    that keeps every file under `workdir`."""
    block = re.search(r"```nginx\n(.*?)```", RECIPE.read_text(), re.S)
    assert block is not None, "docs/fleet.md has no nginx block"
    recipe = block[1]
    documented = re.findall(r"server 127\.0\.0\.1:(\d+)", recipe)
    assert len(documented) == len(upstream_ports)
    for old, new in zip(documented, upstream_ports, strict=True):
        recipe = recipe.replace(f"127.0.0.1:{old} ", f"127.0.0.1:{new} ")
    recipe = re.sub(r"listen 127\.0\.0\.1:\d+", f"listen 127.0.0.1:{listen_port}", recipe)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / f"{kind}_temp").mkdir(exist_ok=True)
    config = workdir / "nginx.conf"
    config.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"""worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body_temp;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
{recipe}
}}
"""
    )
    return config


def _start_nginx(nginx: str, workdir: Path, config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [nginx, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "nginx-error.log"),
         "-g", "daemon off;"],
        stderr=subprocess.DEVNULL,  # it logs to nginx-error.log
    )  # fmt: skip


@pytest_asyncio.fixture(scope="module")
async def nginx(fleet: list[Node], workdir: Path) -> AsyncIterator[int]:
    if NGINX is None:
        pytest.skip("nginx is not installed (make test installs nginx-light where it can)")
    port = free_port()
    config = nginx_config(workdir, port, [node.port for node in fleet])
    process = _start_nginx(NGINX, workdir, config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _wait_health(channel, 10)
        yield port
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()


async def test_the_nginx_recipe_spreads_calls_and_survives_a_stopped_server(fleet, nginx):
    caller = new_caller()
    before = [node.served("ContentService/GetContent") for node in fleet]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{nginx}") as channel:
        stub = content_pb2_grpc.ContentServiceStub(channel)
        created = await stub.CreateContent(
            content_pb2.CreateContentRequest(content=make_content()), metadata=caller.metadata
        )
        request = content_pb2.GetContentRequest(id=created.id)
        for _ in range(30):
            got = await stub.GetContent(request, metadata=caller.metadata)
            assert got.id == created.id
        await asyncio.sleep(0.5)  # the servers' access logs are written as they go
        after = [node.served("ContentService/GetContent") for node in fleet]
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

        stopped = fleet[0]
        stopped.process.send_signal(signal.SIGTERM)
        # While it drains and after it has gone, every call succeeds elsewhere.
        for _ in range(30):
            got = await stub.GetContent(request, metadata=caller.metadata)
            assert got.id == created.id
        assert await asyncio.to_thread(stopped.process.wait, 20) == 0
        for _ in range(10):
            await stub.CreateContent(
                content_pb2.CreateContentRequest(content=make_content()), metadata=caller.metadata
            )
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == SERVING

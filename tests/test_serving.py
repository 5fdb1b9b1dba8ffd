"""`python -m server` as a process: graceful SIGTERM, workers, embedded database."""

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from server.workers import settle_heap
from tests.helpers import TEST_SECRET, make_content, new_caller

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(port: int, **env: str) -> subprocess.Popen:
    environment = {
        **os.environ,
        "OBSERVATORY_LISTEN": f"127.0.0.1:{port}",
        "OBSERVATORY_JWT_SECRET": TEST_SECRET,
        "OBSERVATORY_SHUTDOWN_GRACE": "5",
        **env,
    }
    environment.pop("GRPC_ENABLE_FORK_SUPPORT", None)
    return subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=environment)


async def _wait_serving(
    channel: grpc.aio.Channel, process: subprocess.Popen, timeout: float = 60
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("the server never became SERVING")


async def _wait_exit(process: subprocess.Popen, timeout: float = 20) -> int:
    return await asyncio.wait_for(asyncio.to_thread(process.wait), timeout)


async def test_sigterm_lets_an_in_flight_rpc_finish(database_url):
    port = _free_port()
    process = _start(port, DATABASE_URL=database_url)
    caller = new_caller()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _wait_serving(channel, process)
            stub = content_pb2_grpc.ContentServiceStub(channel)
            created = await stub.CreateContent(
                content_pb2.CreateContentRequest(content=make_content()), metadata=caller.metadata
            )
            holder = await asyncpg.connect(database_url)
            transaction = holder.transaction()
            await transaction.start()
            await holder.execute(
                "SELECT 1 FROM content WHERE id = $1 FOR UPDATE", uuid.UUID(created.id)
            )
            update = content_pb2.Content(id=created.id, title="finished during the grace period")
            in_flight = asyncio.ensure_future(
                stub.UpdateContent(
                    content_pb2.UpdateContentRequest(
                        content=update, update_mask={"paths": ["title"]}
                    ),
                    metadata=caller.metadata,
                )
            )
            await asyncio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            await transaction.rollback()
            await holder.close()
            updated = await asyncio.wait_for(in_flight, 10)
            assert updated.title == "finished during the grace period"
        assert await _wait_exit(process) == 0
    finally:
        if process.poll() is None:
            process.kill()


async def test_workers_share_one_port(database_url):
    port = _free_port()
    process = _start(port, DATABASE_URL=database_url, OBSERVATORY_WORKERS="2")
    caller = new_caller()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _wait_serving(channel, process)
        workers = psutil.Process(process.pid).children()
        assert len(workers) == 2
        listening = {
            conn.laddr.port
            for worker in workers
            for conn in worker.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN
        }
        assert listening == {port}
        for _ in range(4):  # separate connections, spread by the kernel
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = content_pb2_grpc.ContentServiceStub(channel)
                await stub.CreateContent(
                    content_pb2.CreateContentRequest(content=make_content()),
                    metadata=caller.metadata,
                )
        process.send_signal(signal.SIGTERM)
        assert await _wait_exit(process) == 0
        assert not any(
            worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers
        )
    finally:
        if process.poll() is None:
            process.kill()


async def test_embedded_database_starts_and_stops_with_the_server(tmp_path):
    port = _free_port()
    environment = {"OBSERVATORY_DATA_DIR": str(tmp_path / "data")}
    process = _start(port, **environment)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _wait_serving(channel, process)
        postmaster = tmp_path / "data" / "pgdata" / "postmaster.pid"
        pid = int(postmaster.read_text().splitlines()[0])
        assert psutil.pid_exists(pid)
        process.send_signal(signal.SIGINT)
        assert await _wait_exit(process) == 0
        assert not postmaster.exists()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_workers_serve_on_the_event_loop_asked_for(database_url, event_loop):
    port = _free_port()
    process = _start(
        port, DATABASE_URL=database_url, OBSERVATORY_WORKERS="1", OBSERVATORY_EVENT_LOOP=event_loop
    )
    caller = new_caller()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _wait_serving(channel, process)
            stub = content_pb2_grpc.ContentServiceStub(channel)
            created = await stub.CreateContent(
                content_pb2.CreateContentRequest(content=make_content()), metadata=caller.metadata
            )
            got = await stub.GetContent(
                content_pb2.GetContentRequest(id=created.id), metadata=caller.metadata
            )
            assert got == created
        # uvloop's extension module is loaded only when the worker runs on it.
        mapped = await asyncio.to_thread(Path(f"/proc/{process.pid}/maps").read_text)
        assert ("uvloop" in mapped) == (event_loop == "uvloop")
        process.send_signal(signal.SIGTERM)
        assert await _wait_exit(process) == 0
    finally:
        if process.poll() is None:
            process.kill()


async def test_a_worker_freezes_its_start_up_heap():
    """What is alive when a worker starts serving is kept out of the cyclic
    garbage collector's walks (full collections stay short on a busy loop)."""
    gc.unfreeze()
    try:
        alive = len(gc.get_objects())
        settle_heap()
        assert gc.get_freeze_count() > alive // 2
        assert len(gc.get_objects()) < alive // 10
    finally:
        gc.unfreeze()

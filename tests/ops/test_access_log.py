"""The access log: one JSON line per RPC with its method, status, duration,
request ID, user (and trace ID when traced), written off the event loop in
batches, soon enough for `tail -f`, and never lost when the server stops."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from observatory.v1 import content_pb2, content_pb2_grpc

from server import logs
from tests.helpers import make_content, new_caller
from tests.ops.helpers import free_port, start_server, stop_server, wait_ready

GET = "/observatory.v1.ContentService/GetContent"
FIELDS = ["time", "level", "logger", "message", "method", "status", "duration_ms"]
FIELDS += ["request_id", "user"]


def access_lines(text: str) -> list[dict]:
    """Every access line in `text`; every line must be a whole JSON object."""
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("message") == "rpc"]


# -- a real server ---------------------------------------------------------------------


async def _calls_across_a_shutdown(
    port: int, process: subprocess.Popen[bytes], count: int
) -> tuple[uuid.UUID, dict[str, str], dict[str, str]]:
    """`count` GetContent calls on several channels (so several workers share
    them), half of them for a row that exists; SIGTERM once a tenth have been
    answered, so the rest end during the shutdown. Returns the caller and the
    x-request-id -> status of every call sent and of every call answered."""
    caller = new_caller()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        created = await content_pb2_grpc.ContentServiceStub(channel).CreateContent(
            content_pb2.CreateContentRequest(content=make_content()), metadata=caller.metadata
        )
    sent: dict[str, str] = {}
    answered: dict[str, str] = {}
    enough = asyncio.Event()

    async def one(index: int, channel: grpc.aio.Channel) -> None:
        request_id = f"access-{index}"
        found = index % 2 == 0
        sent[request_id] = "OK" if found else "NOT_FOUND"
        try:
            await content_pb2_grpc.ContentServiceStub(channel).GetContent(
                content_pb2.GetContentRequest(id=created.id if found else str(uuid.uuid4())),
                metadata=(*caller.metadata, ("x-request-id", request_id)),
            )
            answered[request_id] = "OK"
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                answered[request_id] = "NOT_FOUND"
        if len(answered) >= count // 10:
            enough.set()

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
    try:
        calls = asyncio.gather(*(one(i, channels[i % len(channels)]) for i in range(count)))
        await enough.wait()
        process.terminate()
        await calls
    finally:
        for channel in channels:
            await channel.close()
    return caller.user_id, sent, answered


async def _every_worker_serving(log: Path, workers: int) -> None:
    """Until each worker has said it serves (and so handles SIGTERM)."""
    for _ in range(300):
        text = await asyncio.to_thread(log.read_text)
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        if sum(line["message"] == "serving" for line in lines) == workers:
            await asyncio.sleep(0.2)
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the workers never all said they were serving")


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_server_stopped_amid_calls_has_logged_every_call_it_answered(
    database_url, tmp_path: Path, workers: int
):
    port, http_port = free_port(), free_port()
    err = tmp_path / "stderr"
    with err.open("w") as stderr:
        process = start_server(
            port,
            http_port,
            {"DATABASE_URL": database_url, "OBSERVATORY_WORKERS": str(workers)},
            stderr=stderr,
        )
        try:
            await wait_ready(http_port, process)
            await _every_worker_serving(err, workers)
            user, sent, answered = await _calls_across_a_shutdown(port, process, 400)
        finally:
            assert await stop_server(process) == 0
    logged = {line["request_id"]: line for line in access_lines(err.read_text())}
    logged = {key: line for key, line in logged.items() if key.startswith("access-")}
    assert len(answered) >= 40
    assert set(answered) <= set(logged) <= set(sent)
    for request_id, status in answered.items():
        line = logged[request_id]
        assert list(line) == FIELDS
        assert (line["level"], line["logger"], line["method"]) == ("INFO", "observatory.rpc", GET)
        assert (line["status"], line["user"]) == (status, str(user))
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
        time.strptime(line["time"], "%Y-%m-%d %H:%M:%S,%f")


@pytest.mark.asyncio
async def test_a_line_reaches_the_log_while_the_server_runs(database_url, tmp_path: Path):
    port, http_port = free_port(), free_port()
    err = tmp_path / "stderr"
    with err.open("w") as stderr:
        process = start_server(
            port,
            http_port,
            {"DATABASE_URL": database_url, "OBSERVATORY_WORKERS": "1"},
            stderr=stderr,
        )
        try:
            await wait_ready(http_port, process)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await content_pb2_grpc.ContentServiceStub(channel).GetContent(
                        content_pb2.GetContentRequest(id=str(uuid.uuid4())),
                        metadata=(("x-request-id", "tail-f"),),
                    )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                logged = [
                    line for line in access_lines(err.read_text()) if line["request_id"] == "tail-f"
                ]
                if logged:
                    break
                await asyncio.sleep(0.02)
            assert [(line["status"], line["user"]) for line in logged] == [("UNAUTHENTICATED", "")]
        finally:
            assert await stop_server(process) == 0


# -- the handler ------------------------------------------------------------------------


@pytest.fixture
def installed() -> Iterator[logs.JsonLinesHandler]:
    """The handler `logs.configure` installs, alone on the root logger, writing
    into a string (its `stream`)."""
    stream = io.StringIO()
    handler = logs.JsonLinesHandler(stream)
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
        handler.close()


ACCESS = logs.AccessLog(logging.getLogger("observatory.rpc"))


def test_lines_are_written_by_the_writer_within_its_interval(installed):
    stream = installed.stream
    user = uuid.uuid4()
    ACCESS.write(GET, grpc.StatusCode.OK, 0.0012345, "req-1", user)
    ACCESS.write(GET, grpc.StatusCode.NOT_FOUND, 0.5, "req-2", None, "ab" * 16)
    deadline = time.monotonic() + 2
    while stream.getvalue().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    first, second = access_lines(stream.getvalue())
    assert list(first) == FIELDS
    assert first["method"] == GET
    assert (first["status"], first["duration_ms"], first["request_id"], first["user"]) == (
        "OK",
        1.234,  # rounded to a microsecond
        "req-1",
        str(user),
    )
    assert list(second) == [*FIELDS, "trace_id"]
    assert (second["status"], second["user"], second["trace_id"]) == ("NOT_FOUND", "", "ab" * 16)


def test_a_record_after_buffered_access_lines_comes_after_them(installed):
    stream = installed.stream
    for index in range(50):
        ACCESS.write(GET, grpc.StatusCode.OK, 0.001, f"req-{index}", None)
    logging.getLogger("observatory.test").warning("after the calls")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("request_id") for line in lines[:50]] == [f"req-{i}" for i in range(50)]
    assert (lines[50]["level"], lines[50]["message"]) == ("WARNING", "after the calls")


def test_closing_the_handler_writes_what_is_buffered(installed):
    handler, stream = installed, installed.stream
    for index in range(1000):
        ACCESS.write(GET, grpc.StatusCode.OK, 0.001, f"req-{index}", None)
    handler.close()
    assert [line["request_id"] for line in access_lines(stream.getvalue())] == [
        f"req-{i}" for i in range(1000)
    ]


def test_a_level_above_info_drops_the_access_lines(installed):
    handler, stream = installed, installed.stream
    logging.getLogger().setLevel(logging.WARNING)
    ACCESS.write(GET, grpc.StatusCode.OK, 0.001, "req-1", None)
    handler.flush()
    assert stream.getvalue() == ""


def test_with_other_handlers_the_line_is_a_record_with_the_same_fields(caplog):
    user = uuid.uuid4()
    with caplog.at_level(logging.INFO, logger="observatory.rpc"):
        ACCESS.write(GET, grpc.StatusCode.ABORTED, 0.25, "req-9", user, "cd" * 16)
    [record] = [r for r in caplog.records if r.name == "observatory.rpc"]
    assert record.getMessage() == "rpc"
    fields = {name: getattr(record, name) for name in FIELDS[4:]}
    assert fields == {
        "method": GET,
        "status": "ABORTED",
        "duration_ms": 250.0,
        "request_id": "req-9",
        "user": str(user),
    }
    assert record.trace_id == "cd" * 16

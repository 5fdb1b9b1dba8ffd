"""OpenTelemetry: off by default; with OTEL_TRACES_EXPORTER=console a server
span per RPC continuing the caller's W3C traceparent, SQL child spans, and the
trace ID in the access log line."""

import json
import re
import subprocess

import grpc
import pytest
from observatory.v1 import content_pb2, content_pb2_grpc

from server.ops import tracing
from tests.helpers import make_content, new_caller
from tests.ops.helpers import free_port, start_server, stop_server, wait_ready

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


def test_tracing_is_off_unless_the_environment_asks():
    assert tracing.exporter_names({}) == []
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert tracing.exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}) == [
        "otlp"
    ]
    assert (
        tracing.exporter_names({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})
        == []
    )


def _spans(stdout: str) -> list[dict]:
    """The JSON objects the console exporter printed, one per span."""
    decoder = json.JSONDecoder()
    spans, index = [], 0
    while (start := stdout.find("{", index)) != -1:
        span, index = decoder.raw_decode(stdout, start)
        spans.append(span)
    return spans


@pytest.mark.asyncio
async def test_console_exporter_prints_the_rpc_span_with_sql_children(database_url, tmp_path):
    port, http_port = free_port(), free_port()
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = start_server(
            port,
            http_port,
            {
                "DATABASE_URL": database_url,
                "OBSERVATORY_WORKERS": "1",
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_SERVICE_NAME": "observatory-test",
            },
            stdout=stdout,
            stderr=stderr,
        )
        try:
            await wait_ready(http_port, process)
            caller = new_caller()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await content_pb2_grpc.ContentServiceStub(channel).CreateContent(
                    content_pb2.CreateContentRequest(content=make_content()),
                    metadata=(
                        *caller.metadata,
                        ("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),
                    ),
                )
        finally:
            assert await stop_server(process) == 0
    spans = _spans(out.read_text())
    rpc = [s for s in spans if s["name"] == "observatory.v1.ContentService/CreateContent"]
    assert len(rpc) == 1, [s["name"] for s in spans]
    server_span = rpc[0]
    assert server_span["kind"] == "SpanKind.SERVER"
    assert server_span["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert server_span["parent_id"] == f"0x{PARENT_SPAN_ID}"
    assert server_span["attributes"]["rpc.system"] == "grpc"
    assert server_span["attributes"]["rpc.grpc.status_code"] == 0
    assert server_span["resource"]["attributes"]["service.name"] == "observatory-test"
    children = [s for s in spans if s.get("parent_id") == server_span["context"]["span_id"]]
    assert children, "no SQL span under the RPC's span"
    assert all(s["context"]["trace_id"] == f"0x{TRACE_ID}" for s in children)
    assert any(
        re.search(r"INSERT|SELECT|BEGIN", str(s["attributes"].get("db.statement", "")))
        for s in children
    )
    access = [
        json.loads(line)
        for line in err.read_text().splitlines()
        if line.startswith("{") and '"message": "rpc"' in line
    ]
    assert [line["trace_id"] for line in access] == [TRACE_ID]


@pytest.mark.asyncio
async def test_without_otel_variables_no_span_is_printed(database_url, tmp_path):
    port, http_port = free_port(), free_port()
    out = tmp_path / "stdout"
    with out.open("w") as stdout:
        process = start_server(
            port,
            http_port,
            {"DATABASE_URL": database_url, "OBSERVATORY_WORKERS": "1"},
            stdout=stdout,
            stderr=subprocess.DEVNULL,
        )
        try:
            await wait_ready(http_port, process)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await content_pb2_grpc.ContentServiceStub(channel).CreateContent(
                    content_pb2.CreateContentRequest(content=make_content()),
                    metadata=new_caller().metadata,
                )
        finally:
            assert await stop_server(process) == 0
    assert _spans(out.read_text()) == []

"""OpenTelemetry traces, off unless the standard `OTEL_*` variables ask for
them: `OTEL_TRACES_EXPORTER` (`console`, `otlp`, or any installed exporter's
entry-point name, comma-separated) or `OTEL_EXPORTER_OTLP_ENDPOINT` (then
`otlp`). Everything else (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER`, `OTEL_PROPAGATORS`, `OTEL_BSP_*`, the OTLP endpoint,
headers and protocol) is read by the SDK itself.

The interceptor opens one server span per RPC (`ServerSpan`), continuing a W3C
`traceparent` from the request metadata; the asyncpg instrumentation adds a
child span for each SQL statement."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

import grpc
from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

__all__ = ["ServerSpan", "Tracer", "configure", "shutdown"]

log = logging.getLogger(__name__)

_EXPORTER_GROUP = "opentelemetry_traces_exporter"
# Status codes that are the server's fault (OpenTelemetry's gRPC conventions).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_provider: TracerProvider | None = None


def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The span exporters the environment asks for; empty means tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [
        name.strip().lower()
        for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")
        if name.strip()
    ]
    if not names and (
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        names = ["otlp"]
    return [name for name in names if name != "none"]


def configure() -> Tracer | None:
    """Sets up this process's tracer provider from the environment (once per
    process: call it in each worker, after forking) and returns the tracer for
    server spans, or None when tracing is off."""
    global _provider
    names = exporter_names()
    if not names:
        return None
    if _provider is None:
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "observatory"}))
        provider = TracerProvider(resource=resource)
        for name in names:
            exporter = _exporter(name)
            # The console is for a quick look: each span as soon as it ends.
            if isinstance(exporter, ConsoleSpanExporter):
                provider.add_span_processor(SimpleSpanProcessor(exporter))
            else:
                provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
        _provider = provider
        log.info("tracing on", extra={"exporters": names})
    return _provider.get_tracer("observatory")


def _exporter(name: str) -> SpanExporter:
    if name == "otlp":
        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        )
        name = "otlp_proto_http" if protocol.startswith("http") else "otlp_proto_grpc"
    found = entry_points(group=_EXPORTER_GROUP, name=name)
    if not found:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER names {name!r}, which no installed package provides"
        )
    exporter: SpanExporter = next(iter(found)).load()()
    return exporter


def shutdown() -> None:
    """Flushes and stops the exporters (at server stop)."""
    if _provider is not None:
        _provider.shutdown()


class ServerSpan:
    """The span of one RPC, current (so SQL spans nest under it) from creation
    until `end`."""

    __slots__ = ("_span", "trace_id")

    def __init__(self, tracer: Tracer, name: str, metadata: Mapping[str, Any]) -> None:
        parent = propagate.extract(metadata)
        service, _, method = name.partition("/")
        self._span = tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        # gRPC runs each RPC in a task of its own, so the span stays current
        # for the rest of that task and needs no detach (which would fail for a
        # stream finalised from another context).
        context_api.attach(trace.set_span_in_context(self._span, parent))
        self.trace_id = format(self._span.get_span_context().trace_id, "032x")

    def record_exception(self, exc: BaseException) -> None:
        self._span.record_exception(exc)

    def end(self, code: grpc.StatusCode) -> None:
        self._span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_ERRORS:
            self._span.set_status(Status(StatusCode.ERROR, code.name))
        self._span.end()

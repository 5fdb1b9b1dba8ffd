"""`create_server(settings)`: builds the whole service, connects nothing at import."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from observatory.v1 import (
    actor_pb2,
    actor_pb2_grpc,
    admin_pb2,
    admin_pb2_grpc,
    content_pb2,
    content_pb2_grpc,
    credit_pb2,
    credit_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
    vector_pb2,
    vector_pb2_grpc,
)

from server import idempotency, pagination, replicas, tls, uow
from server.actors.service import ActorService
from server.actors.servicer import ActorServicer
from server.admin.service import AdminService
from server.admin.servicer import AdminServicer
from server.auth import Authenticator
from server.content.partitions import keep_partitions_ready
from server.content.service import ContentService
from server.content.servicer import ContentServicer
from server.credits.service import EXPIRY_BATCH, CreditService
from server.credits.servicer import CreditServicer
from server.db import connect_directly, create_engine
from server.health import HealthMonitor
from server.interceptor import ObservatoryInterceptor
from server.limits import Limits
from server.networks.servicer import NetworkServicer
from server.ops import metrics, tracing
from server.ops.http import SidePort
from server.periodic import Periodic
from server.settings import Settings
from server.vectors import wire
from server.vectors.service import VectorService
from server.vectors.servicer import VectorServicer

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAINTENANCE_INTERVAL_S = 6 * 3600

SERVICE_NAMES = (
    content_pb2.DESCRIPTOR.services_by_name["ContentService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    actor_pb2.DESCRIPTOR.services_by_name["ActorService"].full_name,
    credit_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name,
    vector_pb2.DESCRIPTOR.services_by_name["VectorService"].full_name,
    network_pb2.DESCRIPTOR.services_by_name["NetworkService"].full_name,
)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Clients may ping every 10 s, also between calls.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Several workers share one port only when asked to.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ]


@dataclass
class App:
    server: grpc.aio.Server
    port: int
    units: uow.Database
    monitor: HealthMonitor
    content: ContentService
    maintenance: Periodic
    credit_expiry: Periodic
    side_port: SidePort | None = None
    # The read replica (DATABASE_READ_URL), if any; units.dispose() closes it.
    replica: replicas.Replica | None = None
    # The worker's limits and their counts (server.limits).
    limits: Limits | None = None

    async def stop(self, grace: float | None) -> None:
        """Health goes NOT_SERVING, in-flight RPCs get `grace` seconds, then
        the pool closes."""
        if self.side_port is not None:
            self.side_port.serving = False
        await self.monitor.stop()
        await self.maintenance.stop()
        await self.credit_expiry.stop()
        await self.server.stop(grace)
        await self.units.dispose()
        if self.side_port is not None:
            await self.side_port.stop()
        tracing.shutdown()


class _GenericHandlersOnly:
    """A grpc.aio server as the generated `add_*_to_server` functions (and
    health and reflection) see it: each service is served by its generic
    handler only. grpc.aio (1.85) keeps a pending request per *registered*
    method and waits on all of them for every call that arrives, which cost
    about 60 µs per call with our ~56 methods; a generic handler is one
    dictionary look-up by method name."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: Any) -> None:
        """Left out on purpose: the generic handler serves these methods."""


def served_by_generic_handlers(server: grpc.aio.Server) -> Any:
    """`server`, for registering services on it by generic handlers only
    (see _GenericHandlersOnly); bench/bare_server.py registers the same way."""
    return _GenericHandlersOnly(server)


async def create_server(settings: Settings, database_url: str) -> App:
    engine = create_engine(settings, database_url)
    side_port = None
    if settings.http_listen:
        # Bound first: a busy port stops start-up before anything else runs.
        metrics.instrument_engine(engine)
        side_port = SidePort(
            settings.http_listen,
            lambda: engine.pool,
            lambda: connect_directly(database_url),
            reuse_port=settings.workers > 1,
        )
        await side_port.start()
    replica = replicas.from_settings(settings)
    units = uow.Database(
        engine,
        lambda: connect_directly(database_url),
        replica,
        statement_timeout_s=settings.statement_timeout_s,
    )
    if side_port is not None:
        side_port.replica_state = lambda: replicas.replica_state(replica)
    # Page tokens are signed with a key of the deployment's (its token secret's).
    pagination.use_key(pagination.deployment_key(settings.jwt_secret, settings.jwt_public_key))
    content = ContentService(units)
    limits = Limits(settings)
    server = grpc.aio.server(
        # One interceptor: a call crosses nothing else (limits are its admission).
        interceptors=[
            ObservatoryInterceptor(
                Authenticator(settings),
                tracing.configure(),
                admission=limits,
                decoders={wire.UPSERT_ITEMS_METHOD: wire.decode_upsert_items},
            )
        ],
        options=server_options(settings),
    )
    registry = served_by_generic_handlers(server)
    content_pb2_grpc.add_ContentServiceServicer_to_server(
        ContentServicer(content, units, limits), registry
    )
    credits = CreditService(units)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(AdminService(credits), units), registry
    )
    actor_pb2_grpc.add_ActorServiceServicer_to_server(
        ActorServicer(ActorService(units), units), registry
    )
    credit_pb2_grpc.add_CreditServiceServicer_to_server(CreditServicer(credits, units), registry)
    vector_pb2_grpc.add_VectorServiceServicer_to_server(
        VectorServicer(VectorService(units), units, limits), registry
    )
    network_pb2_grpc.add_NetworkServiceServicer_to_server(NetworkServicer(units, limits), registry)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, registry)
    if settings.reflection:
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            registry,
        )
    port = tls.listen(server, settings)  # TLS when OBSERVATORY_TLS_CERT/KEY are set
    if replica is not None:
        await replica.probe()
        replica.start()
    monitor = HealthMonitor(units, health, SERVICE_NAMES, settings.health_interval, replica)
    await monitor.probe()
    await server.start()
    monitor.start()
    if side_port is not None:
        side_port.serving = True
    maintenance = Periodic(
        "maintenance", MAINTENANCE_INTERVAL_S, lambda: _maintain(units, content, settings)
    )
    maintenance.start()
    credit_expiry = Periodic(
        "credit expiry", settings.credit_expiry_interval, lambda: _expire_credits(units, credits)
    )
    credit_expiry.start()
    return App(
        server=server,
        port=port,
        units=units,
        monitor=monitor,
        content=content,
        maintenance=maintenance,
        credit_expiry=credit_expiry,
        side_port=side_port,
        replica=replica,
        limits=limits,
    )


async def _maintain(units: uow.Database, content: ContentService, settings: Settings) -> None:
    """Run at start-up and every few hours: keeps content partitions ready a
    year ahead and forgets request IDs past their retention."""
    try:
        made = await keep_partitions_ready(units, settings.partitions_ahead)
        if made:
            log.info("created content partitions", extra={"count": made})
        forgotten = await idempotency.forget_old_request_ids(units, settings.request_id_days)
        if forgotten:
            log.info("forgot expired request IDs", extra={"count": forgotten})
    except Exception as exc:  # the database may be down; the next round retries
        log.warning("maintenance failed", extra={"error": repr(exc)})


async def _expire_credits(units: uow.Database, credits: CreditService) -> None:
    """Releases reservations past their expire_time (see CreditService.expire_lapsed),
    a batch of accounts per statement (each its own transaction) until none is left."""
    try:
        expired = 0
        while True:
            async with units.autocommit() as unit:  # it writes: never on a replica
                swept, batch_expired = await credits.expire_lapsed(unit)
            expired += batch_expired
            metrics.RESERVATIONS_EXPIRED.inc(batch_expired)
            if swept < EXPIRY_BATCH:
                break
        if expired:
            log.info("expired credit reservations", extra={"count": expired})
    except Exception as exc:  # the database may be down; the next round retries
        log.warning("credit expiry failed", extra={"error": repr(exc)})

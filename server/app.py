"""`create_server(settings)`: builds the whole service, connects nothing at import."""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
    vector_pb2,
    vector_pb2_grpc,
)

from server import idempotency
from server.actors.service import ActorService
from server.actors.servicer import ActorServicer
from server.admin.service import AdminService
from server.admin.servicer import AdminServicer
from server.auth import Authenticator
from server.content.service import ContentService
from server.content.servicer import ContentServicer
from server.credits.service import CreditService
from server.credits.servicer import CreditServicer
from server import uow
from server.db import Database, connect_directly, create_engine
from server.health import HealthMonitor
from server.interceptor import ObservatoryInterceptor
from server.periodic import Periodic
from server.settings import Settings
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
    db: Database
    units: uow.Database
    monitor: HealthMonitor
    content: ContentService
    maintenance: Periodic
    credit_expiry: Periodic

    async def stop(self, grace: float | None) -> None:
        """Health goes NOT_SERVING, in-flight RPCs get `grace` seconds, then
        the pool closes."""
        await self.monitor.stop()
        await self.maintenance.stop()
        await self.credit_expiry.stop()
        await self.server.stop(grace)
        await self.units.dispose()


async def create_server(settings: Settings, database_url: str) -> App:
    db = Database(create_engine(settings, database_url))
    # TRANSITIONAL: domains move from `db` to units of work one by one.
    units = uow.Database(db.engine, lambda: connect_directly(database_url))
    content = ContentService(db)
    server = grpc.aio.server(
        interceptors=[ObservatoryInterceptor(Authenticator(settings))],
        options=server_options(settings),
    )
    content_pb2_grpc.add_ContentServiceServicer_to_server(ContentServicer(content, db), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(AdminService(db)), server)
    actor_pb2_grpc.add_ActorServiceServicer_to_server(ActorServicer(ActorService(db)), server)
    credits = CreditService(db)
    credit_pb2_grpc.add_CreditServiceServicer_to_server(CreditServicer(credits), server)
    vector_pb2_grpc.add_VectorServiceServicer_to_server(VectorServicer(VectorService(db)), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
    port = server.add_insecure_port(settings.listen)
    monitor = HealthMonitor(units, health, SERVICE_NAMES, settings.health_interval)
    await monitor.probe()
    await server.start()
    monitor.start()
    maintenance = Periodic(
        "maintenance", MAINTENANCE_INTERVAL_S, lambda: _maintain(db, content, settings)
    )
    maintenance.start()
    credit_expiry = Periodic(
        "credit expiry", settings.credit_expiry_interval, lambda: _expire_credits(credits)
    )
    credit_expiry.start()
    return App(
        server=server,
        port=port,
        db=db,
        units=units,
        monitor=monitor,
        content=content,
        maintenance=maintenance,
        credit_expiry=credit_expiry,
    )


async def _maintain(db: Database, content: ContentService, settings: Settings) -> None:
    """Run at start-up and every few hours: keeps content partitions ready a
    year ahead and forgets request IDs past their retention."""
    try:
        made = await content.prepare_partitions(settings.partitions_ahead)
        if made:
            log.info("created content partitions", extra={"count": made})
        forgotten = await idempotency.forget_old_request_ids(db, settings.request_id_days)
        if forgotten:
            log.info("forgot expired request IDs", extra={"count": forgotten})
    except Exception as exc:  # the database may be down; the next round retries
        log.warning("maintenance failed", extra={"error": repr(exc)})


async def _expire_credits(credits: CreditService) -> None:
    """Releases reservations past their expire_time (see CreditService.expire_lapsed)."""
    try:
        expired = await credits.expire_lapsed()
        if expired:
            log.info("expired credit reservations", extra={"count": expired})
    except Exception as exc:  # the database may be down; the next round retries
        log.warning("credit expiry failed", extra={"error": repr(exc)})

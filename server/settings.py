"""Runtime settings, read from the environment in one place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers
    and taskset narrow), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Every knob the service reads. Field aliases are the environment names."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    listen: str = Field("127.0.0.1:50051", alias="OBSERVATORY_LISTEN")
    database_url: str | None = Field(None, alias="DATABASE_URL")
    # A streaming replica of DATABASE_URL for read-only RPCs (server.replicas).
    database_read_url: str | None = Field(None, alias="DATABASE_READ_URL")
    # Reads go to the primary while the replica's replay lags more than this.
    max_replica_lag_s: float = Field(5.0, alias="OBSERVATORY_MAX_REPLICA_LAG_S", ge=0)
    data_dir: Path = Field(Path(".data"), alias="OBSERVATORY_DATA_DIR")
    jwt_secret: str | None = Field(None, alias="OBSERVATORY_JWT_SECRET")
    jwt_public_key: str | None = Field(None, alias="OBSERVATORY_JWT_PUBLIC_KEY")
    jwt_issuer: str | None = Field(None, alias="OBSERVATORY_JWT_ISSUER")
    jwt_audience: str | None = Field(None, alias="OBSERVATORY_JWT_AUDIENCE")
    # The development secret in the data dir serves only the embedded database
    # unless this is set.
    allow_dev_secret: bool = Field(False, alias="OBSERVATORY_ALLOW_DEV_SECRET")
    tls_cert: str | None = Field(None, alias="OBSERVATORY_TLS_CERT")
    tls_key: str | None = Field(None, alias="OBSERVATORY_TLS_KEY")
    tls_client_ca: str | None = Field(None, alias="OBSERVATORY_TLS_CLIENT_CA")
    pool_size: int = Field(5, alias="DATABASE_POOL_SIZE", ge=1)
    max_overflow: int = Field(10, alias="DATABASE_MAX_OVERFLOW", ge=0)
    pool_timeout: float = Field(30.0, alias="DATABASE_POOL_TIMEOUT", gt=0)
    pool_recycle: int = Field(3600, alias="DATABASE_POOL_RECYCLE")
    # PgBouncer in transaction mode cannot keep prepared statements.
    pgbouncer: bool = Field(False, alias="DATABASE_PGBOUNCER")
    workers: int = Field(default_factory=usable_cpus, alias="OBSERVATORY_WORKERS", ge=1)
    # The event loop each worker runs: uvloop (libuv; the faster one in
    # bench/results/points.md) or the standard library's.
    event_loop: Literal["uvloop", "asyncio"] = Field("uvloop", alias="OBSERVATORY_EVENT_LOOP")
    reflection: bool = Field(True, alias="OBSERVATORY_REFLECTION")
    health_interval: float = Field(1.0, alias="OBSERVATORY_HEALTH_INTERVAL", gt=0)
    shutdown_grace: float = Field(10.0, alias="OBSERVATORY_SHUTDOWN_GRACE", ge=0)
    log_level: str = Field(
        "INFO", validation_alias=AliasChoices("OBSERVATORY_LOG_LEVEL", "LOG_LEVEL")
    )
    # Days a request_id keeps answering retries (AIP-155) before it is forgotten.
    request_id_days: int = Field(7, alias="OBSERVATORY_REQUEST_ID_DAYS", ge=1)
    # Months of content partitions kept ready ahead of today.
    partitions_ahead: int = Field(12, alias="OBSERVATORY_PARTITIONS_AHEAD", ge=1)
    # The longest any SQL statement may run (a nearer client deadline wins), and
    # the longest a session may sit idle inside a transaction.
    statement_timeout_s: float = Field(60.0, alias="OBSERVATORY_STATEMENT_TIMEOUT_S", gt=0)
    # Seconds between sweeps that release reservations past their expire_time.
    credit_expiry_interval: float = Field(15.0, alias="OBSERVATORY_CREDIT_EXPIRY_INTERVAL", gt=0)
    # The HTTP side port (/metrics, /livez, /readyz); empty turns it off.
    http_listen: str = Field("127.0.0.1:9464", alias="OBSERVATORY_HTTP_LISTEN")
    # A directory or s3://bucket/prefix; unset: <data dir>/backups.
    backup_url: str | None = Field(None, alias="OBSERVATORY_BACKUP_URL")
    backup_retention_days: int = Field(30, alias="OBSERVATORY_BACKUP_RETENTION_DAYS", ge=1)
    # Per-worker limits (server.limits): streaming RPCs one caller may have
    # open at once, and RPCs served at once; more are refused at once.
    max_streams_per_caller: int = Field(8, alias="OBSERVATORY_MAX_STREAMS_PER_CALLER", ge=1)
    max_concurrent_rpcs: int = Field(1000, alias="OBSERVATORY_MAX_CONCURRENT_RPCS", ge=1)
    # Seconds an export may wait for a client that does not read before it
    # ends (and gives its snapshot's connection back).
    export_idle_s: float = Field(60.0, alias="OBSERVATORY_EXPORT_IDLE_S", gt=0)
    # Bulk streams (IngestContent, UpsertItems; server.bulk): a batch is
    # written once it holds this many bytes of rows (or 5,000 rows), on at
    # most OBSERVATORY_BULK_WRITERS connections at once per worker (unset:
    # min(4, DATABASE_POOL_SIZE / 2), at least 1).
    bulk_batch_bytes: int = Field(
        8 * 1024 * 1024, alias="OBSERVATORY_BULK_BATCH_BYTES", ge=64 * 1024
    )
    bulk_writers: int | None = Field(None, alias="OBSERVATORY_BULK_WRITERS", ge=1)


class ConfigurationError(Exception):
    """Settings the server cannot start with; the message is one line that says
    what to change."""

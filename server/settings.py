"""Runtime settings, read from the environment in one place."""

from __future__ import annotations

import os
from pathlib import Path

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
    data_dir: Path = Field(Path(".data"), alias="OBSERVATORY_DATA_DIR")
    jwt_secret: str | None = Field(None, alias="OBSERVATORY_JWT_SECRET")
    jwt_public_key: str | None = Field(None, alias="OBSERVATORY_JWT_PUBLIC_KEY")
    pool_size: int = Field(5, alias="DATABASE_POOL_SIZE", ge=1)
    max_overflow: int = Field(10, alias="DATABASE_MAX_OVERFLOW", ge=0)
    pool_timeout: float = Field(30.0, alias="DATABASE_POOL_TIMEOUT", gt=0)
    pool_recycle: int = Field(3600, alias="DATABASE_POOL_RECYCLE")
    # PgBouncer in transaction mode cannot keep prepared statements.
    pgbouncer: bool = Field(False, alias="DATABASE_PGBOUNCER")
    workers: int = Field(default_factory=usable_cpus, alias="OBSERVATORY_WORKERS", ge=1)
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
    # Seconds between sweeps that release reservations past their expire_time.
    credit_expiry_interval: float = Field(15.0, alias="OBSERVATORY_CREDIT_EXPIRY_INTERVAL", gt=0)

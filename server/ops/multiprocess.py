"""Set-up for prometheus-client's multiprocess mode, done by the parent before
it forks the workers. This module must not import prometheus_client: the
library picks its value storage from the environment when it is imported."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare() -> Path | None:
    """Points every worker's metrics at one directory of shared files, so a
    scrape of any worker shows the sum of all. Uses `PROMETHEUS_MULTIPROC_DIR`
    when the operator set it (emptied first: files of an earlier run would be
    counted again), otherwise a fresh temporary directory, which is returned so
    that the caller can remove it with `cleanup` when the workers are gone."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the metrics directory was set")
    configured = os.environ.get(ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        return None
    created = Path(tempfile.mkdtemp(prefix="observatory-metrics-"))
    os.environ[ENV] = str(created)
    return created


def cleanup(created: Path | None) -> None:
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        os.environ.pop(ENV, None)

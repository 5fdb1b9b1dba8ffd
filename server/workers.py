"""Serving with several processes on one port (SO_REUSEPORT)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from typing import Any


def run_forked(count: int, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    """Forks `count` processes running `target(*args)` and waits for them all.

    Call it before any gRPC object exists in this process: each child builds its
    own server and binds the shared port itself. SIGTERM and SIGINT received
    here are passed on to the children as SIGTERM, so they shut down gracefully."""
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=target, args=args, name=f"worker-{i}") for i in range(count)]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()

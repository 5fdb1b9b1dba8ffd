"""Serving with several processes on one port (SO_REUSEPORT)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any


def settle_heap() -> None:
    """Called once a worker has built its server, before it serves. What is
    alive then (modules, tables, compiled statements, the pool's connections)
    lives as long as the process, so the cyclic garbage collector is told to
    stop walking it (`gc.freeze`). Otherwise each full collection walks that
    whole start-up heap on the event loop: about 75 ms each, three times per
    100,000 items an UpsertItems stream converts (bench/README.md)."""
    gc.collect()
    gc.freeze()


def run_forked(count: int, target: Callable[..., None], args: tuple[Any, ...]) -> int:
    """Forks `count` processes running `target(*args)` and waits for them all;
    0 when every one exited cleanly, else the exit status of the first that did
    not (the others are then stopped: a server missing workers is not healthy).

    Call it before any gRPC object exists in this process: each child builds its
    own server and binds the shared port itself. SIGTERM and SIGINT received
    here are passed on to the children as SIGTERM, so they shut down gracefully."""
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=target, args=args, name=f"worker-{i}") for i in range(count)]
    for child in children:
        child.start()

    def stop_all(_signum: int = signal.SIGTERM, _frame: object = None) -> None:
        for child in children:
            if child.pid and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    failed = 0
    running = {child.sentinel: child for child in children}
    while running:
        for sentinel in wait(list(running)):
            child = running.pop(sentinel)  # type: ignore[arg-type]  # sentinels are ints
            child.join()
            if child.exitcode and not failed:
                # A signal's death is reported the way shells do: 128 + its number.
                failed = child.exitcode if child.exitcode > 0 else 128 - child.exitcode
                stop_all()
    return failed

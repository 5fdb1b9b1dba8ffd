"""`--profile`: py-spy samples of the server under test during each of its
measurements, saved under .data/bench/profiles/ as collapsed stacks (for
flamegraph.pl or speedscope) plus a text summary of the hottest functions.
py-spy is optional (`.venv/bin/pip install py-spy`); profiled figures are a
little lower than unprofiled ones. BENCH_PROFILE_NATIVE=1 adds C and Cython
frames (much slower)."""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextmanager
def sampled(pid: int, raw_path: Path, rate: int = 100) -> Iterator[None]:
    """Samples `pid` and its subprocesses with py-spy while the block runs."""
    tool = py_spy()
    if tool is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [tool, "record", "-p", str(pid), "-r", str(rate), "-s", "-f", "raw"]
    if os.environ.get("BENCH_PROFILE_NATIVE"):
        argv.append("--native")  # C and Cython frames too (grpc, uvloop, asyncpg)
    spy = subprocess.Popen(
        [*argv, "-o", str(raw_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    if raw_path.exists():
        raw_path.with_suffix(".txt").write_text(summarize(raw_path))


def summarize(raw_path: Path, top: int = 40) -> str:
    """The functions most often on the stack (inclusive) and on top of it (self)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return "no samples\n"
    out = [f"{total} samples (active threads only)", "", "inclusive:"]
    out += [f"{n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"{n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(out) + "\n"

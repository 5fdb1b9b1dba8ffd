"""Unary gRPC load with h2load: a constant request body, 64 streams in flight."""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message


def grpc_body(request: Message, path: Path) -> Path:
    """Writes the gRPC length-prefixed frame of `request` (uncompressed) to `path`."""
    payload = request.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">BI", 0, len(payload)) + payload)
    return path


@dataclass(frozen=True)
class H2Result:
    rate: float  # requests per second over the timed part
    done: int
    succeeded: int
    status_2xx: int
    failed: int
    errored: int
    timeouts: int
    output: str

    @property
    def all_ok(self) -> bool:
        return (
            self.done > 0
            and self.succeeded == self.done
            and self.status_2xx == self.done
            and self.failed == self.errored == self.timeouts == 0
        )


_FINISHED = re.compile(r"finished in [\d.]+\w*, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx")


def parse(output: str) -> H2Result:
    finished = _FINISHED.search(output)
    requests = _REQUESTS.search(output)
    status = _STATUS.search(output)
    if not (finished and requests and status):
        raise RuntimeError(f"cannot parse h2load output:\n{output}")
    _total, _started, done, succeeded, failed, errored, timeouts = map(int, requests.groups())
    return H2Result(
        rate=float(finished.group(1)),
        done=done,
        succeeded=succeeded,
        status_2xx=int(status.group(1)),
        failed=failed,
        errored=errored,
        timeouts=timeouts,
        output=output,
    )


def run(
    h2load: str,
    *,
    port: int,
    method: str,
    body: Path,
    token: str,
    duration: float,
    warmup: float,
    clients: int = 4,
    streams: int = 16,
) -> H2Result:
    """`clients` connections x `streams` concurrent streams for `warmup` then
    `duration` seconds (h2load only counts the timed part)."""
    argv = [
        h2load,
        "-c",
        str(clients),
        "-m",
        str(streams),
        "-t",
        "1",
        "-D",
        f"{round(duration * 1000)}ms",
        "--warm-up-time",
        f"{round(warmup * 1000)}ms",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        f"authorization: Bearer {token}",
        f"http://127.0.0.1:{port}{method}",
    ]
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise RuntimeError(f"h2load failed ({completed.returncode}):\n{output}")
    return parse(output)

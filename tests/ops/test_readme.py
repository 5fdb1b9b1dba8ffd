"""The README's commands, run as written against a real server: every ```sh
block in order in one bash session (with the test's ports in place of the
defaults), and the Python client. A block under `<!-- readme-test: skip -->`
is not run (the reason is in the comment); one under `<!-- readme-test: needs
X -->` only where X is installed."""

import asyncio
import os
import re
import shutil
import sys

import pytest

from server import migrate
from tests.helpers import TEST_SECRET
from tests.ops.helpers import ROOT, free_port, start_server, stop_server, wait_ready

README = ROOT / "README.md"
_BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<note>[^>]*?) -->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S
)

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("bash", "jq", "npm", "curl")),
    reason="the README's examples need bash, jq, npm (for buf) and curl",
)


def blocks() -> list[tuple[str, str, str]]:
    """(language, note, body) of each fenced block, in order."""
    return [
        (m["lang"], (m["note"] or "").strip(), m["body"])
        for m in _BLOCK.finditer(README.read_text())
    ]


def test_every_block_says_whether_it_runs():
    for lang, note, body in blocks():
        if lang in {"sh", "python"} and note:
            assert note.startswith(("skip (", "needs ")), (note, body[:80])


def _script(port: int, http_port: int, scratch) -> str:
    lines = ["set -euo pipefail"]
    for lang, note, body in blocks():
        if note.startswith("skip"):
            continue
        if note.startswith("needs ") and not shutil.which(note.split()[1]):
            continue
        body = body.replace("127.0.0.1:50051", f"127.0.0.1:{port}").replace(
            "127.0.0.1:9464", f"127.0.0.1:{http_port}"
        )
        if lang == "sh":
            lines.append(body)
        elif lang == "python":
            client = scratch / "client.py"
            client.write_text(body)
            lines.append(f"TOKEN=$TOKEN .venv/bin/python {client}")
    return "\n".join(lines) + "\n"


@pytest.mark.asyncio
async def test_the_readme_runs_as_written(databases, tmp_path):
    url = databases("readme")
    await asyncio.to_thread(migrate.upgrade, url)
    port, http_port = free_port(), free_port()
    env = {
        "DATABASE_URL": url,
        "OBSERVATORY_WORKERS": "1",
        "OBSERVATORY_DATA_DIR": str(tmp_path / "data"),
    }
    server = start_server(port, http_port, env)
    try:
        await wait_ready(http_port, server)
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            _script(port, http_port, tmp_path),
            cwd=ROOT,
            env={
                **os.environ,
                **env,
                "OBSERVATORY_LISTEN": f"127.0.0.1:{port}",
                "OBSERVATORY_HTTP_LISTEN": f"127.0.0.1:{http_port}",
                "OBSERVATORY_JWT_SECRET": TEST_SECRET,
                "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                # The venv is set up already (make test did it): no reinstall.
                "MAKEFLAGS": "-o .venv/.installed",
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 600)
        output = out.decode()
        assert process.returncode == 0, output[-5000:]
    finally:
        (ROOT / "demo.csv").unlink(missing_ok=True)
        assert await stop_server(server) == 0
    # A few things each part must have shown.
    assert '"allocated": "5000"' in output  # the demo's grant
    assert '"status": "RESERVATION_STATUS_SETTLED"' in output
    assert "id,platform,arena,likes_count" in output  # head of the CSV export
    assert "rows exported" in output  # the Python client
    assert '"status": "ready"' in output  # /readyz
    assert "grpc_server_handled_total{" in output  # /metrics
    assert "observatory_" in output and ".dump" in output  # backup, restore --list

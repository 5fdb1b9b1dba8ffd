"""Clients in other languages: `buf generate` (buf.gen.yaml) makes the committed
Python stubs byte for byte and the TypeScript/JavaScript ones, and the Node.js
example under examples/node runs against a real server. Skipped where Node.js
and npm are missing."""

import asyncio
import os
import shutil
import subprocess

import pytest
import pytest_asyncio

from server import migrate
from server.app import create_server
from server.auth import ADMIN, USER, issue_token
from server.ops import demo
from tests.conftest import make_settings
from tests.helpers import TEST_SECRET
from tests.ops.helpers import ROOT

EXAMPLE = ROOT / "examples" / "node"
BUF = ROOT / "tools" / "node_modules" / ".bin" / "buf"

pytestmark = pytest.mark.skipif(
    not (shutil.which("node") and shutil.which("npm")), reason="needs Node.js and npm"
)


def _run(argv: list[str], cwd=ROOT, **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=600, check=False, **kwargs
    )
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """buf (make buf) and the example's npm packages installed, then
    `buf generate` into a scratch directory."""
    if not BUF.exists():
        _run(["make", "-s", "buf"])
    if not (EXAMPLE / "node_modules" / ".bin" / "protoc-gen-es").exists():
        _run(["npm", "install", "--no-audit", "--no-fund"], cwd=EXAMPLE)
    out = tmp_path_factory.mktemp("buf-generate")
    _run([str(BUF), "generate", "-o", str(out)])
    return out / "gen"


def test_buf_generate_makes_the_committed_python_stubs(generated):
    committed = ROOT / "generated" / "observatory" / "v1"
    made = generated / "python" / "observatory" / "v1"
    stubs = sorted(path.name for path in committed.iterdir() if path.name != "__init__.py")
    assert sorted(path.name for path in made.iterdir()) == stubs
    for name in stubs:
        assert (made / name).read_bytes() == (committed / name).read_bytes(), name


def test_buf_generate_makes_typescript_stubs(generated):
    made = generated / "es" / "observatory" / "v1"
    for service in ("content", "actor", "credit", "vector", "network", "admin"):
        assert (made / f"{service}_pb.js").exists()
        assert (made / f"{service}_pb.d.ts").exists()
    assert "export declare const ContentService" in (made / "content_pb.d.ts").read_text()


@pytest_asyncio.fixture
async def demo_server(databases):
    url = databases("clients")
    await asyncio.to_thread(migrate.upgrade, url)
    app = await create_server(make_settings(), url)
    await demo.load(
        f"127.0.0.1:{app.port}",
        issue_token(TEST_SECRET, demo.demo_user(), USER),
        issue_token(TEST_SECRET, demo.admin_user(), ADMIN),
    )
    yield app
    await app.stop(0)


@pytest.mark.asyncio
async def test_node_example_lists_searches_streams_and_reports_errors(generated, demo_server):
    await asyncio.to_thread(_run, ["npm", "run", "--silent", "generate"], EXAMPLE)
    process = await asyncio.create_subprocess_exec(
        "node",
        "index.js",
        cwd=EXAMPLE,
        env={
            **os.environ,
            "TOKEN": issue_token(TEST_SECRET, demo.demo_user(), USER),
            "OBSERVATORY_URL": f"http://127.0.0.1:{demo_server.port}",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert [line for line in lines if line.startswith("list twitter ")][:3] and len(
        [line for line in lines if line.startswith("list ")]
    ) == 3
    assert any(line.startswith("search ") and "likes=" in line for line in lines)
    assert len([line for line in lines if line.startswith("hit demo-")]) == 3
    assert lines[-1] == "error NotFound"

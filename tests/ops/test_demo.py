"""`make demo` (`python -m server demo`): loads the demo data through the API of
a running server, prints only a token, and changes nothing the second time."""

import asyncio
import os
import sys

import grpc
import jwt
import pytest
import pytest_asyncio
from observatory.v1 import (
    actor_pb2,
    actor_pb2_grpc,
    content_pb2,
    content_pb2_grpc,
    credit_pb2,
    credit_pb2_grpc,
    vector_pb2,
    vector_pb2_grpc,
)

from server import migrate
from server.app import create_server
from server.ops import demo
from tests.conftest import make_settings
from tests.helpers import TEST_SECRET
from tests.ops.helpers import ROOT, free_port


async def _demo(port: int) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "demo",
        cwd=ROOT,
        env={
            **os.environ,
            "OBSERVATORY_LISTEN": f"127.0.0.1:{port}",
            "OBSERVATORY_JWT_SECRET": TEST_SECRET,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


@pytest_asyncio.fixture
async def server(databases):
    url = databases("demo")
    await asyncio.to_thread(migrate.upgrade, url)
    app = await create_server(make_settings(), url)
    yield app
    await app.stop(0)


async def _what_the_demo_user_sees(port: int, token: str) -> dict[str, object]:
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        contents = await content_pb2_grpc.ContentServiceStub(channel).ListContent(
            content_pb2.ListContentRequest(page_size=1000), metadata=metadata
        )
        actors = await actor_pb2_grpc.ActorServiceStub(channel).ListActors(
            actor_pb2.ListActorsRequest(page_size=1000), metadata=metadata
        )
        balance = await credit_pb2_grpc.CreditServiceStub(channel).GetBalance(
            credit_pb2.GetBalanceRequest(), metadata=metadata
        )
        collection = await vector_pb2_grpc.VectorServiceStub(channel).GetCollection(
            vector_pb2.GetCollectionRequest(name=demo.COLLECTION), metadata=metadata
        )
    return {
        "contents": sorted((c.id, c.platform, c.arena, c.author_id) for c in contents.contents),
        "actors": sorted((a.id, a.canonical_name, len(a.presences)) for a in actors.actors),
        "allocated": balance.allocated,
        "items": collection.item_count,
    }


@pytest.mark.asyncio
async def test_demo_loads_once_and_prints_a_token(server):
    code, out, err = await _demo(server.port)
    assert code == 0, err
    token = out.strip()
    assert "\n" not in token
    claims = jwt.decode(token, TEST_SECRET, algorithms=["HS256"])
    assert claims["sub"] == str(demo.demo_user())
    first = await _what_the_demo_user_sees(server.port, token)
    posts = list(demo.posts())
    assert len(first["contents"]) == len(posts)
    assert {platform for _, platform, _, _ in first["contents"]} >= {
        "twitter",
        "facebook",
        "reddit",
        "youtube",
        "rss",
    }
    assert {arena for _, _, arena, _ in first["contents"]} == {"social", "news", "video", "forum"}
    # Content by accounts with a presence is linked to its actor.
    assert sum(1 for *_, author in first["contents"] if author) >= len(posts) - 3
    assert len(first["actors"]) == len(demo.ACTORS)
    assert all(presences >= 1 for _, _, presences in first["actors"])
    assert first["allocated"] == 5000
    assert first["items"] == len(posts)

    code, out, again = await _demo(server.port)
    assert code == 0, again
    assert again == err
    assert await _what_the_demo_user_sees(server.port, out.strip()) == first


@pytest.mark.asyncio
async def test_demo_without_a_server_says_to_start_one():
    code, out, err = await _demo(free_port())
    assert code == 1
    assert out == ""
    assert "make run" in err
    assert "Traceback" not in err


def test_embeddings_are_deterministic_unit_vectors():
    vector = demo.embed("Wind power and the climate")
    assert vector == demo.embed("wind power and the climate")
    assert len(vector) == demo.DIMENSION
    assert abs(sum(x * x for x in vector) - 1) < 1e-4
    assert vector != demo.embed("election night")

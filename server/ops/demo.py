"""`python -m server demo` (`make demo`): a small, realistic data set loaded
through the public gRPC API of a running server, for the development user
that `make token` signs for, so every README example has something to find.

Running it again changes nothing: creations carry request IDs derived from
fixed names (AIP-155 answers a retry with the original result), presences and
aliases already there are skipped, and vector items are upserted by ID.
Progress goes to stderr; stdout gets only the user's token, so
`TOKEN=$(make -s demo)` works.

The embeddings come from a deterministic generator (hashed bag of words, 16
dimensions, unit length): texts sharing words are near each other, with no
model to download.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import re
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from server import auth
from server.settings import ConfigurationError, Settings

DIMENSION = 16
COLLECTION = "demo_posts"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "observatory:demo")
# The first Monday of the month the demo's posts start in.
_START = datetime(2026, 10, 5, 8, 0, tzinfo=UTC)


def request_id(name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, name))


def demo_user() -> uuid.UUID:
    """The user `make token` signs for by default."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"observatory:dev:{auth.USER}")


def admin_user() -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"observatory:dev:{auth.ADMIN}")


def embed(text: str) -> list[float]:
    """A deterministic unit vector for `text`: each word adds ±1 to a dimension
    picked by its hash."""
    vector = [0.0] * DIMENSION
    for word in re.findall(r"\w+", text.lower()):
        digest = hashlib.sha256(word.encode()).digest()
        vector[digest[0] % DIMENSION] += 1.0 if digest[1] % 2 else -1.0
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [round(x / norm, 6) for x in vector]


# -- the data ----------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    platform: str
    user_id: str
    username: str
    followers: int
    verified: bool = False


@dataclass(frozen=True)
class DemoActor:
    key: str
    name: str
    kind: str  # ACTOR_TYPE_* suffix
    description: str
    accounts: tuple[Account, ...]
    aliases: tuple[str, ...] = ()


ACTORS = (
    DemoActor(
        "frederiksen",
        "Mette Frederiksen",
        "PERSON",
        "Prime minister",
        (
            Account("twitter", "tw-1001", "Statsmin", 410_000, verified=True),
            Account("facebook", "fb-2001", "mettefrederiksen", 620_000, verified=True),
        ),
        aliases=("Statsministeren",),
    ),
    DemoActor(
        "dr",
        "Danmarks Radio",
        "MEDIA",
        "Public broadcaster",
        (
            Account("twitter", "tw-1002", "DRNyheder", 350_000, verified=True),
            Account("youtube", "yt-3002", "drnyheder", 180_000),
            Account("rss", "dr.dk", "dr.dk", 0),
        ),
        aliases=("DR",),
    ),
    DemoActor(
        "greenpeace",
        "Greenpeace Nordic",
        "ORGANIZATION",
        "Environmental NGO",
        (
            Account("twitter", "tw-1003", "GreenpeaceDK", 45_000),
            Account("reddit", "rd-4003", "greenpeace_nordic", 2_100),
            Account("facebook", "fb-2003", "greenpeacedanmark", 98_000),
        ),
    ),
    DemoActor(
        "rasmussen",
        "Lars Løkke Rasmussen",
        "PERSON",
        "Foreign minister",
        (
            Account("twitter", "tw-1004", "larsloekke", 300_000, verified=True),
            Account("facebook", "fb-2004", "larsloekke", 250_000),
        ),
    ),
    DemoActor(
        "auken",
        "Ida Auken",
        "PERSON",
        "Member of parliament",
        (Account("twitter", "tw-1005", "IdaAuken", 80_000),),
    ),
    DemoActor(
        "frederiksen_fan",
        "Mette Frederiksen (fan page)",
        "UNKNOWN",
        "An unofficial page: a candidate match for the real one",
        (Account("facebook", "fb-2099", "mettefan", 1_200),),
    ),
)

# (account user ID, platform, arena, language, title, text, terms, likes, shares, comments, url)
_POSTS: tuple[tuple[str, str, str, str, str, str, tuple[str, ...], int, int, int, str], ...] = (
    ("tw-1001", "twitter", "social", "da", "", "Vi skal have mere vindkraft i Nordsøen. Klimaet kan ikke vente.", ("climate", "wind power"), 5400, 820, 610, "https://twitter.com/Statsmin/status/1001"),
    ("fb-2001", "facebook", "social", "da", "Klimaaftale", "I dag har vi indgået en bred klimaaftale om energi og vindkraft.", ("climate", "energy", "wind power"), 8800, 1200, 2300, "https://facebook.com/mettefrederiksen/posts/1"),
    ("tw-1002", "twitter", "social", "da", "", "Valget nærmer sig: se vores guide til kandidaterne.", ("election",), 900, 300, 120, "https://www.dr.dk/nyheder/valg/guide?utm_source=twitter"),
    ("dr.dk", "rss", "news", "da", "Guide: sådan stemmer du til valget", "Valget afholdes snart. Her er alt du skal vide om kandidaterne og partierne.", ("election",), 0, 0, 0, "https://dr.dk/nyheder/valg/guide"),
    ("yt-3002", "youtube", "video", "da", "Debat om energipriser", "Partilederne debatterer energipriser og klimaet før valget.", ("energy", "election", "climate"), 3100, 150, 890, "https://youtube.com/watch?v=dr3002a"),
    ("dr.dk", "rss", "news", "da", "Ny rekord for vindkraft", "Vindmøller leverede over halvdelen af strømmen i oktober.", ("wind power", "energy"), 0, 0, 0, "https://dr.dk/nyheder/indland/vindkraft-rekord"),
    ("tw-1003", "twitter", "social", "en", "", "Offshore wind is the fastest way to cut emissions. The climate cannot wait.", ("climate", "wind power"), 1200, 450, 80, "https://twitter.com/GreenpeaceDK/status/1003"),
    ("rd-4003", "reddit", "forum", "en", "AMA: we campaign for a fossil-free Nordic energy system", "Ask us anything about climate policy, energy prices and wind power.", ("climate", "energy", "wind power"), 640, 20, 310, "https://reddit.com/r/Denmark/comments/gp1"),
    ("fb-2003", "facebook", "social", "da", "Stop ny olie", "Skriv under: stop nye olieboringer i Nordsøen, for klimaets skyld.", ("climate", "energy"), 2300, 1900, 410, "https://facebook.com/greenpeacedanmark/posts/3"),
    ("tw-1004", "twitter", "social", "da", "", "Danmark skal føre an i den grønne omstilling i EU. Energi er sikkerhedspolitik.", ("energy",), 2100, 260, 540, "https://twitter.com/larsloekke/status/1004"),
    ("fb-2004", "facebook", "social", "da", "Valgmøde i Aarhus", "Tak for et godt valgmøde i aftes. Vi talte om klimaet, økonomien og valget.", ("election", "climate"), 1500, 90, 230, "https://facebook.com/larsloekke/posts/4"),
    ("tw-1005", "twitter", "social", "da", "", "Elbiler og vindkraft: sådan når vi klimamålet. Tråd 🧵", ("climate", "wind power"), 760, 210, 95, "https://twitter.com/IdaAuken/status/1005"),
    ("tw-1005", "twitter", "social", "en", "", "Energy prices fall as wind power output hits a record in October.", ("energy", "wind power"), 430, 120, 40, "https://twitter.com/IdaAuken/status/1006"),
    ("fb-2099", "facebook", "social", "da", "", "Vi støtter Mette! Del hvis du er enig om klimaet.", ("climate",), 150, 60, 12, "https://facebook.com/mettefan/posts/9"),
    ("tw-9001", "twitter", "social", "en", "", "Does anyone know when the election results come in tonight?", ("election",), 12, 1, 8, "https://twitter.com/someone/status/9001"),
    ("rd-9002", "reddit", "forum", "en", "Energy bills this winter", "How are you all dealing with the energy prices this winter?", ("energy",), 220, 4, 340, "https://reddit.com/r/Denmark/comments/e9002"),
    ("rd-9003", "reddit", "forum", "en", "Wind turbines near my town", "The municipality wants six new wind turbines. Wind power yes, but here?", ("wind power",), 180, 3, 260, "https://reddit.com/r/Denmark/comments/w9003"),
    ("yt-3002", "youtube", "video", "da", "Valgaften live", "Følg valgaftenen live med resultater fra hele landet.", ("election",), 5200, 700, 3100, "https://youtube.com/watch?v=dr3002b"),
    ("dr.dk", "rss", "news", "da", "Klimarådet: målet for 2030 er inden for rækkevidde", "Klimarådet vurderer, at vindkraft og energibesparelser kan nå målet.", ("climate", "wind power", "energy"), 0, 0, 0, "https://dr.dk/nyheder/indland/klimaraadet-2030"),
    ("tw-1002", "twitter", "social", "da", "", "Klimarådet: målet for 2030 er inden for rækkevidde.", ("climate",), 640, 180, 75, "https://www.dr.dk/nyheder/indland/klimaraadet-2030?utm_source=twitter&utm_medium=social"),
    ("tw-1001", "twitter", "social", "da", "", "Tak for tilliden ved valget. Nu går vi i gang med arbejdet.", ("election",), 12_000, 1500, 2200, "https://twitter.com/Statsmin/status/1007"),
    ("fb-2003", "facebook", "social", "en", "Wind power explained", "How offshore wind power works, and why it matters for the climate.", ("wind power", "climate"), 880, 340, 66, "https://facebook.com/greenpeacedanmark/posts/5"),
    ("tw-1004", "twitter", "social", "en", "", "Met EU colleagues on energy security and the climate transition.", ("energy", "climate"), 990, 110, 150, "https://twitter.com/larsloekke/status/1008"),
    ("rd-4003", "reddit", "forum", "en", "Election guide: where the parties stand on climate", "We compared every party's climate and energy plans before the election.", ("election", "climate", "energy"), 510, 40, 190, "https://reddit.com/r/Denmark/comments/gp2"),
)  # fmt: skip


def _display_names() -> dict[str, tuple[str, str]]:
    names = {}
    for actor in ACTORS:
        for account in actor.accounts:
            names[account.user_id] = (account.username, actor.key)
    return names


def posts() -> Iterator[dict[str, Any]]:
    """The demo's content items, as Content field values (without the proto)."""
    names = _display_names()
    for index, row in enumerate(_POSTS):
        user, platform, arena, language, title, text, terms, likes, shares, comments, url = row
        published = _START + timedelta(days=index * 27 // len(_POSTS), hours=index % 9)
        yield {
            "platform": platform,
            "arena": arena,
            "platform_id": f"demo-{index:03d}",
            "content_type": "article" if arena == "news" else "post",
            "title": title,
            "text_content": text,
            "url": url,
            "language": language,
            "published_at": published,
            "author_platform_id": user,
            "author_display_name": names.get(user, (user, ""))[0],
            "likes_count": likes,
            "shares_count": shares,
            "comments_count": comments,
            "views_count": (likes + shares + comments) * 12,
            "search_terms_matched": list(terms),
            "collection_run_id": "demo-run-1",
            "raw_metadata": {"source": "observatory demo", "index": index},
        }


# -- loading -----------------------------------------------------------------------


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")


async def load(target: str, user_token: str, admin_token: str, credentials: Any = None) -> None:
    import grpc
    from google.protobuf import timestamp_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
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

    def stamp(value: datetime) -> timestamp_pb2.Timestamp:
        message = timestamp_pb2.Timestamp()
        message.FromDatetime(value)
        return message

    user = (("authorization", f"Bearer {user_token}"),)
    admin = (("authorization", f"Bearer {admin_token}"),)
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    channel = (
        grpc.aio.secure_channel(target, credentials, options=options)
        if credentials is not None
        else grpc.aio.insecure_channel(target, options=options)
    )
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            raise ConfigurationError(
                f"no Observatory server answers on {target} ({exc.code().name}): "
                "start one with `make run` first"
            ) from None

        actors = actor_pb2_grpc.ActorServiceStub(channel)
        for actor in ACTORS:
            created = await actors.CreateActor(
                actor_pb2.CreateActorRequest(
                    actor=actor_pb2.Actor(
                        canonical_name=actor.name,
                        actor_type=actor_pb2.ActorType.Value(f"ACTOR_TYPE_{actor.kind}"),
                        description=actor.description,
                    ),
                    request_id=request_id(f"actor:{actor.key}"),
                ),
                metadata=user,
            )
            for alias in actor.aliases:
                await actors.AddAlias(
                    actor_pb2.AddAliasRequest(actor_id=created.id, alias=alias), metadata=user
                )
            have = {(p.platform, p.platform_user_id) for p in created.presences}
            if not have:
                current = await actors.GetActor(
                    actor_pb2.GetActorRequest(id=created.id), metadata=user
                )
                have = {(p.platform, p.platform_user_id) for p in current.presences}
            for account in actor.accounts:
                if (account.platform, account.user_id) in have:
                    continue
                await actors.AddPresence(
                    actor_pb2.AddPresenceRequest(
                        presence=actor_pb2.Presence(
                            actor_id=created.id,
                            platform=account.platform,
                            platform_user_id=account.user_id,
                            username=account.username,
                            verified=account.verified,
                            follower_count=account.followers,
                        )
                    ),
                    metadata=user,
                )
        _say(f"actors: {len(ACTORS)}, with presences on several platforms")

        contents = []
        for values in posts():
            message = content_pb2.Content(
                **{
                    key: value
                    for key, value in values.items()
                    if key not in {"published_at", "raw_metadata"}
                }
            )
            message.published_at.CopyFrom(stamp(values["published_at"]))
            message.raw_metadata.update(values["raw_metadata"])
            contents.append(message)
        ingest = content_pb2.IngestContentRequest(
            contents=contents, request_id=request_id("content:ingest:v1")
        )
        result = await content_pb2_grpc.ContentServiceStub(channel).IngestContent(
            iter([ingest]), metadata=user
        )
        _say(f"content: {result.received} items across platforms and arenas")

        grant = await credit_pb2_grpc.CreditServiceStub(channel).GrantCredits(
            credit_pb2.GrantCreditsRequest(
                user_id=str(demo_user()),
                amount=5000,
                valid_from=stamp(datetime(2026, 1, 1, tzinfo=UTC)),
                valid_until=stamp(datetime(2030, 1, 1, tzinfo=UTC)),
                memo="demo grant",
                request_id=request_id("credits:grant:v1"),
            ),
            metadata=admin,
        )
        _say(f"credits: a grant of {grant.amount}")

        vectors = vector_pb2_grpc.VectorServiceStub(channel)
        await vectors.CreateCollection(
            vector_pb2.CreateCollectionRequest(
                collection=vector_pb2.Collection(
                    name=COLLECTION, dimension=DIMENSION, metric=vector_pb2.METRIC_COSINE
                ),
                request_id=request_id("vectors:collection:v1"),
            ),
            metadata=user,
        )
        items = []
        for values in posts():
            item = vector_pb2.Item(
                id=values["platform_id"],
                vector=embed(f"{values['title']} {values['text_content']}"),
                text=f"{values['title']} {values['text_content']}".strip(),
                url=values["url"],
            )
            item.metadata.update(
                {
                    "platform": values["platform"],
                    "arena": values["arena"],
                    "language": values["language"],
                    "terms": values["search_terms_matched"],
                }
            )
            items.append(item)
        upserted = await vectors.UpsertItems(
            iter([vector_pb2.UpsertItemsRequest(collection=COLLECTION, items=items)]),
            metadata=user,
        )
        _say(f"vectors: collection {COLLECTION!r}, {upserted.upserted} items of {DIMENSION} dims")


def _target(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    if host in {"", "0.0.0.0", "[::]", "::"}:  # noqa: S104 (a bind-all address, not ours to bind)
        host = "127.0.0.1"
    return f"{host}:{port}"


def add_command(commands: Any) -> None:
    commands.add_parser(
        "demo",
        help="load a small demo data set into the running server and print a token for it",
    )


def run(_args: argparse.Namespace, settings: Settings) -> None:
    settings = auth.prepare(settings)
    if not settings.jwt_secret:
        raise ConfigurationError("the demo signs its tokens with OBSERVATORY_JWT_SECRET; set it")
    kwargs = {"issuer": settings.jwt_issuer, "audience": settings.jwt_audience}
    user_token = auth.issue_token(settings.jwt_secret, demo_user(), auth.USER, 86400, **kwargs)
    admin_token = auth.issue_token(settings.jwt_secret, admin_user(), auth.ADMIN, 3600, **kwargs)
    credentials = None
    if settings.tls_cert:
        import grpc

        with open(settings.tls_cert, "rb") as cert:
            credentials = grpc.ssl_channel_credentials(root_certificates=cert.read())
    asyncio.run(load(_target(settings.listen), user_token, admin_token, credentials))
    _say("demo data loaded; the token below is the demo user's (also `make token`'s user)")
    sys.stdout.write(user_token + "\n")

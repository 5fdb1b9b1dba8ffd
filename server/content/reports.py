"""GetContentStats, FindDuplicates and MarkDuplicates: figures over a whole
filtered set, every one computed by PostgreSQL. The reads of one report run in
one snapshot unit, so its figures agree with each other."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from observatory.v1 import common_pb2, content_pb2

from server import errors
from server.audit import AuditRepository
from server.auth import Principal
from server.content.report_repository import DuplicateRepository, StatsRepository
from server.content.repository import ContentQuery
from server.content.service import content_query, owner_scope
from server.protoconv import parse_uuid, set_timestamp
from server.uow import UnitOfWork

GRANULARITIES = frozenset({"day", "week", "month"})
DEFAULT_TOP_N = 10
MAX_TOP_N = 100
MAX_MARKED = 10_000


@dataclass(frozen=True, slots=True)
class StatsRequest:
    query: ContentQuery
    granularity: str
    top_n: int


def stats_request(caller: Principal, request: content_pb2.GetContentStatsRequest) -> StatsRequest:
    query = content_query(caller, request.filter)
    granularity = request.granularity or "day"
    if granularity not in GRANULARITIES:
        raise errors.InvalidArgument("granularity", "must be 'day', 'week' or 'month'")
    if request.top_n < 0 or request.top_n > MAX_TOP_N:
        raise errors.InvalidArgument("top_n", f"must be between 0 and {MAX_TOP_N}")
    return StatsRequest(query, granularity, request.top_n or DEFAULT_TOP_N)


async def content_stats(
    uow: UnitOfWork, stats: StatsRequest
) -> content_pb2.GetContentStatsResponse:
    """Volume per period and arena, top authors and terms, engagement: four
    statements, which must run in one snapshot unit to agree."""
    repo = StatsRepository(uow)
    volume = await repo.volume(stats.query, stats.granularity)
    actors = await repo.top_actors(stats.query, stats.top_n)
    terms = await repo.top_terms(stats.query, stats.top_n)
    total, median, p95, mean = await repo.engagement(stats.query)
    response = content_pb2.GetContentStatsResponse(total=total)
    bucket = content_pb2.VolumeBucket()
    current = None
    for period, arena, count in volume:  # ordered by period
        if period != current:
            bucket, current = response.volume.add(), period
            set_timestamp(bucket.period_start, period)
        bucket.count += count
        bucket.by_arena[arena] = count
    for author_id, platform, account, name, count in actors:
        response.top_actors.add(
            author_id=str(author_id) if author_id else "",
            platform=platform or "",
            author_platform_id=account or "",
            author_display_name=name or "",
            count=count,
        )
    for term, count in terms:
        response.top_terms.add(term=term, count=count)
    response.engagement.median = float(median or 0)
    response.engagement.p95 = float(p95 or 0)
    response.engagement.mean = float(mean or 0)
    return response


async def find_duplicates(
    uow: UnitOfWork, query: ContentQuery
) -> content_pb2.FindDuplicatesResponse:
    """URL groups, then hash groups (two statements: run in one snapshot
    unit). Each group's IDs come in canonical order (earliest published_at,
    then collected_at, then id), so the canonical item is the first."""
    repo = DuplicateRepository(uow)
    found = [
        (common_pb2.DUPLICATE_KIND_URL, await repo.url_groups(query)),
        (common_pb2.DUPLICATE_KIND_HASH, await repo.hash_groups(query)),
    ]
    response = content_pb2.FindDuplicatesResponse()
    for kind, groups in found:
        for key, ids in groups:
            response.groups.add(
                kind=kind, key=key, content_ids=[str(i) for i in ids], canonical_id=str(ids[0])
            )
    return response


@dataclass(frozen=True, slots=True)
class DuplicateMarks:
    """A checked MarkDuplicates request."""

    canonical_id: uuid.UUID
    duplicate_ids: list[uuid.UUID]


def mark_request(request: content_pb2.MarkDuplicatesRequest) -> DuplicateMarks:
    canonical_id = parse_uuid(request.canonical_id, "canonical_id")
    if not request.duplicate_ids:
        raise errors.InvalidArgument("duplicate_ids", "must name at least one item")
    if len(request.duplicate_ids) > MAX_MARKED:
        raise errors.InvalidArgument("duplicate_ids", f"must name at most {MAX_MARKED} items")
    duplicate_ids: list[uuid.UUID] = []
    for i, value in enumerate(request.duplicate_ids):
        duplicate_id = parse_uuid(value, f"duplicate_ids[{i}]")
        if duplicate_id == canonical_id:
            raise errors.InvalidArgument(
                f"duplicate_ids[{i}]", "an item cannot be a duplicate of itself"
            )
        if duplicate_id not in duplicate_ids:
            duplicate_ids.append(duplicate_id)
    return DuplicateMarks(canonical_id, duplicate_ids)


async def mark_duplicates(
    uow: UnitOfWork, caller: Principal, marks: DuplicateMarks
) -> content_pb2.MarkDuplicatesResponse:
    canonical_id, duplicate_ids = marks.canonical_id, marks.duplicate_ids
    repo = DuplicateRepository(uow)
    # One locking statement, in ID order, for the canonical and its
    # duplicates: two concurrent marks cannot deadlock.
    found = {
        row[0]: row
        for row in await repo.lock_scoped(
            sorted([canonical_id, *duplicate_ids]), owner_scope(caller)
        )
    }
    canonical = found.get(canonical_id)
    if canonical is None:
        raise errors.NotFound(f"content {canonical_id} not found")
    if canonical[2] is not None:
        raise errors.FailedPrecondition(
            f"content {canonical_id} is itself a duplicate of {canonical[2]}",
            reason="CANONICAL_IS_DUPLICATE",
            metadata={"duplicate_of": str(canonical[2])},
        )
    for duplicate_id in duplicate_ids:
        row = found.get(duplicate_id)
        # Another owner's row (visible to an admin) is not this canonical's duplicate.
        if row is None or row[1] != canonical[1]:
            raise errors.NotFound(f"content {duplicate_id} not found")
    updated = await repo.mark(canonical_id, duplicate_ids)
    await AuditRepository(uow.conn).record(
        caller,
        "content.mark_duplicates",
        f"contents/{canonical_id}",
        {"duplicate_ids": [str(i) for i in duplicate_ids], "updated": updated},
    )
    return content_pb2.MarkDuplicatesResponse(updated=updated)

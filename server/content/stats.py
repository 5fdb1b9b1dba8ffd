"""GetContentStats: every figure computed by PostgreSQL under the filter."""

from __future__ import annotations

from observatory.v1 import content_pb2

from server import errors
from server.auth import Principal
from server.content.report_repository import StatsRepository
from server.content.service import content_query
from server.db import Database
from server.protoconv import set_timestamp

GRANULARITIES = frozenset({"day", "week", "month"})
DEFAULT_TOP_N = 10
MAX_TOP_N = 100


class StatsService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(
        self, caller: Principal, request: content_pb2.GetContentStatsRequest
    ) -> content_pb2.GetContentStatsResponse:
        query = content_query(caller, request.filter)
        granularity = request.granularity or "day"
        if granularity not in GRANULARITIES:
            raise errors.InvalidArgument("granularity", "must be 'day', 'week' or 'month'")
        if request.top_n < 0 or request.top_n > MAX_TOP_N:
            raise errors.InvalidArgument("top_n", f"must be between 0 and {MAX_TOP_N}")
        top_n = request.top_n or DEFAULT_TOP_N
        async with self._db.read() as conn:
            repo = StatsRepository(conn)
            volume = await repo.volume(query, granularity)
            actors = await repo.top_actors(query, top_n)
            terms = await repo.top_terms(query, top_n)
            total, median, p95, mean = await repo.engagement(query)
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

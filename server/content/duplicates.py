"""FindDuplicates and MarkDuplicates."""

from __future__ import annotations

import uuid

from observatory.v1 import common_pb2, content_pb2

from server import errors
from server.audit import AuditRepository
from server.auth import Principal
from server.content.report_repository import DuplicateRepository
from server.content.service import _owner_scope as owner_scope
from server.content.service import content_query
from server.db import Database
from server.protoconv import parse_uuid

MAX_MARKED = 10_000


class DuplicateService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def find(
        self, caller: Principal, request: content_pb2.FindDuplicatesRequest
    ) -> content_pb2.FindDuplicatesResponse:
        """URL groups, then hash groups. Each group's IDs come in canonical
        order (earliest published_at, then collected_at, then id), so the
        canonical item is the first."""
        query = content_query(caller, request.filter)
        async with self._db.read() as conn:
            repo = DuplicateRepository(conn)
            found = [
                (common_pb2.DUPLICATE_KIND_URL, await repo.url_groups(query)),
                (common_pb2.DUPLICATE_KIND_HASH, await repo.hash_groups(query)),
            ]
        response = content_pb2.FindDuplicatesResponse()
        for kind, groups in found:
            for key, ids in groups:
                response.groups.add(
                    kind=kind,
                    key=key,
                    content_ids=[str(i) for i in ids],
                    canonical_id=str(ids[0]),
                )
        return response

    async def mark(
        self, caller: Principal, request: content_pb2.MarkDuplicatesRequest
    ) -> content_pb2.MarkDuplicatesResponse:
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
        async with self._db.write() as conn:
            repo = DuplicateRepository(conn)
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
            await AuditRepository(conn).record(
                caller,
                "content.mark_duplicates",
                f"contents/{canonical_id}",
                {"duplicate_ids": [str(i) for i in duplicate_ids], "updated": updated},
            )
        return content_pb2.MarkDuplicatesResponse(updated=updated)

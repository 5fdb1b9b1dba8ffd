"""Shared machinery of the bulk-load streams (ContentService.IngestContent,
VectorService.UpsertItems): per-element error reports, and moving a staged
batch into its table so that a row the database refuses costs only itself."""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable, Iterator

from observatory.v1 import common_pb2

from server.db import sqlstate
from server.uow import UnitOfWork

MAX_REPORTED_ERRORS = 10_000

# SQLSTATE classes of errors that a row's own values cause: data exceptions,
# integrity violations, program limits. Validation should catch them all first.
_ROW_ERROR_CLASSES = ("22", "23", "54")


def is_row_error(exc: BaseException) -> bool:
    code = sqlstate(exc)
    return code is not None and code[:2] in _ROW_ERROR_CLASSES


class ItemErrors:
    """The rejected elements of one stream: all counted, the MAX_REPORTED_ERRORS
    lowest stream indices kept for the response, in index order."""

    def __init__(self) -> None:
        self.count = 0
        # How many of them the database refused (after validation passed them).
        self.refused = 0
        self._kept: list[tuple[int, str, str]] = []

    def add(self, index: int, field: str, reason: str) -> None:
        self.count += 1
        if len(self._kept) < MAX_REPORTED_ERRORS or index < self._kept[-1][0]:
            bisect.insort(self._kept, (index, field, reason))
            del self._kept[MAX_REPORTED_ERRORS:]

    def refuse(self, index: int, exc: BaseException) -> None:
        self.refused += 1
        self.add(index, "", f"the database refused this row: {getattr(exc, 'orig', exc)}")

    def messages(self) -> Iterator[common_pb2.ItemError]:
        for index, field, reason in self._kept:
            yield common_pb2.ItemError(index=index, field=field, reason=reason)


async def move_in_halves(
    uow: UnitOfWork,
    move: Callable[[int, int], Awaitable[int]],
    first: int,
    last: int,
    errors: ItemErrors,
) -> int:
    """Runs `move(first, last)` (which moves the staged rows with stream index
    in [first, last] in one statement) under a savepoint. Should the database
    refuse a row, the range is halved until that row is found, reported in
    `errors` and skipped, so one bad row never costs the good ones. Returns
    the sum of what the successful moves returned."""
    try:
        async with uow.savepoint():
            return await move(first, last)
    except Exception as exc:
        if not is_row_error(exc):
            raise
        if first == last:
            errors.refuse(first, exc)
            return 0
    middle = (first + last) // 2
    return await move_in_halves(uow, move, first, middle, errors) + await move_in_halves(
        uow, move, middle + 1, last, errors
    )

"""ExportChunk.rows counts the CSV records that end in each chunk, however
PostgreSQL's COPY output is cut into pieces (inside quoted values, between
the two quotes of an escaped one, right after a newline)."""

from __future__ import annotations

import csv
import io
import itertools
import random

import pytest

from server.content.export import _CsvRows

VALUES = ["plain", "a,b", 'say "hi"', "two\nlines", '"\n"', "", "x" * 50, '""', "end\n"]


def _csv_file(rows: int, seed: int) -> bytes:
    """A CSV file quoted as PostgreSQL quotes it (only where needed, quotes doubled)."""
    rng = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "title", "body"])
    for i in range(rows):
        writer.writerow([str(i), rng.choice(VALUES), rng.choice(VALUES)])
    return out.getvalue().encode()


def _records_ending_in(data: bytes, cuts: list[int]) -> list[int]:
    """The reference: a byte-by-byte scan of which record ends in which piece."""
    ends: list[int] = []
    inside = False
    for position, byte in enumerate(data):
        if byte == ord('"'):
            inside = not inside
        elif byte == ord("\n") and not inside:
            ends.append(position)
    bounds = [0, *cuts, len(data)]
    counts = [sum(lo <= end < hi for end in ends) for lo, hi in itertools.pairwise(bounds)]
    counts[next(i for i, n in enumerate(counts) if n)] -= 1  # the header is no row
    return counts


@pytest.mark.parametrize("seed", range(8))
def test_rows_per_piece_match_a_byte_by_byte_scan(seed: int) -> None:
    data = _csv_file(200, seed)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), 60))
    counter = _CsvRows(header=True)
    pieces = [data[lo:hi] for lo, hi in itertools.pairwise([0, *cuts, len(data)])]
    assert [counter.ended_in(piece) for piece in pieces] == _records_ending_in(data, cuts)


def test_every_cut_of_a_small_file_counts_each_row_once() -> None:
    data = _csv_file(6, seed=1)
    rows = len(list(csv.reader(io.StringIO(data.decode())))) - 1
    for cut in range(1, len(data)):
        counter = _CsvRows(header=True)
        assert counter.ended_in(data[:cut]) + counter.ended_in(data[cut:]) == rows, cut

"""ExportContent's NDJSON is each row's JSON text put together with `||` in
PostgreSQL (report_repository.ndjson_select, cheaper than row_to_json): every
line must be byte for byte what row_to_json prints for the row, whatever the
values: every control character, quotes and backslashes, text that looks like
a null ("N/A", "null", "NaN"), empty text and NULL, timestamps with and
without a fraction and at the ends of the range, lists with escapes, nested
metadata."""

from __future__ import annotations

import uuid

import pytest
from observatory.v1 import content_pb2

from server.content.report_repository import CLIENT_TIME_FIELDS, EXPORT_FIELDS
from server.content.tables import FIRST_INSTANT, LAST_INSTANT

pytestmark = pytest.mark.asyncio

CONTROLS = "".join(chr(code) for code in range(1, 0x20))
TEXTS = [
    None,
    "",
    "plain",
    "N/A",
    "null",
    "NaN",
    "NULL",
    'say "hi", then\\leave',
    "two\nlines\r\nand\ttabs",
    f"every control: {CONTROLS}.",
    "unicode: é 漢字 🙂 \u2028 \u007f",
    '"',
    "\\",
    "x" * 5000,
]
TIMES = [
    "2026-12-06 10:11:12+00",
    "2026-12-06 10:11:12.5+00",
    "2026-12-06 10:11:12.123456+00",
    "2026-12-06 23:59:59.000001+00",
]


def _time_expr(field: str) -> str:
    """A field as the export shows it: ±infinity read as the ends of the range."""
    if field in CLIENT_TIME_FIELDS:
        return (
            f"CASE WHEN {field} = 'infinity' THEN '{LAST_INSTANT}'::timestamptz "
            f"WHEN {field} = '-infinity' THEN '{FIRST_INSTANT}'::timestamptz "
            f"ELSE {field} END AS {field}"
        )
    return field


async def test_ndjson_lines_are_what_row_to_json_prints(content_stub, alice, db):
    platform = f"json-lines-{uuid.uuid4().hex[:12]}"
    rows = len(TEXTS) * 3
    await db.execute(
        """
        INSERT INTO content (owner_id, platform, arena, platform_id, content_type, title,
            text_content, url, language, published_at, collected_at, author_platform_id,
            author_display_name, author_id, views_count, likes_count, shares_count,
            comments_count, search_terms_matched, raw_metadata, collection_run_id,
            content_hash, duplicate_of)
        SELECT $1, $2, t.texts[1 + g % t.n], g::text, 'post', t.texts[1 + (g + 1) % t.n],
            t.texts[1 + (g + 2) % t.n], t.texts[1 + (g + 3) % t.n], NULL,
            (t.times[1 + g % 4])::timestamptz + make_interval(days => g % 2),
            CASE g % 4 WHEN 0 THEN NULL WHEN 1 THEN 'infinity'::timestamptz
                WHEN 2 THEN '-infinity'::timestamptz ELSE (t.times[1 + (g + 1) % 4])::timestamptz
            END,
            t.texts[1 + (g + 4) % t.n], t.texts[1 + (g + 5) % t.n],
            CASE WHEN g % 2 = 0 THEN gen_random_uuid() END,
            CASE WHEN g % 3 = 0 THEN NULL ELSE g::bigint * 1000000007 END, 0, -g, NULL,
            CASE g % 3 WHEN 0 THEN '{}'::text[] WHEN 1 THEN ARRAY['a', 'b"c', 'd\\e', 'x,y']
                ELSE ARRAY[t.texts[1 + (g + 6) % t.n], NULL] END,
            jsonb_build_object('k', t.texts[1 + (g + 7) % t.n], 'n', g, 'deep',
                jsonb_build_array(1.5, true, NULL, jsonb_build_object('q', '"\\'))),
            t.texts[1 + (g + 8) % t.n], md5(g::text), NULL
          FROM generate_series(1, $3) g,
               (SELECT $4::text[] AS texts, cardinality($4::text[]) AS n, $5::text[] AS times) t
        """,
        alice.user_id,
        platform,
        rows,
        TEXTS,
        TIMES,
    )
    # Every field, in the export's order: raw_metadata (asked for) goes last.
    fields = [f for f in EXPORT_FIELDS if f != "raw_metadata"] + ["raw_metadata"]
    reference = await db.fetch(
        f"SELECT row_to_json(r)::text FROM (SELECT {', '.join(map(_time_expr, fields))} "
        "FROM content WHERE owner_id = $1 AND platform = $2) r",
        alice.user_id,
        platform,
    )
    request = content_pb2.ExportContentRequest(
        format=content_pb2.EXPORT_FORMAT_NDJSON,
        filter=content_pb2.ContentFilter(platforms=[platform]),
        include_metadata=True,
    )
    chunks = [c async for c in content_stub.ExportContent(request, metadata=alice.metadata)]
    data = b"".join(chunk.data for chunk in chunks).decode()
    assert data.endswith("\n")
    lines = data[:-1].split("\n")
    assert len(lines) == rows == chunks[-1].rows_sent == chunks[0].rows_total
    assert sorted(lines) == sorted(row[0] for row in reference)

"""The XLSX writer (server.content.xlsx.XlsxStream) on its own: COPY's CSV in,
a workbook out, read back with openpyxl."""

import csv
import io
import zipfile
from datetime import UTC, datetime

import openpyxl
import pytest

from server.content import xlsx
from server.content.xlsx import XlsxStream, column_letters
from tests.networks.helpers import excel_text

FIELDS = ["id", "views_count", "published_at", "title", "search_terms_matched"]


def csv_bytes(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def build(rows: list[list[str]], *, piece: int | None = None, **options) -> bytes:
    stream = XlsxStream(FIELDS, **options)
    data = csv_bytes(rows)
    parts, written = [], 0
    step = piece or len(data) or 1
    for start in range(0, len(data), step):
        out, count = stream.feed(data[start : start + step])
        parts.append(out)
        written += count
    parts.append(stream.finish())
    assert written == len(rows)
    return b"".join(parts)


def sheets(data: bytes) -> dict[str, list[tuple]]:
    book = openpyxl.load_workbook(io.BytesIO(data))
    return {sheet.title: list(sheet.iter_rows(values_only=True)) for sheet in book.worksheets}


# 2026-01-02 03:04:05.250 UTC as an Excel serial number.
SERIAL = str(
    (datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=UTC) - datetime(1899, 12, 30, tzinfo=UTC))
    / (datetime(1970, 1, 2, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC))
)
NASTY = 'He said "hi", <b>&amp;</b>\nnew\r\nline\ttab \x01\x1f _x0041_ æøå 😀 '


def test_cells_are_typed_and_text_round_trips():
    data = build(
        [
            ["a1", "12", SERIAL, NASTY, '["x", "y"]'],
            ["a2", "", "", "", "[]"],
            ["a3", "9007199254740993", "0001-01-01T00:00:00.000000Z", " lead", '["z"]'],
        ]
    )
    rows = sheets(data)["content"]
    assert rows[0] == tuple(FIELDS)
    assert rows[1] == (
        "a1",
        12,
        datetime(2026, 1, 2, 3, 4, 5, 250000),
        rows[1][3],
        '["x", "y"]',
    )
    assert excel_text(rows[1][3]) == NASTY
    # A missing value is an empty cell.
    assert rows[2] == ("a2", None, None, None, "[]")
    # Numbers are written as PostgreSQL prints them (Excel keeps 15 digits);
    # a time before 1900-03-01 is ISO 8601 text.
    assert rows[3][1:4] == (9007199254740993, "0001-01-01T00:00:00.000000Z", " lead")


def test_the_header_row_is_bold_and_stays_in_view():
    book = openpyxl.load_workbook(io.BytesIO(build([["a", "1", SERIAL, "t", "[]"]])))
    sheet = book["content"]
    assert sheet["A1"].font.b and not sheet["A2"].font.b
    assert sheet.freeze_panes == "A2"
    assert sheet["C2"].number_format == "yyyy-mm-dd hh:mm:ss"


def test_records_split_anywhere_give_the_same_workbook():
    rows = [[f"id{i}", str(i), SERIAL, f"{NASTY}{i}", '["a,b"]'] for i in range(20)]
    whole = sheets(build(rows))
    for piece in (1, 2, 3, 7, 64):
        assert sheets(build(rows, piece=piece)) == whole


def test_rows_past_a_sheets_limit_continue_on_the_next_sheet():
    rows = [[f"id{i}", str(i), "", "", ""] for i in range(7)]
    # Three rows per sheet: the header and two data rows.
    result = sheets(build(rows, sheet_rows=3))
    assert list(result) == ["content", "content_2", "content_3", "content_4"]
    assert all(sheet[0] == tuple(FIELDS) for sheet in result.values())
    ids = [row[0] for sheet in result.values() for row in sheet[1:]]
    assert ids == [f"id{i}" for i in range(7)]
    assert [len(sheet) for sheet in result.values()] == [3, 3, 3, 2]


def test_a_sheet_also_ends_before_its_xml_grows_too_large():
    rows = [[f"id{i}", str(i), "", "x" * 300, ""] for i in range(40)]
    data = build(rows, max_sheet_bytes=4000)
    result = sheets(data)
    assert len(result) > 3
    ids = [row[0] for sheet in result.values() for row in sheet[1:]]
    assert ids == [f"id{i}" for i in range(40)]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.filename.startswith("xl/worksheets/"):
                assert info.file_size <= 4000


def test_no_rows_is_a_sheet_with_the_header_only():
    assert sheets(build([])) == {"content": [tuple(FIELDS)]}


def test_the_package_is_a_plain_zip_with_the_content_types_first():
    data = build([["a", "1", SERIAL, "t", "[]"]])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names[0] == "[Content_Types].xml"
        assert set(names) == {
            "[Content_Types].xml",
            "_rels/.rels",
            "xl/styles.xml",
            "xl/workbook.xml",
            "xl/_rels/workbook.xml.rels",
            "xl/worksheets/sheet1.xml",
        }
        # No ZIP64 extra fields (some spreadsheet programs warn about them).
        assert all(b"\x01\x00" not in info.extra[:2] for info in archive.infolist())


@pytest.mark.parametrize(
    ("index", "letters"), [(0, "A"), (25, "Z"), (26, "AA"), (27, "AB"), (701, "ZZ"), (702, "AAA")]
)
def test_column_letters(index, letters):
    assert column_letters(index) == letters


def test_rows_of_many_shapes_come_out_right_with_few_templates(monkeypatch):
    monkeypatch.setattr(xlsx, "MAX_TEMPLATES", 2)
    rows = [
        [f"id{i}" if i & 1 else "", str(i) if i & 2 else "", SERIAL if i & 4 else "", "t", ""]
        for i in range(16)
    ]
    got = sheets(build(rows))["content"][1:]
    for i, row in enumerate(got):
        assert row[0] == (f"id{i}" if i & 1 else None)
        assert row[1] == (i if i & 2 else None)
        assert row[2] == (datetime(2026, 1, 2, 3, 4, 5, 250000) if i & 4 else None)
        assert row[3:] == ("t", None)


def test_a_full_cell_of_markup_characters_is_not_too_long_to_parse():
    # Escaped, 32,767 "&" are 163,835 characters: more than the csv module
    # reads in one field.
    full = "&" * 32_767
    rows = sheets(build([["a", "1", "", full, "\x01" * 32_767]]))["content"]
    assert rows[1][3] == full
    assert excel_text(rows[1][4]) == "\x01" * 32_767

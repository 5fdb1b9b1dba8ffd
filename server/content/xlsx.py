"""ExportContent as XLSX (Office Open XML SpreadsheetML), streamed.

The workbook is written as it goes, never held whole: PostgreSQL formats each
value (`xlsx_select`: timestamps as Excel serial numbers, text cut to Excel's
32,767 characters per cell) and sends it by COPY in CSV; `XlsxStream` escapes
each piece for XML at once, turns each complete CSV record into one `<row>`
of inline-string, number and date cells (one str.format of a template per
row) and writes it through the standard library's `zipfile` into a ZIP
stream with no seeking (each member ends with a data descriptor), so the file's
bytes leave while later rows are still being read: memory stays flat and
nothing touches the disk. (XlsxWriter's constant_memory mode keeps memory flat
too, but stages every sheet uncompressed on disk, twice, and sends nothing
before the last row; it also writes about 6,000 rows/s here.)

Cells: numbers as numbers; timestamps as Excel dates (1900 date system, UTC,
shown as yyyy-mm-dd hh:mm:ss; one before 1900-03-01 or in the last half
second of 9999, which Excel cannot show as a date, is ISO 8601 text); everything else, lists and raw_metadata as JSON
included, as text, its leading and trailing white space kept. A missing
value and an empty string are both an empty cell. Characters XML cannot hold are written as Excel writes them (`_xHHHH_`,
and a literal `_xHHHH_` in the text as `_x005F_xHHHH_`). Each sheet holds
`sheet_rows` rows, its header row included; the rows after that continue on
the next sheet (`content`, `content_2`, `content_3`, ...). A sheet also ends
early before its XML reaches 4 GB, so no member needs ZIP64.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import zipfile
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Float,
    Select,
    Text,
    case,
    cast,
    extract,
    func,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from server.content.repository import ContentQuery, filter_conditions
from server.content.tables import content, finite_time

# Excel's limits: rows per sheet and characters per cell.
SHEET_ROWS = 1_048_576
MAX_CELL_CHARS = 32_767
SHEET_NAME = "content"
# A sheet's XML stays below the 4 GiB that a ZIP member without ZIP64 can hold.
MAX_SHEET_BYTES = 4_000_000_000
# zlib level 1: about three times as fast as the default 6, a file about a
# quarter larger.
COMPRESS_LEVEL = 1
# 1900-03-01, the first day Excel's 1900 date system numbers correctly; the
# serial number of 1970-01-01.
FIRST_DATE = datetime(1900, 3, 1, tzinfo=UTC)
# From here on a time would show (to the second) as 10000-01-01, past Excel's
# last date: such times are text too.
LAST_DATE = datetime(9999, 12, 31, 23, 59, 59, 500000, tzinfo=UTC)
_UNIX_EPOCH_SERIAL = 25569

_NUMBER, _TIME, _TEXT = 0, 1, 2
_STYLE_TIME, _STYLE_HEADER = 1, 2
# Row templates kept at most (a few KB each; most exports need a handful).
MAX_TEMPLATES = 512
# A cell of a row's shape: empty, as its column's kind, or text.
_AS_TEXT = 2

_MAIN_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG_REL_NS = "http://schemas.openxmlformats.org/package/2006/relationships"
_XML_HEAD = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_WORKSHEET_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"
# Worksheets are the default type of .xml parts, so this part does not depend
# on how many sheets there will be and can come first in the file.
_CONTENT_TYPES = (
    _XML_HEAD + '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" '
    'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    f'<Default Extension="xml" ContentType="{_WORKSHEET_TYPE}"/>'
    '<Override PartName="/xl/workbook.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
    '<Override PartName="/xl/styles.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.styles+xml"/>'
    "</Types>"
)
_ROOT_RELS = (
    _XML_HEAD + f'<Relationships xmlns="{_PKG_REL_NS}">'
    f'<Relationship Id="rId1" Type="{_REL_NS}/officeDocument" Target="xl/workbook.xml"/>'
    "</Relationships>"
)
# Style 1: dates; style 2: the bold header row.
_STYLES = (
    _XML_HEAD + f'<styleSheet xmlns="{_MAIN_NS}">'
    '<numFmts count="1"><numFmt numFmtId="164" formatCode="yyyy-mm-dd hh:mm:ss"/></numFmts>'
    '<fonts count="2"><font><sz val="11"/><name val="Calibri"/><family val="2"/></font>'
    '<font><b/><sz val="11"/><name val="Calibri"/><family val="2"/></font></fonts>'
    '<fills count="2"><fill><patternFill patternType="none"/></fill>'
    '<fill><patternFill patternType="gray125"/></fill></fills>'
    '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
    '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>'
    '<cellXfs count="3"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>'
    '<xf numFmtId="164" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>'
    '<xf numFmtId="0" fontId="1" fillId="0" borderId="0" xfId="0" applyFont="1"/></cellXfs>'
    '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>'
    "</styleSheet>"
)
# The header row stays in view while scrolling.
_SHEET_START = (
    _XML_HEAD + f'<worksheet xmlns="{_MAIN_NS}"><sheetViews><sheetView workbookViewId="0">'
    '<pane ySplit="1" topLeftCell="A2" activePane="bottomLeft" state="frozen"/>'
    "</sheetView></sheetViews><sheetData>"
)
_SHEET_END = "</sheetData></worksheet>"

# A literal "_xHHHH_" would read back as the character it names: its "_"
# is escaped as Excel does. Then the characters XML 1.0 cannot hold, and CR
# (which XML readers turn into LF).
_LITERAL_ESCAPE = re.compile(r"_(?=x[0-9A-Fa-f]{4}_)")
# (NUL is left alone: PostgreSQL text never holds it, and it joins a row's
# values while they are escaped.)
_NOT_IN_XML = re.compile("[\x01-\x08\x0b\x0c\x0d\x0e-\x1f\ufffe\uffff]")


# Text keeps its leading and trailing spaces, tabs and line ends (which XML
# readers may otherwise drop) in every cell: cheaper than looking for them.
_TEXT_OPEN = '<t xml:space="preserve">'


def _escape_text(text: str) -> str:
    """`text` as XML character data, with Excel's `_xHHHH_` escapes."""
    if "_x" in text:
        text = _LITERAL_ESCAPE.sub("_x005F_", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _NOT_IN_XML.sub(lambda m: f"_x{ord(m.group()):04X}_", text)


def column_letters(index: int) -> str:
    """The letters of the 0-based column `index`: A, ..., Z, AA, AB, ..."""
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(65 + remainder) + letters
    return letters


def _kind(field: str) -> int:
    column_type = content.c[field].type
    if isinstance(column_type, DateTime):
        return _TIME
    if isinstance(column_type, BigInteger):
        return _NUMBER
    return _TEXT


def _value(field: str) -> ColumnElement[Any]:
    """A field as the XLSX stream reads it from COPY's CSV."""
    column = content.c[field]
    kind = _kind(field)
    if kind == _NUMBER:
        return column
    if kind == _TIME:
        instant = finite_time(column)  # the ends of the range, stored as ±infinity
        serial = cast(extract("epoch", instant) / 86400 + _UNIX_EPOCH_SERIAL, Float(53))
        iso = func.to_char(func.timezone("UTC", instant), 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
        outside = or_(instant < FIRST_DATE, instant >= LAST_DATE)
        return case((outside, iso), else_=cast(serial, Text))
    if isinstance(column.type, ARRAY):
        text: ColumnElement[Any] = cast(func.array_to_json(column), Text)
    elif isinstance(column.type, JSONB):
        text = cast(column, Text)
    else:
        text = cast(column, Text)
    return func.left(text, MAX_CELL_CHARS)


def xlsx_select(q: ContentQuery, fields: Sequence[str]) -> Select[Any]:
    """The rows of an XLSX export, one CSV column per field."""
    return select(*(_value(f).label(f) for f in fields)).where(*filter_conditions(q))


class _Output:
    """The write-only, unseekable file zipfile writes into; `take()` empties it."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes, /) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        return len(chunk)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts = []
        return data


class XlsxStream:
    """COPY's CSV in (`feed`), the workbook's bytes out, one piece at a time.

    `feed` takes any piece of the CSV (records may be split anywhere) and
    returns the bytes of the file made so far with the number of rows
    written; `finish` returns the rest of the file."""

    def __init__(
        self,
        fields: Sequence[str],
        *,
        sheet_rows: int = SHEET_ROWS,
        max_sheet_bytes: int = MAX_SHEET_BYTES,
    ) -> None:
        if sheet_rows < 2:
            raise ValueError("a sheet holds the header row and at least one row")
        self._fields = tuple(fields)
        self._letters = tuple(column_letters(i) for i in range(len(self._fields)))
        # Row templates by the shape of the row (see _row_xml).
        self._templates: dict[tuple[int, ...], str] = {}
        # The time columns: a time before 1900-03-01 comes as ISO 8601 text.
        self._time_columns = frozenset(
            i for i, field in enumerate(self._fields) if _kind(field) == _TIME
        )
        times = sorted(self._time_columns)
        self._times: Callable[[list[str]], Any] | None = None
        if times:
            self._times = lambda values: [values[i] for i in times]
        # Each column's kind and the start of its cells, up to the row number.
        self._columns = tuple(
            (_kind(field), f'<c r="{letter}')
            for field, letter in zip(self._fields, self._letters, strict=True)
        )
        self._sheet_rows = sheet_rows
        self._max_sheet_bytes = max_sheet_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._pending = ""
        self._out = _Output()
        self._zip = zipfile.ZipFile(
            self._out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL
        )
        self._zip.writestr("[Content_Types].xml", _CONTENT_TYPES)
        self._zip.writestr("_rels/.rels", _ROOT_RELS)
        self._zip.writestr("xl/styles.xml", _STYLES)
        self._sheets = 0
        self._sheet: Any = None
        self._sheet_bytes = 0
        self._row = 0  # the last row number written on the current sheet
        self._header = self._header_xml()

    @property
    def sheets(self) -> int:
        return self._sheets

    def feed(self, data: bytes) -> tuple[bytes, int]:
        text = self._pending + self._decoder.decode(data)
        cut = text.rfind("\n") + 1
        # A newline ends a record unless it is inside a quoted value, i.e. has
        # an odd number of quotes before it (an escaped quote is doubled).
        while cut and text.count('"', 0, cut) % 2:
            cut = text.rfind("\n", 0, cut - 1) + 1
        self._pending = text[cut:]
        rows = self._write_records(text[:cut]) if cut else 0
        return self._out.take(), rows

    def finish(self) -> bytes:
        """The rest of the file (the sheets, then the workbook that lists them)."""
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        if rest:
            self._write_records(rest)
        if self._sheet is None:
            self._next_sheet()
        self._close_sheet()
        names = [self.sheet_name(i) for i in range(1, self._sheets + 1)]
        sheets = "".join(
            f'<sheet name="{name}" sheetId="{i}" r:id="rId{i}"/>'
            for i, name in enumerate(names, start=1)
        )
        self._zip.writestr(
            "xl/workbook.xml",
            _XML_HEAD + f'<workbook xmlns="{_MAIN_NS}" xmlns:r="{_REL_NS}">'
            f"<bookViews><workbookView/></bookViews><sheets>{sheets}</sheets></workbook>",
        )
        relationships = "".join(
            f'<Relationship Id="rId{i}" Type="{_REL_NS}/worksheet" '
            f'Target="worksheets/sheet{i}.xml"/>'
            for i in range(1, self._sheets + 1)
        )
        self._zip.writestr(
            "xl/_rels/workbook.xml.rels",
            _XML_HEAD + f'<Relationships xmlns="{_PKG_REL_NS}">{relationships}'
            f'<Relationship Id="rId{self._sheets + 1}" Type="{_REL_NS}/styles" '
            'Target="styles.xml"/></Relationships>',
        )
        self._zip.close()
        return self._out.take()

    @staticmethod
    def sheet_name(number: int) -> str:
        return SHEET_NAME if number == 1 else f"{SHEET_NAME}_{number}"

    def _next_sheet(self) -> None:
        if self._sheet is not None:
            self._close_sheet()
        self._sheets += 1
        self._sheet = self._zip.open(f"xl/worksheets/sheet{self._sheets}.xml", "w")
        self._sheet_bytes = 0
        self._put(_SHEET_START + self._header)
        self._row = 1

    def _close_sheet(self) -> None:
        self._put(_SHEET_END)
        self._sheet.close()
        self._sheet = None

    def _put(self, xml: str) -> None:
        data = xml.encode()
        self._sheet.write(data)
        self._sheet_bytes += len(data)

    def _write_records(self, text: str) -> int:
        rows = 0
        parts: list[str] = []
        size = 0
        # Parsed first, escaped after: an escaped value can outgrow the csv
        # module's field limit (128 Ki characters), a value from
        # PostgreSQL cannot (MAX_CELL_CHARS). A row's values are escaped at
        # once, joined by NUL (which PostgreSQL text never holds).
        for raw in csv.reader(io.StringIO(text, newline="")):
            values = _escape_text("\x00".join(raw)).split("\x00")
            if self._sheet is None or self._row >= self._sheet_rows:
                self._flush(parts)
                parts, size = [], 0
                self._next_sheet()
            self._row += 1
            row = self._row_xml(self._row, values)
            # Each character is at most 3 bytes of UTF-8 (XML holds no surrogates).
            if self._sheet_bytes + 3 * (size + len(row)) + len(_SHEET_END) > self._max_sheet_bytes:
                self._flush(parts)
                parts, size = [], 0
                if self._sheet_bytes + 3 * len(row) + len(_SHEET_END) > self._max_sheet_bytes:
                    self._next_sheet()
                    self._row += 1
                    row = self._row_xml(self._row, values)
            parts.append(row)
            size += len(row)
            rows += 1
        self._flush(parts)
        return rows

    def _flush(self, parts: list[str]) -> None:
        if parts:
            self._put("".join(parts))

    def _row_xml(self, number: int, values: list[str]) -> str:
        """One `<row>` of `values` (already escaped for XML), by one
        str.format of the template for its pattern of cells (empty ones left
        out, a time before 1900 as text), made once per pattern."""
        shape: tuple[int, ...] = tuple(map(bool, values))
        if self._times is not None and "-" in "".join(self._times(values)):
            shape = tuple(
                _AS_TEXT if i in self._time_columns and "-" in value else here
                for i, (value, here) in enumerate(zip(values, shape, strict=True))
            )
        template = self._templates.get(shape)
        if template is None:
            if len(self._templates) >= MAX_TEMPLATES:
                self._templates.clear()  # memory stays bounded whatever the rows
            template = self._templates[shape] = self._template(shape)
        return template.format(number, *values)

    def _template(self, shape: tuple[int, ...]) -> str:
        cells = ['<row r="{0}">']
        for i, ((kind, ref), cell) in enumerate(zip(self._columns, shape, strict=True)):
            value = f"{{{i + 1}}}"
            if not cell:
                continue
            if cell == _AS_TEXT or kind == _TEXT:
                cells.append(f'{ref}{{0}}" t="inlineStr"><is>{_TEXT_OPEN}{value}</t></is></c>')
            elif kind == _NUMBER:
                cells.append(f'{ref}{{0}}"><v>{value}</v></c>')
            else:
                cells.append(f'{ref}{{0}}" s="{_STYLE_TIME}"><v>{value}</v></c>')
        cells.append("</row>")
        return "".join(cells)

    def _header_xml(self) -> str:
        cells = "".join(
            f'<c r="{letter}1" s="{_STYLE_HEADER}" t="inlineStr"><is><t>{_escape_text(field)}</t></is></c>'
            for letter, field in zip(self._letters, self._fields, strict=True)
        )
        return f'<row r="1">{cells}</row>'


async def write_xlsx(
    copy_csv: Callable[..., Awaitable[None]],
    sink: Callable[[bytes, int], Awaitable[None]],
    q: ContentQuery,
    fields: Sequence[str],
    *,
    sheet_rows: int | None = None,
) -> None:
    """Streams the XLSX export of `q`'s rows: `copy_csv(statement, output,
    header=False)` runs a COPY in CSV into `output` (ExportReader.copy_csv);
    `sink(data, rows)` takes each piece of the file and the rows it ends.
    Sheets hold `sheet_rows` rows (SHEET_ROWS, read when called)."""
    stream = XlsxStream(fields, sheet_rows=sheet_rows or SHEET_ROWS)

    async def feed(data: bytes) -> None:
        out, rows = stream.feed(data)
        if out or rows:
            await sink(out, rows)

    await copy_csv(xlsx_select(q, fields), feed, header=False)
    await sink(stream.finish(), 0)

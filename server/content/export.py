"""ExportContent: one snapshot of the filtered content streamed as one file.

A producer task (server.streams: its bounded queue, the idle bound
OBSERVATORY_EXPORT_IDLE_S, the export slots) reads the rows in one snapshot
unit (REPEATABLE READ READ ONLY) with `COPY (SELECT ...) TO STDOUT`, so
PostgreSQL does the formatting: CSV as it is, NDJSON as one JSON text per row,
and for Parquet and Arrow the same CSV, parsed into typed record batches by
pyarrow in a thread of the export's own. It puts ~256 KiB chunks on the queue;
the RPC's stream takes them off. When the client reads slowly, the queue
fills, the producer waits, and so does the COPY: memory stays flat.
Cancelling the RPC cancels the producer, whose unit then discards its
connection (ending the COPY on the server); a client that reads nothing for
the idle bound gets RESOURCE_EXHAUSTED / LIMIT_EXCEEDED.

The first chunk carries the row count (rows_total), which is counted in the
same snapshot on a second connection (when the pool has one idle) while the
COPY runs: the file made meanwhile, up to COUNTING_AHEAD_BYTES, waits for the
count instead of the COPY waiting for it. (PostgreSQL counts with parallel
workers, so on a busy machine the two mostly share the cores.)

Memory is bounded by bytes whatever the rows: ExportChunk data of ~256 KiB
(a larger row is cut across chunks), Arrow record batches of ~4 MiB of CSV
(or one row, when a row is larger), at most CONVERSIONS_AHEAD of them waiting
for the conversion thread, Parquet row groups of ~16 MiB of CSV.
A row of any size the contract accepts exports in every format, since
PostgreSQL sends a COPY's rows whole and pyarrow is handed whole rows only."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.csv
import pyarrow.ipc
import pyarrow.parquet
from observatory.v1 import content_pb2

from server import errors
from server.content import xlsx
from server.content.report_repository import (
    COUNT_FIELDS,
    EXPORT_FIELDS,
    LIST_FIELDS,
    TIME_FIELDS,
    ExportReader,
    csv_select,
    ndjson_select,
)
from server.content.repository import ContentQuery
from server.streams import Outlet, SnapshotExport
from server.uow import Database, ExportedSnapshot, UnitOfWork

# The event loop serialises and hands each chunk to gRPC in one go, while the
# COPY waits (PostgreSQL's socket buffer holds ~200 KB): at 256 KiB an export
# ran 1.2-1.4x as fast as at 1 MiB (bench exports: 64 KiB costs more per byte).
CHUNK_BYTES = 1 << 18
# The most of the file an export makes and holds before its row count is known.
COUNTING_AHEAD_BYTES = 16 << 20
# Bytes of CSV (whole rows) parsed into one Arrow record batch, at least (or
# one row, when a row is larger), and per Parquet row group.
ARROW_BLOCK_BYTES = 4 << 20
ROW_GROUP_BYTES = 16 << 20
# Blocks handed to the conversion thread and not yet queued as output, at most.
CONVERSIONS_AHEAD = 4
# The Parquet columns with few distinct values, which dictionary encoding
# shrinks. On the others (IDs, text, URLs) it only costs time: pyarrow builds a
# dictionary, finds it too large and falls back to plain encoding.
DICTIONARY_FIELDS = frozenset(
    {"platform", "arena", "content_type", "language", "collection_run_id"}
)
# PostgreSQL prints the exported timestamps: in UTC, in ISO 8601.
SESSION_SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO"}

Format: TypeAlias = content_pb2.ExportFormat.ValueType
# A piece of a converted export's file, as pyarrow makes it.
Bytes: TypeAlias = bytes | pa.Buffer
_FORMATS = frozenset(
    {
        content_pb2.EXPORT_FORMAT_NDJSON,
        content_pb2.EXPORT_FORMAT_CSV,
        content_pb2.EXPORT_FORMAT_PARQUET,
        content_pb2.EXPORT_FORMAT_ARROW_IPC,
        content_pb2.EXPORT_FORMAT_XLSX,
    }
)


def export_fields(columns: Sequence[str], include_metadata: bool) -> tuple[str, ...]:
    """The exported Content fields, in order: `columns` (all fields but
    raw_metadata when empty), plus raw_metadata when `include_metadata`."""
    if not columns:
        fields = [field for field in EXPORT_FIELDS if field != "raw_metadata"]
    else:
        fields = []
        for i, name in enumerate(columns):
            if name not in EXPORT_FIELDS:
                raise errors.InvalidArgument(
                    f"columns[{i}]", f"{errors.quote(name)} is not a field of Content"
                )
            if name in fields:
                raise errors.InvalidArgument(
                    f"columns[{i}]", f"{errors.quote(name)} is named twice"
                )
            fields.append(name)
    if include_metadata and "raw_metadata" not in fields:
        fields.append("raw_metadata")
    return tuple(fields)


def check_format(value: int) -> Format:
    if value not in _FORMATS:
        raise errors.InvalidArgument("format", "must be one of the EXPORT_FORMAT_* values")
    return Format(value)


def arrow_schema(fields: Sequence[str]) -> pa.Schema:
    def arrow_type(field: str) -> pa.DataType:
        if field in TIME_FIELDS:
            return pa.timestamp("us", tz="UTC")
        if field in COUNT_FIELDS:
            return pa.int64()
        if field in LIST_FIELDS:
            return pa.list_(pa.string())
        return pa.string()

    return pa.schema([pa.field(field, arrow_type(field)) for field in fields])


class _Chunker:
    """Gathers the bytes and row counts of an export into ~CHUNK_BYTES chunks
    and queues them (waiting while the queue is full), after the row count
    `total`: the chunks made before it is known are held, up to
    COUNTING_AHEAD_BYTES, then wait for it."""

    def __init__(self, outlet: Outlet, total: asyncio.Future[int]) -> None:
        self._outlet = outlet
        self._total: asyncio.Future[int] | None = total
        self._held: list[tuple[bytes, int]] = []
        self._held_bytes = 0
        self._parts: list[bytes | bytearray] = []
        self._size = 0
        self._rows = 0
        self._sent = False

    async def add(self, data: bytes | bytearray, rows: int) -> None:
        """Adds `data`, in which `rows` rows end. A chunk never exceeds
        CHUNK_BYTES: a piece that does not fit in the current chunk starts the
        next one, and a piece larger than a chunk (a huge row, a Parquet row
        group) is cut into CHUNK_BYTES slices, its rows counted in the last."""
        if self._size and self._size + len(data) > CHUNK_BYTES:
            await self._put()
        view = memoryview(data)
        while len(view) > CHUNK_BYTES:
            self._parts.append(bytes(view[:CHUNK_BYTES]))
            self._size += CHUNK_BYTES
            view = view[CHUNK_BYTES:]
            await self._put()
        # asyncpg hands each COPY piece over in a new bytearray: kept as it is.
        self._parts.append(data if len(view) == len(data) else bytes(view))
        self._size += len(view)
        self._rows += rows
        if self._size >= CHUNK_BYTES:
            await self._put()

    async def finish(self) -> None:
        """Queues what is left; an export always sends at least one chunk."""
        if self._size or not self._sent:
            await self._put()
        await self._release()

    async def _put(self) -> None:
        chunk = (b"".join(self._parts), self._rows)
        self._parts, self._size, self._rows, self._sent = [], 0, 0, True
        if self._total is not None:
            if not self._total.done() and self._held_bytes + len(chunk[0]) <= COUNTING_AHEAD_BYTES:
                self._held.append(chunk)
                self._held_bytes += len(chunk[0])
                return
            await self._release()
        await self._outlet.put(chunk)

    async def _release(self) -> None:
        """Queues the row count, once known, and the chunks held until then."""
        if self._total is None:
            return
        await self._outlet.put(await self._total)
        self._total = None
        held, self._held, self._held_bytes = self._held, [], 0
        for chunk in held:
            await self._outlet.put(chunk)


# Every byte but the quote and the newline, which are all _CsvRows looks at.
_NOT_QUOTE_OR_NEWLINE = bytes(b for b in range(256) if b not in b'"\n')
_QUOTE = ord('"')


class _CsvRows:
    """Counts the CSV records that end in each piece of a COPY's output: a
    newline ends a record unless it sits inside a quoted value. Every quote
    character toggles "inside" (an escaped quote is doubled, so toggles
    twice), so a newline is inside a value exactly when an odd number of
    quotes precede it: bytes.translate keeps only the quotes and newlines,
    and numpy counts them without a Python step per value."""

    def __init__(self, header: bool) -> None:
        self._in_quotes = False
        self._skip = 1 if header else 0

    def ended_in(self, data: bytes) -> int:
        marks = data.translate(None, _NOT_QUOTE_OR_NEWLINE)
        if b'"' not in marks:
            rows = 0 if self._in_quotes else len(marks)
        else:
            quote = np.frombuffer(marks, np.uint8) == _QUOTE
            # Quotes before and at each mark, plus one when the piece starts
            # inside a value: odd at a newline means that newline is inside.
            odd = np.bitwise_and(np.cumsum(quote, dtype=np.int64) + self._in_quotes, 1)
            rows = int(np.count_nonzero(~quote & (odd == 0)))
            self._in_quotes = bool(odd[-1])
        if self._skip and rows:
            rows -= 1
            self._skip = 0
        return rows


class _Drain:
    """A write-only file for pyarrow whose bytes are taken out as they come, so
    a Parquet or Arrow writer never holds more than a row group."""

    closed = False

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts = []
        return data


class Export:
    """One ExportContent call: `chunks()` streams it; `cancel()` stops it."""

    def __init__(
        self,
        db: Database,
        query: ContentQuery,
        fields: tuple[str, ...],
        fmt: Format,
        *,
        idle_s: float = 60.0,
        slots: asyncio.Semaphore | None = None,
    ) -> None:
        self._db = db
        self._query = query
        self._fields = fields
        self._format = fmt
        self._stream = SnapshotExport(db, idle_s=idle_s, slots=slots or asyncio.Semaphore(1))

    def cancel(self) -> None:
        self._stream.cancel()

    async def chunks(self) -> AsyncIterator[content_pb2.ExportChunk]:
        items = self._stream.items(self._produce)
        try:
            total = await anext(items)
            rows_sent = 0
            async for data, rows in items:
                rows_sent += rows
                yield content_pb2.ExportChunk(
                    data=data, rows=rows, rows_sent=rows_sent, rows_total=total
                )
        finally:
            await items.aclose()

    async def _produce(self, uow: UnitOfWork, outlet: Outlet) -> None:
        """The row count, then the file in ~CHUNK_BYTES chunks (bytes, rows)."""
        await uow.use_settings(SESSION_SETTINGS)
        reader = ExportReader(uow)
        await reader.lift_statement_timeout()
        total: asyncio.Future[int]
        if self._db.has_idle_connection(uow.on_replica):
            total = asyncio.ensure_future(self._count(await uow.export_snapshot()))
        else:
            total = asyncio.get_running_loop().create_future()
            total.set_result(await reader.count(self._query))
        try:
            chunker = _Chunker(outlet, total)
            await self._write(reader, chunker)
            await chunker.finish()
        finally:
            if not total.done():
                total.cancel()
                await asyncio.wait([total])
            if not total.cancelled():
                total.exception()  # retrieved: the export's own error, if any, is what counts

    async def _count(self, snapshot: ExportedSnapshot) -> int:
        """The export's rows, counted in its snapshot on a connection of its own."""
        async with self._db.snapshot_of(snapshot) as uow:
            reader = ExportReader(uow)
            await reader.lift_statement_timeout()
            return await reader.count(self._query)

    async def _write(self, reader: ExportReader, chunker: _Chunker) -> None:
        q, fields = self._query, self._fields
        if self._format == content_pb2.EXPORT_FORMAT_CSV:
            counter = _CsvRows(header=True)

            async def csv_sink(data: bytes) -> None:
                await chunker.add(data, counter.ended_in(data))

            await reader.copy_csv(csv_select(q, fields), csv_sink, header=True)
        elif self._format == content_pb2.EXPORT_FORMAT_NDJSON:

            async def lines_sink(data: bytes) -> None:
                await chunker.add(data, data.count(b"\n"))

            await reader.copy_lines(ndjson_select(q, fields), lines_sink)
        elif self._format == content_pb2.EXPORT_FORMAT_XLSX:
            await xlsx.write_xlsx(reader.copy_csv, chunker.add, q, fields)
        else:
            await self._write_arrow(reader, chunker)

    async def _write_arrow(self, reader: ExportReader, chunker: _Chunker) -> None:
        """PostgreSQL's CSV, gathered into blocks of whole rows, each parsed into a
        typed Arrow table by pyarrow and written as Parquet or Arrow IPC on a
        thread of the export's own, while the COPY fills the next blocks. At
        most CONVERSIONS_AHEAD blocks wait for or are in conversion: the COPY
        goes on while a Parquet row group is written (which takes several
        blocks' time), and waits beyond that, so neither side gets far ahead."""
        converter = _ArrowConverter(self._fields, self._format)
        # Not the loop's default executor: that one is small and also resolves
        # host names for new database connections.
        thread = ThreadPoolExecutor(1, thread_name_prefix="export-arrow")
        loop = asyncio.get_running_loop()
        block: list[bytes | bytearray] = []
        size = 0
        converting: collections.deque[asyncio.Future[list[tuple[bytes, int]]]] = collections.deque()

        async def emit_oldest() -> None:
            for output in await converting.popleft():
                await chunker.add(*output)

        async def hand_over(data: list[bytes | bytearray] | None) -> None:
            if len(converting) >= CONVERSIONS_AHEAD:
                await emit_oldest()
            converting.append(loop.run_in_executor(thread, converter.convert, data))

        async def sink(piece: bytes | bytearray) -> None:
            # Each piece holds whole rows (PostgreSQL sends a COPY row by row).
            nonlocal block, size
            block.append(piece)
            size += len(piece)
            if size >= ARROW_BLOCK_BYTES:
                pieces, block, size = block, [], 0
                await hand_over(pieces)

        try:
            await reader.copy_csv(csv_select(self._query, self._fields), sink, header=False)
            if block:
                await hand_over(block)
            await hand_over(None)
            while converting:
                await emit_oldest()
        finally:
            # A conversion still running finishes on its own; its output is dropped.
            thread.shutdown(wait=False, cancel_futures=True)


class _ArrowConverter:
    """The thread side of an Arrow export: CSV blocks in, Parquet or Arrow IPC
    bytes out. Its methods run on the export's thread, one at a time."""

    def __init__(self, fields: tuple[str, ...], fmt: Format) -> None:
        self._fields = fields
        self._schema = arrow_schema(fields)
        self._as_read = pa.schema(
            [pa.field(f.name, pa.string()) if pa.types.is_list(f.type) else f for f in self._schema]
        )
        self._parquet = fmt == content_pb2.EXPORT_FORMAT_PARQUET
        self._drain = _Drain()
        self._writer = (
            pyarrow.parquet.ParquetWriter(
                pa.PythonFile(self._drain, mode="w"),
                self._schema,
                compression="snappy",
                use_dictionary=[f for f in fields if f in DICTIONARY_FIELDS] or False,
            )
            if self._parquet
            else None
        )
        self._schema_sent = False
        self._group: list[pa.Table] = []
        self._grouped_bytes = 0

    def convert(self, pieces: list[bytes | bytearray] | None) -> list[tuple[bytes, int]]:
        """The file's bytes that `pieces` (whole CSV rows) make, in slices of at
        most CHUNK_BYTES, each with the rows that end in it; None: the end of
        the rows, which closes the file. The joining and slicing happen here,
        off the event loop, which then only passes the slices on: the loop
        reads the COPY without a pause, so the COPY does not wait."""
        return [
            piece
            for data, rows in self._convert(None if pieces is None else b"".join(pieces))
            for piece in _slices(data, rows)
        ]

    def _convert(self, data: bytes | None) -> list[tuple[Bytes, int]]:
        if self._writer is None:
            return self._ipc_messages(None if data is None else self._parse(data))
        if data is None:
            output = self._flush()
            self._writer.close()
            output.append((self._drain.take(), 0))
            return output
        table = self._parse(data)
        self._group.append(table)
        self._grouped_bytes += len(data)
        return self._flush() if self._grouped_bytes >= ROW_GROUP_BYTES else []

    def _ipc_messages(self, table: pa.Table | None) -> list[tuple[Bytes, int]]:
        """Arrow IPC's streaming format, message by message: the schema first,
        then each record batch as pyarrow serialises it (one contiguous buffer,
        taken as it is rather than copied out through a Python file), and
        after the last the end-of-stream marker."""
        output: list[tuple[Bytes, int]] = []
        if not self._schema_sent:
            output.append((self._schema.serialize(), 0))
            self._schema_sent = True
        if table is None:
            output.append((_IPC_END_OF_STREAM, 0))
        else:
            output.extend((batch.serialize(), batch.num_rows) for batch in table.to_batches())
        return output

    def _flush(self) -> list[tuple[Bytes, int]]:
        """Writes the gathered tables as one Parquet row group."""
        if not self._group:
            return []
        assert self._writer is not None
        group = pa.concat_tables(self._group)
        self._group, self._grouped_bytes = [], 0
        self._writer.write_table(group, row_group_size=max(group.num_rows, 1))
        return [(self._drain.take(), group.num_rows)]

    def _parse(self, data: bytes) -> pa.Table:
        table = pyarrow.csv.read_csv(
            pa.py_buffer(data),
            read_options=pyarrow.csv.ReadOptions(
                column_names=list(self._fields),
                # The block in one piece (so no row straddles two), on this
                # thread: pyarrow's own parallel parse costs more CPU in all
                # than it saves here, where the database and the event loop keep
                # the other cores busy.
                block_size=len(data) + 1,
                use_threads=False,
            ),
            parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True),
            convert_options=pyarrow.csv.ConvertOptions(
                column_types=self._as_read,
                # NULL is what PostgreSQL leaves empty and unquoted, and
                # nothing else: not pyarrow's default "NULL", "N/A", "NaN"...
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
                timestamp_parsers=[pyarrow.csv.ISO8601],
                # The database sends UTF-8 (its client encoding): nothing to check.
                check_utf8=False,
            ),
        )
        return pa.Table.from_arrays(
            [
                _string_lists(column) if pa.types.is_list(field.type) else column
                for column, field in zip(table.columns, self._schema, strict=True)
            ],
            schema=self._schema,
        )


def _slices(data: Bytes, rows: int) -> list[tuple[bytes, int]]:
    """`data` cut into pieces of at most CHUNK_BYTES, the rows in the last."""
    view = memoryview(data)
    pieces = [
        (bytes(view[start : start + CHUNK_BYTES]), 0) for start in range(0, len(view), CHUNK_BYTES)
    ] or [(b"", 0)]
    pieces[-1] = (pieces[-1][0], rows)
    return pieces


_STRING_LIST = pa.list_(pa.string())
# An IPC stream ends with a continuation marker and a zero length.
_IPC_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def _string_lists(column: pa.Array) -> pa.Array:
    """JSON arrays of strings (as PostgreSQL's array_to_json prints them) as
    list<string>. Without a backslash nothing is escaped, so splitting on the
    quotes is exact; otherwise each value goes through json."""
    if pyarrow.compute.any(pyarrow.compute.match_substring(column, "\\")).as_py():
        return pa.array(
            [None if v is None else json.loads(v) for v in column.to_pylist()], _STRING_LIST
        )
    inner = pyarrow.compute.utf8_slice_codeunits(column, 2, -2)
    lists = pyarrow.compute.split_pattern(inner, '","')
    empty = pa.scalar([], type=_STRING_LIST)
    return pyarrow.compute.if_else(pyarrow.compute.equal(column, "[]"), empty, lists)

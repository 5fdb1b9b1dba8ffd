"""ExportContent: one snapshot of the filtered content streamed as one file.

A producer task reads the rows in one snapshot unit (REPEATABLE READ READ
ONLY) with `COPY (SELECT ...) TO STDOUT`, so PostgreSQL does the
formatting: CSV as it is, NDJSON as one JSON text per row, and for Parquet and
Arrow the same CSV, parsed into typed record batches by pyarrow in a worker
thread. It puts ~1 MiB chunks on a small bounded queue; the RPC's stream takes
them off. When the client reads slowly, the queue fills, the producer waits,
and so does the COPY: memory stays flat. Cancelling the RPC cancels the
producer, whose unit then discards its connection (ending the COPY on the
server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeAlias

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
from server.uow import Database

CHUNK_BYTES = 1 << 20
# Chunks waiting for the client: the most an export holds in memory besides
# the batch being built.
QUEUE_CHUNKS = 2
# Rows per Parquet row group (at least), and bytes of CSV per Arrow batch.
ARROW_BATCH_ROWS = 16_384
CSV_BLOCK_BYTES = 1 << 20
# The Parquet columns with few distinct values, which dictionary encoding
# shrinks. On the others (IDs, text, URLs) it only costs time: pyarrow builds a
# dictionary, finds it too large and falls back to plain encoding.
DICTIONARY_FIELDS = frozenset(
    {"platform", "arena", "content_type", "language", "collection_run_id"}
)
# PostgreSQL prints the exported timestamps: in UTC, in ISO 8601.
SESSION_SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO"}

Format: TypeAlias = content_pb2.ExportFormat.ValueType
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
                raise errors.InvalidArgument(f"columns[{i}]", f"{name!r} is not a field of Content")
            if name in fields:
                raise errors.InvalidArgument(f"columns[{i}]", f"{name!r} is named twice")
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
    and queues them (waiting while the queue is full)."""

    def __init__(self, queue: asyncio.Queue[Any]) -> None:
        self._queue = queue
        self._parts: list[bytes | bytearray] = []
        self._size = 0
        self._rows = 0
        self._sent = False

    async def add(self, data: bytes | bytearray, rows: int) -> None:
        """Adds `data`, in which `rows` rows end. COPY's pieces are small and go
        into chunks whole; a larger piece (a Parquet row group) is cut into
        CHUNK_BYTES slices, its rows counted in the last one."""
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

    async def _put(self) -> None:
        data = b"".join(self._parts)
        await self._queue.put((data, self._rows))
        self._parts, self._size, self._rows, self._sent = [], 0, 0, True


# Every byte but the quote and the newline, which are all _CsvRows looks at.
_NOT_QUOTE_OR_NEWLINE = bytes(b for b in range(256) if b not in b'"\n')


class _CsvRows:
    """Counts the CSV records that end in each piece of a COPY's output: a
    newline ends a record unless it sits inside a quoted value. Every quote
    character toggles "inside" (an escaped quote is doubled, so toggles twice),
    which lets bytes methods do the counting."""

    def __init__(self, header: bool) -> None:
        self._in_quotes = False
        self._skip = 1 if header else 0

    def ended_in(self, data: bytes) -> int:
        marks = data.translate(None, _NOT_QUOTE_OR_NEWLINE).replace(b'""', b"")
        # Pieces between quotes alternate outside / inside a quoted value.
        pieces = marks.split(b'"')
        inside = pieces[0 if self._in_quotes else 1 :: 2]
        rows = marks.count(b"\n") - sum(piece.count(b"\n") for piece in inside)
        self._in_quotes ^= len(pieces) % 2 == 0
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
        self, db: Database, query: ContentQuery, fields: tuple[str, ...], fmt: Format
    ) -> None:
        self._db = db
        self._query = query
        self._fields = fields
        self._format = fmt
        self._task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def chunks(self) -> AsyncIterator[content_pb2.ExportChunk]:
        queue: asyncio.Queue[Any] = asyncio.Queue(QUEUE_CHUNKS)
        self._task = asyncio.create_task(self._produce(queue))
        try:
            total = await self._next(queue)
            rows_sent = 0
            while (item := await self._next(queue)) is not None:
                data, rows = item
                rows_sent += rows
                yield content_pb2.ExportChunk(
                    data=data, rows=rows, rows_sent=rows_sent, rows_total=total
                )
        finally:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    @staticmethod
    async def _next(queue: asyncio.Queue[Any]) -> Any:
        item = await queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def _produce(self, queue: asyncio.Queue[Any]) -> None:
        try:
            async with self._db.snapshot() as uow:
                await uow.use_settings(SESSION_SETTINGS)
                reader = ExportReader(uow)
                await queue.put(await reader.count(self._query))
                chunker = _Chunker(queue)
                await self._write(reader, chunker)
                await chunker.finish()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put(exc)
        else:
            await queue.put(None)

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
        """PostgreSQL's CSV, parsed into typed Arrow batches by pyarrow's CSV
        reader and written as Parquet or Arrow IPC, in a worker thread: the event
        loop moves COPY's bytes in and the file's bytes out through two small
        bounded queues, so neither side gets ahead of the other."""
        job = _ArrowJob(self._fields, self._format)
        # A thread of its own, not the loop's default executor: that one is
        # small and also resolves host names for new database connections.
        worker = threading.Thread(target=job.run, name="export-arrow", daemon=True)
        worker.start()
        copying = asyncio.create_task(
            reader.copy_csv(csv_select(self._query, self._fields), job.feed, header=False)
        )
        copying.add_done_callback(lambda _: job.end_of_input())
        try:
            while (item := await job.next_output()) is not None:
                await chunker.add(*item)
            await copying
        finally:
            # The thread gives up within 0.1 s once stopped (it finished if the
            # output ended).
            job.stop()
            if not copying.done():
                copying.cancel()
            await asyncio.gather(copying, return_exceptions=True)


_POLL_S = 0.002
_PIPE_PIECES = 16


class _ArrowJob:
    """The thread side of an Arrow export: a blocking file for pyarrow's CSV
    reader (fed by `feed` on the event loop) and an output queue of (bytes,
    rows) read back by `next_output`. `stop` unblocks the thread for good."""

    def __init__(self, fields: tuple[str, ...], fmt: Format) -> None:
        self._fields = fields
        self._format = fmt
        self._input: queue.Queue[bytes | bytearray | None] = queue.Queue(_PIPE_PIECES)
        self._output: queue.Queue[tuple[bytes, int] | Exception | None] = queue.Queue(2)
        self._pending: bytes | bytearray = b""
        self._ended = False
        self._reading = threading.Lock()
        self._stopped = threading.Event()
        self._ending: asyncio.Task[None] | None = None
        self.closed = False

    # -- event loop side ------------------------------------------------------------

    async def feed(self, data: bytes | bytearray | None) -> None:
        """Queues a piece of COPY's output (None: the end), waiting while the
        thread is behind."""
        piece = data  # a new bytearray from asyncpg, or None
        while not self._stopped.is_set():
            try:
                self._input.put_nowait(piece)
                return
            except queue.Full:
                await asyncio.sleep(_POLL_S)

    def end_of_input(self) -> None:
        try:
            self._input.put_nowait(None)
        except queue.Full:
            self._ending = asyncio.get_running_loop().create_task(self.feed(None))

    async def next_output(self) -> tuple[bytes, int] | None:
        while True:
            try:
                item = self._output.get_nowait()
            except queue.Empty:
                await asyncio.sleep(_POLL_S)
                continue
            if isinstance(item, Exception):
                raise item
            return item

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(queue.Full):
            self._input.put_nowait(None)

    # -- worker thread side -------------------------------------------------------------

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (at most CSV_BLOCK_BYTES: pyarrow may ask for
        everything), fewer only at the end. pyarrow makes a batch of each read,
        and COPY's pieces are small, so they are gathered into blocks."""
        with self._reading:  # pyarrow reads from more than one thread
            return self._read(CSV_BLOCK_BYTES if size < 0 else min(size, CSV_BLOCK_BYTES))

    def _read(self, wanted: int) -> bytes:
        parts: list[bytes | bytearray] = []
        while wanted > 0:
            if not self._pending:
                piece = self._next_piece()
                if piece is None:
                    break
                self._pending = piece
            taken = self._pending[:wanted]
            self._pending = self._pending[len(taken) :]
            parts.append(taken)
            wanted -= len(taken)
        return b"".join(parts)

    def _next_piece(self) -> bytes | bytearray | None:
        if self._ended:
            return None
        while True:
            try:
                piece = self._input.get(timeout=0.1)
            except queue.Empty:
                if self._stopped.is_set():
                    raise _Stopped from None
                continue
            if piece is None:
                self._ended = True
            return piece

    def _emit(self, item: tuple[bytes, int] | Exception | None) -> None:
        while True:
            if self._stopped.is_set():
                raise _Stopped
            try:
                self._output.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            self._convert()
        except _Stopped:
            return
        except Exception as exc:
            self._emit(exc)
            return
        self._emit(None)

    def _convert(self) -> None:
        schema = arrow_schema(self._fields)
        as_read = pa.schema(
            [pa.field(f.name, pa.string()) if pa.types.is_list(f.type) else f for f in schema]
        )
        # pyarrow refuses an empty CSV: with no rows the file holds the schema only.
        self._pending = self._next_piece() or b""
        csv = (
            []
            if not self._pending
            else pyarrow.csv.open_csv(
                pa.PythonFile(self, mode="r"),
                read_options=pyarrow.csv.ReadOptions(
                    column_names=list(self._fields), block_size=CSV_BLOCK_BYTES
                ),
                parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True),
                convert_options=pyarrow.csv.ConvertOptions(
                    column_types=as_read,
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=False,
                    timestamp_parsers=[pyarrow.csv.ISO8601],
                ),
            )
        )
        drain = _Drain()
        sink = pa.PythonFile(drain, mode="w")
        parquet = self._format == content_pb2.EXPORT_FORMAT_PARQUET
        writer: Any = (
            pyarrow.parquet.ParquetWriter(
                sink,
                schema,
                compression="snappy",
                use_dictionary=[f for f in self._fields if f in DICTIONARY_FIELDS] or False,
            )
            if parquet
            else pyarrow.ipc.new_stream(sink, schema)
        )
        group: list[pa.RecordBatch] = []
        grouped = 0

        def flush() -> None:
            nonlocal group, grouped
            if group:
                writer.write_table(pa.Table.from_batches(group, schema), row_group_size=grouped)
                self._emit((drain.take(), grouped))
            group, grouped = [], 0

        for batch in csv:
            typed = pa.RecordBatch.from_arrays(
                [
                    _string_lists(column) if pa.types.is_list(field.type) else column
                    for column, field in zip(batch.columns, schema, strict=True)
                ],
                schema=schema,
            )
            if not parquet:
                writer.write_batch(typed)
                self._emit((drain.take(), typed.num_rows))
                continue
            group.append(typed)
            grouped += typed.num_rows
            if grouped >= ARROW_BATCH_ROWS:
                flush()
        flush()
        writer.close()
        self._emit((drain.take(), 0))


class _Stopped(Exception):
    """The export ended on the event loop's side; the worker thread gives up."""


_STRING_LIST = pa.list_(pa.string())


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

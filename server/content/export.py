"""ExportContent: one snapshot of the filtered content streamed as one file.

A producer task reads the rows inside one REPEATABLE READ READ ONLY
transaction (COPY for NDJSON and CSV, so PostgreSQL does the formatting; a
server-side cursor for Parquet and Arrow, built into typed record batches) and
puts ~1 MiB chunks on a small bounded queue. The RPC's stream takes them off.
When the client reads slowly, the queue fills, the producer waits, and so does
the COPY or cursor: memory stays flat. Cancelling the RPC cancels the producer,
which discards its connection (ending the COPY or cursor on the server)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet
from observatory.v1 import content_pb2

from server import errors
from server.content.report_repository import (
    COUNT_FIELDS,
    EXPORT_FIELDS,
    LIST_FIELDS,
    TIME_FIELDS,
    ExportReader,
    arrow_select,
    csv_select,
    ndjson_select,
    snapshot,
)
from server.content.repository import ContentQuery
from server.db import Database

CHUNK_BYTES = 1 << 20
# Chunks waiting for the client: the most an export holds in memory besides
# the batch being built.
QUEUE_CHUNKS = 2
# Rows per Parquet row group / Arrow record batch.
ARROW_BATCH_ROWS = 16_384

Format: TypeAlias = content_pb2.ExportFormat.ValueType
_FORMATS = frozenset(
    {
        content_pb2.EXPORT_FORMAT_NDJSON,
        content_pb2.EXPORT_FORMAT_CSV,
        content_pb2.EXPORT_FORMAT_PARQUET,
        content_pb2.EXPORT_FORMAT_ARROW_IPC,
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
        self._parts: list[bytes] = []
        self._size = 0
        self._rows = 0
        self._sent = False

    async def add(self, data: bytes | bytearray, rows: int) -> None:
        # A copy: asyncpg hands over a buffer of its own.
        self._parts.append(bytes(data))
        self._size += len(data)
        self._rows += rows
        if self._size >= CHUNK_BYTES:
            await self._put()

    async def finish(self) -> None:
        """Queues what is left; an export always sends at least one chunk."""
        if self._size or not self._sent:
            await self._put()

    async def _put(self) -> None:
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        await self._queue.put((data, self._rows))
        self._parts, self._size, self._rows, self._sent = [], 0, 0, True


class _CsvRows:
    """Counts the CSV records that end in each piece of a COPY's output: a
    newline ends a record unless it sits inside a quoted value, which an odd
    number of quote characters since the record began tells."""

    def __init__(self, header: bool) -> None:
        self._in_quotes = False
        self._skip = 1 if header else 0

    def ended_in(self, data: bytes) -> int:
        if not self._in_quotes and b'"' not in data:
            rows = data.count(b"\n")
        else:
            rows = 0
            in_quotes = self._in_quotes
            *complete, rest = data.split(b"\n")
            for line in complete:
                in_quotes ^= line.count(b'"') & 1 == 1
                if not in_quotes:
                    rows += 1
            self._in_quotes = in_quotes ^ (rest.count(b'"') & 1 == 1)
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
            async with snapshot(self._db) as driver:
                reader = ExportReader(driver)
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
        else:
            await self._write_arrow(reader, chunker)

    async def _write_arrow(self, reader: ExportReader, chunker: _Chunker) -> None:
        schema = arrow_schema(self._fields)
        drain = _Drain()
        sink = pa.PythonFile(drain, mode="w")
        writer: Any
        if self._format == content_pb2.EXPORT_FORMAT_PARQUET:
            writer = pyarrow.parquet.ParquetWriter(sink, schema, compression="snappy")
        else:
            writer = pyarrow.ipc.new_stream(sink, schema)
        try:
            async for rows in reader.batches(
                arrow_select(self._query, self._fields), ARROW_BATCH_ROWS
            ):
                columns = zip(*rows, strict=True) if rows else ()
                batch = pa.RecordBatch.from_arrays(
                    [
                        pa.array(values, type=field.type)
                        for values, field in zip(columns, schema, strict=True)
                    ],
                    schema=schema,
                )
                if isinstance(writer, pyarrow.parquet.ParquetWriter):
                    writer.write_batch(batch, row_group_size=len(rows))
                else:
                    writer.write_batch(batch)
                await chunker.add(drain.take(), len(rows))
        finally:
            writer.close()
        await chunker.add(drain.take(), 0)

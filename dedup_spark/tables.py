"""Spark plumbing shared by every stage: tables stored through pyarrow.fs, and
per-key streaming over sorted partitions.

A *table* is a directory of parquet parts plus ``_table.json`` listing exactly
the committed parts, the row count, each part's bytes and the Spark schema.
Parts are written by the Spark tasks themselves (never through the driver) with
the task attempt in their name; only the parts reported by successful attempts
are listed, so files left by failed or speculative attempts are never read.
Tables are read by Python tasks, one part each or several small ones
(``read_tasks``): every Python task has a fixed cost of ~30 ms.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import storage

log = logging.getLogger(__name__)

TABLE_MANIFEST = "_table.json"
_PART_SCHEMA = T.StructType([T.StructField("table", T.StringType()), T.StructField("path", T.StringType()),
                            T.StructField("rows", T.LongType()), T.StructField("bytes", T.LongType()),
                            T.StructField("task", T.IntegerType())])
# Bytes (Arrow, in memory) one reading task aims at: small parts are read several to a task,
# since every Python task costs ~30 ms of scheduling and worker hand-off whatever its size
# (the search's 100 parts of 7k edges took 4.5 s to scan one per task, 0.3 s four per task).
READ_TASK_BYTES = 128 << 20
# What mapInArrow runs: a partition's Arrow batches in, batches out.
BatchTransform = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]


@dataclass(frozen=True)
class TableInfo:
    uri: str
    rows: int
    parts: list[str]
    schema: T.StructType
    # Arrow bytes of each part as written; None in manifests from before it was recorded.
    part_bytes: list[int] | None = None
    # Tables written by write_mapped_tables: the source parts each part was made from, in order
    # (what map_aligned reads beside it); None for other tables.
    source_parts: list[list[str]] | None = None


def write_table(df: DataFrame, uri: str) -> TableInfo:
    """Write a DataFrame as parquet parts from its tasks; return what was committed."""
    storage.delete_tree(uri)
    writer = _part_writer({"": (uri, _arrow_schema(df.schema))})
    written = df.mapInArrow(lambda batches: writer(("", batch) for batch in batches), _PART_SCHEMA).collect()
    return _commit(uri, written, df.schema)


def write_mapped_tables(spark: SparkSession, source_uri: str, columns: list[str],
                        outputs: dict[str, tuple[BatchTransform, T.StructType, str]],
                        prepare: BatchTransform | None = None) -> dict[str, TableInfo]:
    """Each output's ``(transform, schema, uri)``: the transform of a committed table's batches (after
    ``prepare``, once for all outputs), written as a new table. Read, transforms and writes happen in
    one Python task per source part, so the rows never pass through the JVM
    (``write_table(read_table(...).mapInArrow(...))`` would ship them Python -> JVM -> Python twice),
    and several outputs cost one scan. Each transform is called once per batch, so the outputs
    interleave and no batch is held for a later output. Each manifest records the source parts of
    each part: an output holding one row per (prepared) source row, in order, can be read beside
    the source by ``map_aligned``."""
    source = table_info(source_uri)
    tasks = _reading_tasks(spark, source)
    reading = _reading(spark, source_uri, source, columns, tasks=tasks)
    if reading is None:
        return {name: write_table(spark.createDataFrame([], schema), uri) for name, (_, schema, uri) in outputs.items()}
    paths, reader = reading

    def produce(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[str, pa.RecordBatch]]:
        source = reader(batches)
        for batch in source if prepare is None else prepare(source):
            for name, (transform, _, _) in outputs.items():
                for produced in transform(iter([batch])):
                    yield name, produced

    return write_produced_tables(paths, produce, {name: (schema, uri) for name, (_, schema, uri) in outputs.items()},
                                 tasks)


def write_produced_table(tasks: DataFrame, produce: BatchTransform,
                         schema: T.StructType, uri: str) -> TableInfo:
    """A table of what ``produce`` makes from each partition of ``tasks`` (a small DataFrame saying
    what to do), written by the same Python task: ``write_table(tasks.mapInArrow(produce))``
    would pass every produced row through the JVM on its way to the writer."""
    return write_produced_tables(tasks, lambda batches: (("", batch) for batch in produce(batches)),
                                 {"": (schema, uri)})[""]


def write_produced_tables(tasks: DataFrame,
                          produce: Callable[[Iterator[pa.RecordBatch]], Iterator[tuple[str, pa.RecordBatch]]],
                          outputs: dict[str, tuple[T.StructType, str]],
                          task_sources: list[list[str]] | None = None) -> dict[str, TableInfo]:
    """``write_produced_table`` for several tables at once: ``produce`` yields (output name, batch),
    and each task writes one part of every output, so one pass over the input can also write
    small side tables (the read stage's samples). ``task_sources``: the source parts task i read,
    recorded per part."""
    for _, uri in outputs.values():
        storage.delete_tree(uri)
    writer = _part_writer({name: (uri, _arrow_schema(schema)) for name, (schema, uri) in outputs.items()})
    written = tasks.mapInArrow(lambda batches: writer(produce(batches)), _PART_SCHEMA).collect()
    return {name: _commit(uri, [row for row in written if row["table"] == name], schema, task_sources)
            for name, (schema, uri) in outputs.items()}


def _part_name(partition: int, run_tag: str, attempt: int) -> str:
    return f"part-{partition:05d}-{run_tag}-{attempt}.parquet"


def _part_writer(outputs: dict[str, tuple[str, pa.Schema]]) -> Callable[[Iterator[tuple[str, pa.RecordBatch]]],
                                                                         Iterator[pa.RecordBatch]]:
    """A mapInArrow function writing its partition's (output name, batch) pairs as one part per
    output (under that output's uri); it yields (table, path, rows, bytes) per output."""
    run_tag = uuid.uuid4().hex[:8]

    def write_partition(tagged: Iterator[tuple[str, pa.RecordBatch]]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        context = TaskContext.get()
        name = _part_name(context.partitionId(), run_tag, context.attemptNumber())
        counts = {table: [0, 0] for table in outputs}
        # Every task commits one part of every output, empty or not.
        with contextlib.ExitStack() as stack:
            writers = {table: stack.enter_context(pq.ParquetWriter(
                stack.enter_context(storage.open_output(storage.join(uri, name))), arrow_schema))
                for table, (uri, arrow_schema) in outputs.items()}
            for table, batch in tagged:
                if batch.num_rows:
                    arrow_schema = outputs[table][1]
                    writers[table].write_batch(batch.cast(arrow_schema) if batch.schema != arrow_schema else batch)
                    counts[table][0] += batch.num_rows
                    counts[table][1] += batch.nbytes
        tables = list(outputs)
        yield pa.RecordBatch.from_pydict({"table": tables, "path": [name] * len(tables),
                                          "rows": [counts[t][0] for t in tables],
                                          "bytes": [counts[t][1] for t in tables],
                                          "task": [context.partitionId()] * len(tables)},
                                         schema=_arrow_schema(_PART_SCHEMA))

    return write_partition


def _commit(uri: str, written: list, schema: T.StructType,
            task_sources: list[list[str]] | None = None) -> TableInfo:
    """List the parts the successful task attempts reported: the table's manifest.

    When no task ran (no input rows, or adaptive execution left the DataFrame no partitions), one
    empty part is written here, so the directory still carries its schema: Spark cannot read a
    parquet directory without parts, and a job that found no duplicates must not break its readers."""
    if not written:
        name = _part_name(0, uuid.uuid4().hex[:8], 0)
        with storage.open_output(storage.join(uri, name)) as handle:
            pq.ParquetWriter(handle, _arrow_schema(schema)).close()
        written = [{"path": name, "bytes": 0, "rows": 0, "task": None}]
    written = sorted(written, key=lambda row: row["path"])
    parts = [row["path"] for row in written]
    part_bytes = [row["bytes"] for row in written]
    rows = sum(row["rows"] for row in written)
    source_parts = None if task_sources is None else [
        [] if row["task"] is None else task_sources[row["task"]] for row in written]
    manifest = {"rows": rows, "parts": parts, "part_bytes": part_bytes, "schema": schema.json()}
    if source_parts is not None:
        manifest["source_parts"] = source_parts
    storage.write_json(storage.join(uri, TABLE_MANIFEST), manifest)
    return TableInfo(uri, rows, parts, schema, part_bytes, source_parts)


def table_info(uri: str) -> TableInfo:
    manifest = storage.read_json(storage.join(uri, TABLE_MANIFEST))
    schema = T.StructType.fromJson(json.loads(manifest["schema"]))
    return TableInfo(uri, manifest["rows"], manifest["parts"], schema, manifest.get("part_bytes"),
                     manifest.get("source_parts"))


def read_table(spark: SparkSession, uri: str, columns: list[str] | None = None,
               max_task_rows: int | None = None) -> DataFrame:
    """A DataFrame over a committed table: one Spark partition per part, or per few small parts (``read_tasks``).

    ``max_task_rows``: merge small parts only up to about this many rows a partition, for consumers
    that hold a whole partition (the local union-find); a larger part is still read whole.
    """
    info = table_info(uri)
    schema = _project(info.schema, columns)
    reading = _reading(spark, uri, info, columns, max_task_rows)
    if reading is None:
        return spark.createDataFrame([], schema)
    paths, reader = reading
    return paths.mapInArrow(reader, schema)


def map_table(spark: SparkSession, uri: str, columns: list[str],
              transform: BatchTransform,
              schema: T.StructType) -> DataFrame:
    """``transform`` applied to a committed table's batches in the Python task that reads them:
    only its output reaches the JVM (``read_table(...).mapInArrow(transform)`` would ship every
    row Python -> JVM -> Python first)."""
    reading = _reading(spark, uri, table_info(uri), columns)
    if reading is None:
        return spark.createDataFrame([], schema)
    paths, reader = reading
    return paths.mapInArrow(lambda batches: transform(reader(batches)), schema)


def _project(schema: T.StructType, columns: list[str] | None) -> T.StructType:
    return schema if columns is None else T.StructType([schema[c] for c in columns])


def _reading(spark: SparkSession, uri: str, info: TableInfo, columns: list[str] | None,
             max_task_rows: int | None = None,
             tasks: list[list[str]] | None = None) -> tuple[DataFrame, BatchTransform] | None:
    """A DataFrame of a committed table's part names, a list per reading task (``tasks``, or
    ``_reading_tasks``), and the mapInArrow function reading them; None for a table without parts."""
    if not info.parts:
        return None
    tasks = tasks or _reading_tasks(spark, info, max_task_rows)
    parallel = spark.sparkContext.parallelize([(paths,) for paths in tasks], len(tasks))
    reader = _part_reader(uri, columns, _arrow_schema(_project(info.schema, columns)))
    return spark.createDataFrame(parallel, "paths array<string>"), reader


def _reading_tasks(spark: SparkSession, info: TableInfo, max_task_rows: int | None = None) -> list[list[str]]:
    """``read_tasks`` for a committed table, merging small parts only up to about ``max_task_rows``."""
    task_bytes = READ_TASK_BYTES
    if max_task_rows is not None and info.part_bytes is not None and info.rows:
        task_bytes = min(task_bytes, max(1, int(max_task_rows * sum(info.part_bytes) / info.rows)))
    return read_tasks(info.parts, info.part_bytes, spark.sparkContext.defaultParallelism, task_bytes)


def map_aligned(spark: SparkSession, source_uri: str, columns: list[str], aligned_uri: str,
                transform: Callable[[pa.RecordBatch, pa.RecordBatch], Iterator[pa.RecordBatch]],
                schema: T.StructType | str, prepare: BatchTransform | None = None, key: str = "row_id") -> DataFrame:
    """``transform(source batch, aligned rows)`` over a source table read beside a table written from it
    by ``write_mapped_tables`` with one row per (prepared) source row, in order: no join, no shuffle.
    Each task reads the source parts one aligned part was made from and that part (small: read
    whole), and checks that ``key`` agrees row for row, so a stale aligned table fails loudly."""
    aligned = table_info(aligned_uri)
    if aligned.source_parts is None:
        raise ValueError(f"{aligned_uri} records no source parts: it was not written by write_mapped_tables")
    if not aligned.parts:
        return spark.createDataFrame([], schema)
    source = table_info(source_uri)
    if not {part for parts in aligned.source_parts for part in parts} <= set(source.parts):
        raise ValueError(f"{aligned_uri} was written from other parts of {source_uri} than it holds now; "
                         "rerun the stage that wrote it")
    reader = _part_reader(source_uri, columns, _arrow_schema(_project(source.schema, columns)))
    read_aligned = _part_reader(aligned_uri, None, _arrow_schema(aligned.schema))
    work = [(sources, part) for sources, part in zip(aligned.source_parts, aligned.parts)]
    tasks = spark.createDataFrame(spark.sparkContext.parallelize(work, len(work)), "paths array<string>, part string")

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for sources, part in zip(batch.column("paths").to_pylist(), batch.column("part").to_pylist()):
                table = pa.Table.from_batches(list(read_aligned(_paths_batch([part]))), _arrow_schema(aligned.schema))
                beside = pa.RecordBatch.from_arrays([column.combine_chunks() for column in table.columns],
                                                    names=table.column_names)
                source = reader(_paths_batch(sources))
                offset = 0
                for rows in source if prepare is None else prepare(source):
                    alongside = beside.slice(offset, rows.num_rows)
                    if alongside.num_rows != rows.num_rows or not alongside.column(key).equals(rows.column(key)):
                        raise RuntimeError(f"{aligned_uri}/{part} is not aligned with {source_uri} at row {offset}: "
                                           "it was written from other source rows; rerun the stage that wrote it")
                    yield from transform(rows, alongside)
                    offset += rows.num_rows
                if offset != beside.num_rows:
                    raise RuntimeError(f"{aligned_uri}/{part} holds {beside.num_rows} rows, its source {offset}")

    return tasks.mapInArrow(run, schema)


def read_tasks(parts: list[str], part_bytes: list[int] | None, parallelism: int,
               task_bytes: int = READ_TASK_BYTES) -> list[list[str]]:
    """The parts each reading task reads: consecutive parts, about ``task_bytes`` a task, and at least
    ``parallelism`` tasks while there are parts for them. A part is never split, so a table of large
    parts is read one part per task. Deterministic in the manifest alone."""
    if part_bytes is None:
        return [[part] for part in parts]
    sizes = np.maximum(np.asarray(part_bytes, dtype=np.float64), 1.0)
    tasks = int(min(len(parts), max(parallelism, np.ceil(sizes.sum() / task_bytes))))
    # Part i goes to the task its first byte falls in, so tasks get nearly equal bytes; but no task
    # is skipped (one large part would leave the next share empty) and enough parts are left for
    # the tasks after it, so there are exactly ``tasks`` tasks.
    starts = np.concatenate([[0.0], np.cumsum(sizes)[:-1]])
    proposed = np.minimum((starts / sizes.sum() * tasks).astype(np.int64), tasks - 1)
    grouped: list[list[str]] = []
    for index, (part, task) in enumerate(zip(parts, proposed)):
        if len(grouped) < tasks and (not grouped or task >= len(grouped) or len(parts) - index <= tasks - len(grouped)):
            grouped.append([])
        grouped[-1].append(part)
    return grouped


def _paths_batch(paths: list[str]) -> Iterator[pa.RecordBatch]:
    """The input ``_part_reader`` takes: one batch listing the parts to read."""
    return iter([pa.RecordBatch.from_pydict({"paths": [paths]})])


def read_table_on_driver(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A committed table read whole by the driver: only for tables small by construction (samples)."""
    info = table_info(uri)
    reader = _part_reader(uri, columns, _arrow_schema(_project(info.schema, columns)))
    batches = list(reader(_paths_batch(info.parts)))
    return pa.Table.from_batches(batches, _arrow_schema(_project(info.schema, columns)))


def _part_reader(uri: str, columns: list[str] | None,
                 arrow_schema: pa.Schema) -> BatchTransform:
    """A mapInArrow function from batches of part-name lists to the parts' rows."""

    def read_parts(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for name in batch.column("paths").flatten().to_pylist():
                with storage.open_input(storage.join(uri, name)) as handle:
                    parquet = pq.ParquetFile(handle)
                    for chunk in parquet.iter_batches(batch_size=8192, columns=columns):
                        yield chunk.cast(arrow_schema) if chunk.schema != arrow_schema else chunk

    return read_parts


def _arrow_schema(schema: T.StructType) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(schema)


def binary_matrix(column: pa.Array | pa.ChunkedArray, dim: int, dtype: str = "float16") -> np.ndarray:
    """A rows x dim matrix over a binary column of packed fixed-width vectors (no nulls)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(column) == 0:
        return np.zeros((0, dim), dtype=dtype)
    offsets, data = binary_buffers(column)
    return data[offsets[0]: offsets[-1]].view(dtype).reshape(len(column), dim)


def binary_buffers(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A binary column's value offsets (len + 1, as numpy) and its data bytes, without copying."""
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    _, offsets_buffer, data_buffer = column.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[column.offset: column.offset + len(column) + 1]
    return offsets, np.frombuffer(data_buffer, dtype=np.uint8)


def packed_binary(matrix: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """A binary column holding each row of ``matrix`` packed (the inverse of ``binary_matrix``).

    ``valid``: a boolean mask; rows where it is False are null.
    """
    matrix = np.ascontiguousarray(matrix)
    rows = matrix.shape[0]
    width = matrix.itemsize * (matrix.shape[1] if matrix.ndim > 1 else 1)
    validity = None if valid is None else pa.array(np.asarray(valid, dtype=bool)).buffers()[1]
    return pa.Array.from_buffers(
        pa.binary(), rows,
        [validity, pa.py_buffer(np.arange(0, (rows + 1) * width, width, dtype=np.int32)), pa.py_buffer(matrix)])


def stream_groups(
    df: DataFrame,
    key: str,
    order: list[str],
    partitions: int,
    handle_group: Callable[[object, pa.Table], Iterator[pa.RecordBatch]],
    schema: T.StructType,
    by_id: bool = False,
) -> DataFrame:
    """Call ``handle_group(key, rows)`` once per key, streaming its output.

    Rows are hash-partitioned by ``key`` (``by_id``: to partition key modulo ``partitions``, for
    keys numbered to spread their cost) and sorted by (key, *order) inside each
    partition; the Python side gathers one key's rows at a time, so a task holds
    one group in memory, never a whole partition.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        pending: list[pa.RecordBatch] = []
        current = None
        for batch in batches:
            if batch.num_rows == 0:
                continue
            keys = batch.column(key)
            start = 0
            # Split the batch at key changes (sorted input: changes are boundaries).
            values = keys.to_numpy(zero_copy_only=False)
            cuts = np.flatnonzero(values[1:] != values[:-1]) + 1
            for cut in list(cuts) + [batch.num_rows]:
                piece = batch.slice(start, cut - start)
                piece_key = values[start]
                if current is not None and piece_key != current:
                    yield from handle_group(current, pa.Table.from_batches(pending))
                    pending = []
                current = piece_key
                pending.append(piece)
                start = cut
        if pending:
            yield from handle_group(current, pa.Table.from_batches(pending))

    partitions = max(1, partitions)  # no keys at all (every row rejected) still makes a valid plan
    spread = df.repartitionById(partitions, F.col(key)) if by_id else df.repartition(partitions, F.col(key))
    arranged = spread.sortWithinPartitions(key, *order)
    return arranged.mapInArrow(run, schema)


def commit_files(uri: str, parts: list[str], rows: int, schema: T.StructType) -> TableInfo:
    """Make parquet files written some other way under ``uri`` (``parts``, relative names) readable
    as a table, with ``schema``: the write stage's rewritten shards of a staged DataFrame."""
    storage.write_json(storage.join(uri, TABLE_MANIFEST),
                       {"rows": rows, "parts": sorted(parts), "part_bytes": None, "schema": schema.json()})
    return table_info(uri)

"""Write stage: the deduplicated shards, one output shard per input shard.

Each task rewrites one input shard, streaming it in bounded chunks and leaving
out the rows listed for removal (duplicates that are not kept, and rejected
rows). Shard names, columns, dtypes and row order are preserved.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import faults, storage
from dedup_spark.read import Manifest, Shard
from dedup_spark.tables import stream_groups

SHARD_SUMMARY_SCHEMA = T.StructType([
    T.StructField("shard_id", T.IntegerType(), False),
    T.StructField("rows_in", T.LongType(), False),
    T.StructField("rows_written", T.LongType(), False),
])
_COPY_ROWS = 65536
# Added by captions.policy merge: the kept row's distinct captions (null for rows without copies).
CAPTIONS_COLUMN = "captions"


def _write_npy(shard: Shard, keep: np.ndarray, target: str) -> None:
    dtype = np.dtype(shard.dtype)
    width = shard.dim * dtype.itemsize
    with storage.open_input(shard.embedding_uri) as source, storage.open_output(target) as sink:
        np.lib.format.write_array_header_1_0(
            sink, {"descr": dtype.str, "fortran_order": False, "shape": (int(keep.sum()), shard.dim)})
        for start in range(0, shard.rows, _COPY_ROWS):
            stop = min(start + _COPY_ROWS, shard.rows)
            raw = source.read_at((stop - start) * width, shard.data_offset + start * width)
            block = np.frombuffer(raw, dtype=dtype).reshape(stop - start, shard.dim)
            sink.write(np.ascontiguousarray(block[keep[start:stop]]).tobytes())


def _write_parquet(source_uri: str, keep: np.ndarray, target: str, captions: pa.Array | None = None) -> None:
    """Copy the kept rows, row group by row group; ``captions`` (one list per input row) is appended."""
    with storage.open_input(source_uri) as source, storage.open_output(target) as sink:
        parquet = pq.ParquetFile(source)
        schema = parquet.schema_arrow if captions is None else parquet.schema_arrow.append(
            pa.field(CAPTIONS_COLUMN, captions.type))
        with pq.ParquetWriter(sink, schema) as writer:
            start = 0
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                stop = start + table.num_rows
                if captions is not None:
                    table = table.append_column(CAPTIONS_COLUMN, captions.slice(start, stop - start))
                writer.write_table(table.filter(pa.array(keep[start:stop])))
                start = stop


def rewrite_shard(shard: Shard, drop_rows: np.ndarray, dedup_uri: str, scratch_uri: str | None = None,
                  captions: pa.Array | None = None) -> int:
    """Write the shard without ``drop_rows`` (positions) under ``dedup_uri``; rows written.

    ``captions``: a list<string> per input row, added as the ``captions`` column of
    the shard's parquet file (its metadata file for npy input).
    With ``scratch_uri`` each file is written there first and then moved into
    place, so a failed or speculative attempt never leaves a partial file where
    the published output is assembled.
    """
    keep = np.ones(shard.rows, dtype=bool)
    keep[drop_rows] = False
    outputs = [(shard.relative[0], lambda target: (_write_npy(shard, keep, target) if shard.kind == "npy"
                                                   else _write_parquet(shard.embedding_uri, keep, target, captions)))]
    if shard.kind == "npy" and shard.metadata_uri is not None:
        outputs.append((shard.relative[1], lambda target: _write_parquet(shard.metadata_uri, keep, target, captions)))
    for relative, write_file in outputs:
        final = storage.join(dedup_uri, relative)
        if scratch_uri is None:
            write_file(final)
            continue
        temporary = storage.join(scratch_uri, relative)
        write_file(temporary)
        storage.move(temporary, final)
    return int(keep.sum())


def write_dedup(spark: SparkSession, manifest: Manifest, drops: DataFrame, dedup_uri: str, scratch_uri: str,
                fault_fraction: float = 0.0, fault_drop_rows: int = 0, merged: DataFrame | None = None) -> list[dict]:
    """Rewrite every shard without the rows in ``drops`` (shard_id, shard_row); per-shard summaries.

    ``merged`` (shard_id, shard_row, captions): captions.policy merge's lists; when
    given, every shard gains the ``captions`` column (null where no list).
    ``fault_fraction`` / ``fault_drop_rows``: the test-only switches of ``run``
    (failing first attempts; silently dropping kept rows of the first shard).
    """
    payload = manifest.to_dict()
    add_captions = merged is not None
    no_list = F.lit(None).cast(T.ArrayType(T.StringType()))
    # One sentinel row per shard so shards with nothing to drop are written too.
    sentinels = spark.createDataFrame([(s.shard_id, -1) for s in manifest.shards], "shard_id int, shard_row long")
    positions = (drops.select(F.col("shard_id").cast("int"), F.col("shard_row").cast("long"))
                 .unionByName(sentinels).withColumn("captions", no_list).withColumn("drop", F.col("shard_row") >= 0))
    if add_captions:
        positions = positions.unionByName(merged.select(F.col("shard_id").cast("int"), F.col("shard_row").cast("long"),
                                                        "captions", F.lit(False).alias("drop")))

    def handle(shard_id: object, rows: pa.Table) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        shard = Manifest.from_dict(payload).shards[int(shard_id)]
        faults.maybe_fail("write", fault_fraction, shard.shard_id)
        positions_in_shard = rows.column("shard_row").to_numpy()
        drop = rows.column("drop").to_numpy(zero_copy_only=False)
        drop_rows = positions_in_shard[drop]
        captions = None
        if add_captions:
            listed = np.flatnonzero(~drop & (positions_in_shard >= 0))
            lists: list = [None] * shard.rows
            for position, values in zip(positions_in_shard[listed], rows.column("captions").take(listed).to_pylist()):
                lists[int(position)] = values
            captions = pa.array(lists, pa.list_(pa.string()))
        if fault_drop_rows and shard.shard_id == 0:
            kept = np.setdiff1d(np.arange(shard.rows), drop_rows)
            drop_rows = np.concatenate([drop_rows, kept[:fault_drop_rows]])
        context = TaskContext.get()
        attempt = f"shard-{shard.shard_id}-{context.stageId()}-{context.attemptNumber()}" if context else "driver"
        written = rewrite_shard(shard, drop_rows, dedup_uri, storage.join(scratch_uri, attempt), captions)
        # The summary reports the rows the shard should hold; a silent drop shows up as a mismatch.
        written += int(fault_drop_rows and shard.shard_id == 0 and min(fault_drop_rows, shard.rows))
        yield pa.RecordBatch.from_pydict(
            {"shard_id": [shard.shard_id], "rows_in": [shard.rows], "rows_written": [written]},
            schema=pa.schema([("shard_id", pa.int32(), False), ("rows_in", pa.int64(), False),
                              ("rows_written", pa.int64(), False)]))

    summaries = stream_groups(positions, "shard_id", ["shard_row"], len(manifest.shards), handle, SHARD_SUMMARY_SCHEMA)
    return [row.asDict() for row in summaries.collect()]


def count_written(manifest: Manifest, dedup_uri: str) -> int:
    """Rows in the written dedup/ files, from their headers and footers: measured
    independently of what the write tasks reported, for the accounting check."""
    from dedup_spark.read import InputError, _npy_header, _parquet_footer

    total = 0
    for shard in manifest.shards:
        counts = []
        for index, relative in enumerate(shard.relative):
            uri = storage.join(dedup_uri, relative)
            is_npy = shard.kind == "npy" and index == 0
            header = storage.retrying(_npy_header, uri, uri=uri) if is_npy else storage.retrying(
                _parquet_footer, uri, None, "float16", uri=uri)
            counts.append(header[0])
        if len(set(counts)) != 1:
            raise InputError(f"dedup/ files of shard {shard.relative} disagree on their row count: {counts}")
        total += counts[0]
    return total

"""Write stage: the deduplicated shards, one output shard per input shard.

Each task rewrites one input shard, streaming it in bounded chunks and leaving
out the rows listed for removal (duplicates that are not kept, and rejected
rows). Shard names, columns, dtypes and row order are preserved.

Stage ``write``: in, ``duplicates/`` (which rows are removed), ``rejected/``, the rows table's
positions and the input shards; out, ``dedup/``. Result: the rows written, counted from the
written files' headers and footers, not from what the tasks reported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import faults, formats, storage, tables
from dedup_spark.errors import InputError
from dedup_spark.read import Manifest, Shard
from dedup_spark.stage import RunContext, Stage
from dedup_spark.tables import stream_groups

log = logging.getLogger("dedup_spark")

SHARD_SUMMARY_SCHEMA = T.StructType([
    T.StructField("shard_id", T.IntegerType(), False),
    T.StructField("rows_in", T.LongType(), False),
    T.StructField("rows_written", T.LongType(), False),
])
# Added by captions.policy merge: the kept row's distinct captions (null for rows without copies).
CAPTIONS_COLUMN = formats.parquet.CAPTIONS_COLUMN


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
    outputs = [(shard.relative[0], lambda target: (formats.npy.rewrite(shard, keep, target) if shard.kind == "npy"
                                                   else formats.parquet.rewrite(shard.embedding_uri, keep, target,
                                                                                captions)))]
    if shard.kind == "npy" and shard.metadata_uri is not None:
        outputs.append((shard.relative[1],
                        lambda target: formats.parquet.rewrite(shard.metadata_uri, keep, target, captions)))
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
    total = 0
    for shard in manifest.shards:
        kinds = [shard.kind] + (["parquet"] if len(shard.relative) > 1 else [])
        counts = [formats.KINDS[kind].rows_in(storage.join(dedup_uri, relative))
                  for kind, relative in zip(kinds, shard.relative)]
        if len(set(counts)) != 1:
            raise InputError(f"dedup/ files of shard {shard.relative} disagree on their row count: {counts}")
        total += counts[0]
    return total


def _run(ctx: RunContext) -> dict:
    spark, work = ctx.spark, ctx.work
    duplicates = tables.read_table(spark, work.duplicates, ["row_id", "is_kept"])
    # Only the position columns are read: the rows table's embeddings are most of its bytes, and
    # a projection cannot reach into the Python tasks that read it.
    positions = tables.read_table(spark, work.rows, ["row_id", "shard_id", "shard_row"])
    removed = duplicates.where(~F.col("is_kept")).select("row_id").join(positions, "row_id")
    drops = removed.select("shard_id", "shard_row").unionByName(
        tables.read_table(spark, work.rejected, ["shard_id", "shard_row"]))
    merged = None
    if (ctx.results["group"]["captions"] or {}).get("merged_rows") is not None:
        merged = tables.read_table(spark, work.merged_captions).join(positions, "row_id")
    injected = faults.active()
    summaries = write_dedup(spark, ctx.manifest, drops, work.dedup, work.scratch, injected.task_fraction,
                            injected.drop_rows, merged)
    reported = sum(s["rows_written"] for s in summaries)
    written = count_written(ctx.manifest, work.dedup)
    if written != reported:
        log.error("write tasks reported %d rows but dedup/ holds %d", reported, written)
    return {"rows": written, "shards": len(summaries), "note": f"{len(summaries)} shards"}


STAGE = Stage("write", lambda ctx: {}, _run)

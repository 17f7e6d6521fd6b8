"""Index stage: the corpus index an incremental run (``--reference``) searches instead of the corpus.

Every published run carries ``index/``: its kept rows' normalised embeddings, ids and published
groups, stored by bucket so that a task reads only the buckets it searches.

    index/manifest.json              the segments of the corpus so far, the model, the bucket ranges
    index/segment-<run>/range-<r>.parquet
                                     one file per range of bucket ids, rows sorted by bucket_id:
                                     bucket_id, row_id, group_id, group_size, buckets, embedding

A kept row is stored once per bucket it joined (its ``buckets`` slots, as assign gave them), so a
new row meets it in every bucket they share. ``group_id`` is the published group the row keeps
(its own row_id when it has no copy), ``group_size`` that group's size. A run's own segment is
named relative to its manifest; an incremental run's manifest lists its reference's segments by
their absolute location, then its own: nothing is copied, so a daily schedule is a chain of
outputs, each complete. Bucket ids are cut into ``ranges`` of ``buckets_per_range`` ids, chosen by
the first run of a chain so a range holds about ``RANGE_ROWS`` rows; later runs keep them.

Stage ``index``: in, the rows and assign tables and ``duplicates/``; out, ``index/``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import storage, tables
from dedup_spark.read import map_valid_rows_beside
from dedup_spark.stage import RunContext, Stage
from dedup_spark.tables import binary_matrix

MANIFEST = "manifest.json"
FORMAT = 1
# Rows a range aims at when a chain starts: what one incremental task reads beside its new rows.
RANGE_ROWS = 50_000
# Members joined by broadcast up to this many (~40 bytes each); beyond, a shuffle join.
BROADCAST_MEMBERS = 5_000_000

_KEPT_SCHEMA = T.StructType([
    T.StructField("row_id", T.LongType(), False),
    T.StructField("buckets", T.BinaryType(), False),
    T.StructField("embedding", T.BinaryType(), False),
])
ENTRY_SCHEMA = T.StructType([
    T.StructField("range", T.IntegerType(), False),
    T.StructField("bucket_id", T.IntegerType(), False),
    T.StructField("row_id", T.LongType(), False),
    T.StructField("group_id", T.LongType(), False),
    T.StructField("group_size", T.LongType(), False),
    T.StructField("buckets", T.BinaryType(), False),
    T.StructField("embedding", T.BinaryType(), False),
])
_RANGE_SCHEMA = T.StructType([
    T.StructField("range", T.IntegerType(), False),
    T.StructField("rows", T.LongType(), False),
    T.StructField("file", T.StringType(), False),
    T.StructField("bucket_ids", T.ArrayType(T.IntegerType()), False),
    T.StructField("bucket_rows", T.ArrayType(T.LongType()), False),
])
# Per segment: entries per bucket id (int64, one per id), for an incremental run's drift report.
BUCKET_ROWS = "bucket_rows.npy"


def range_file(range_id: int) -> str:
    return f"range-{range_id:05d}.parquet"


def _settings(ctx: RunContext) -> dict:
    return {"reference": None if ctx.reference is None else ctx.reference.manifest_uri}


def _ranges(ctx: RunContext) -> int:
    """Bucket ids per range: the reference's, or enough ranges for about RANGE_ROWS rows each."""
    if ctx.reference is not None:
        return ctx.reference.buckets_per_range
    model = ctx.model
    ids = model.rounds * model.buckets_per_round
    ranges = max(1, math.ceil(ctx.results["assign"]["rows"] / RANGE_ROWS))
    return max(1, math.ceil(ids / ranges))


def _run(ctx: RunContext) -> dict:
    spark, work, model = ctx.spark, ctx.work, ctx.model
    per_range = _ranges(ctx)
    segment = f"segment-{uuid.uuid4().hex[:12]}"
    rows = map_valid_rows_beside(spark, work.rows, work.assigned, _with_buckets, _KEPT_SCHEMA)
    members = tables.read_table(spark, work.duplicates, ["row_id", "group_id", "group_size", "is_kept"])
    if ctx.results["group"]["rows"] <= BROADCAST_MEMBERS:
        members = F.broadcast(members)
    kept = (rows.join(members, "row_id", "left").where(F.coalesce(F.col("is_kept"), F.lit(True)))
            .select("row_id", F.coalesce("group_id", "row_id").alias("group_id"),
                    F.coalesce("group_size", F.lit(1)).cast("long").alias("group_size"), "buckets", "embedding"))
    entries = kept.mapInArrow(_entries(model.width, per_range), ENTRY_SCHEMA)
    target = storage.join(work.index, segment)
    ranges = max(1, math.ceil(model.rounds * model.buckets_per_round / per_range))
    written = tables.stream_groups(entries, "range", ["bucket_id", "row_id"], min(ranges, 4 * _cores(ctx)),
                                   _range_writer(target, work.scratch), _RANGE_SCHEMA, by_id=True).collect()
    row_count = ctx.valid_rows - ctx.results["group"]["removed_rows"]
    counts = np.zeros(model.rounds * model.buckets_per_round, np.int64)
    for written_range in written:
        counts[np.asarray(written_range["bucket_ids"], np.int64)] += np.asarray(written_range["bucket_rows"], np.int64)
    storage.write_npy(storage.join(target, BUCKET_ROWS), counts)
    manifest = _manifest(ctx, segment, per_range, row_count, {int(r["range"]): int(r["rows"]) for r in written})
    storage.write_json(storage.join(work.index, MANIFEST), manifest)
    return {"rows": sum(int(r["rows"]) for r in written), "kept_rows": row_count, "ranges": len(written),
            "segments": len(manifest["segments"]),
            "note": f"{row_count} kept rows in {len(written)} ranges, {len(manifest['segments'])} segment(s)"}


def _cores(ctx: RunContext) -> int:
    return ctx.spark.sparkContext.defaultParallelism


def _manifest(ctx: RunContext, segment: str, per_range: int, rows: int, range_rows: dict[int, int]) -> dict:
    """The chain so far: the reference's segments (absolute), then this run's (relative)."""
    model = ctx.model
    own = {"uri": segment, "rows": rows, "entries": sum(range_rows.values()),
           "row_id_max": ctx.results["read"].get("row_id_max"), "ranges": {str(k): v for k, v in sorted(range_rows.items())}}
    earlier = [] if ctx.reference is None else ctx.reference.segments
    return {"format": FORMAT, "dim": ctx.dim, "threshold": ctx.threshold, "model_id": model.model_id,
            "buckets": model.rounds * model.buckets_per_round, "width": model.width,
            "buckets_per_range": per_range, "id_column": ctx.config.input.id_column,
            "rows": sum(s["rows"] for s in earlier) + rows,
            "row_id_max": max([s["row_id_max"] for s in earlier if s.get("row_id_max") is not None]
                              + ([own["row_id_max"]] if own["row_id_max"] is not None else []), default=None),
            "segments": [*earlier, own]}


def _with_buckets(rows: pa.RecordBatch, assigned: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
    yield pa.RecordBatch.from_arrays([rows.column("row_id"), assigned.column("buckets"), rows.column("embedding")],
                                     names=_KEPT_SCHEMA.names)


def _entries(width: int, per_range: int):
    """A batch transform from kept rows to one index entry per bucket each joined."""
    from dedup_spark.bucket import joined_buckets

    def explode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            slots = binary_matrix(batch.column("buckets"), width, "int32")
            row, bucket = joined_buckets(slots)
            take = pa.array(row)
            yield pa.RecordBatch.from_arrays(
                [pa.array((bucket // per_range).astype(np.int32)), pa.array(bucket.astype(np.int32)),
                 *(batch.column(name).take(take) for name in ("row_id", "group_id", "group_size", "buckets",
                                                              "embedding"))],
                names=ENTRY_SCHEMA.names)

    return explode


def _range_writer(target: str, scratch: str):
    """Writes one range's entries; through a scratch file per task attempt, so a failed or
    speculative attempt never leaves a partial file where the output is assembled."""

    def write(range_id: object, rows: pa.Table) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        context = TaskContext.get()
        name = range_file(int(range_id))
        temporary = storage.join(scratch, f"index-{context.stageId()}-{context.attemptNumber()}", name)
        with storage.open_output(temporary) as sink:
            pq.write_table(rows.drop_columns(["range"]), sink, row_group_size=16384)
        storage.move(temporary, storage.join(target, name))
        bucket_ids, bucket_rows = np.unique(rows.column("bucket_id").to_numpy(), return_counts=True)
        yield pa.RecordBatch.from_pydict(
            {"range": [int(range_id)], "rows": [rows.num_rows], "file": [name],
             "bucket_ids": [bucket_ids.astype(np.int32).tolist()], "bucket_rows": [bucket_rows.astype(np.int64).tolist()]},
            schema=pa.schema([("range", pa.int32(), False), ("rows", pa.int64(), False), ("file", pa.string(), False),
                              ("bucket_ids", pa.list_(pa.int32()), False),
                              ("bucket_rows", pa.list_(pa.int64()), False)]))

    return write


STAGE = Stage("index", _settings, _run)


def read_manifest(output: str) -> dict:
    return storage.read_json(storage.join(output, "index", MANIFEST))

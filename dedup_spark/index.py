"""Index stage: the corpus index an incremental run (``--reference``) searches instead of the corpus.

Every published run carries ``index/``: its valid rows' normalised embeddings and bucket slots,
stored by the search task that searched them, with which rows were kept and their groups beside:

    index/manifest.json                 the chain's segments, the model's id, the threshold
    index/segment/task-<t>.parquet      row_id, buckets, embedding: the rows of one search task
    index/segment/task-<t>.members.parquet
                                        row_id, group_id, group_size, is_kept of the task's rows
                                        that are in a group (a row not listed is kept, alone)
    index/segment/bucket_rows.npy       rows per bucket id, for an incremental run's drift report

The search already gathers rows by bucket, so its tasks write the files (``search.IndexFiles``):
a pack of neighbouring buckets, or one block of a split bucket; a row is stored once per task of
a bucket it joined, and the manifest lists each file's buckets, so an incremental run's task for a
file reads that file alone, once (every file is read once: the recall probes meet every corpus row).
This stage adds the members files and the manifest. A run's
own segment is named relative to its manifest, with its files; an incremental run lists its
reference's segments by their absolute location and the digest of the manifest that lists their
files (the manifest of the output holding each), then its own: nothing is copied, so a daily
schedule is a chain of outputs, each complete, and a chain of n runs holds n file lists.

Stage ``index``: in, the assign table, the search plan and ``duplicates/``; out, ``index/``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import bucket, search, storage, tables
from dedup_spark.errors import InputError
from dedup_spark.group import BROADCAST_MEMBERS
from dedup_spark.stage import RunContext, Stage

MANIFEST = "manifest.json"
SEGMENT = "segment"
FORMAT = 3
BUCKET_ROWS = "bucket_rows.npy"

_ROUTE_SCHEMA = T.StructType([T.StructField("task_id", T.IntegerType(), False),
                              T.StructField("row_id", T.LongType(), False)])
_WRITTEN_SCHEMA = T.StructType([T.StructField("task_id", T.IntegerType(), False),
                                T.StructField("rows", T.LongType(), False)])


def members_file(task_id: int) -> str:
    return search.index_file(task_id).replace(".parquet", ".members.parquet")


def _settings(ctx: RunContext) -> dict:
    return {"reference": None if ctx.reference is None else ctx.reference.digest}


def _run(ctx: RunContext) -> dict:
    from dedup_spark.assign import bucket_sizes

    spark, work, model = ctx.spark, ctx.work, ctx.model
    searched = search.plan(ctx)
    writers = bucket.index_tasks(searched)
    members = tables.read_table(spark, work.duplicates, ["row_id", "group_id", "group_size", "is_kept"])
    located = _member_files(ctx, searched, writers, members)
    written = tables.stream_groups(located, "task_id", ["row_id"], min(len(writers), 4 * _cores(ctx)),
                                   _members_writer(work.index_segment, work.scratch), _WRITTEN_SCHEMA,
                                   by_id=True).collect()
    counts = np.zeros(model.rounds * model.buckets_per_round, np.int64)
    for bucket_id, rows in bucket_sizes(ctx).items():
        counts[bucket_id] = rows
    storage.write_npy(storage.join(work.index_segment, BUCKET_ROWS), counts)
    kept = ctx.valid_rows - ctx.results["group"]["removed_rows"]
    with_members = {int(r["task_id"]) for r in written}
    files = [{"task": task, "buckets": searched.task_buckets[task], "members": task in with_members}
             for task in sorted(writers)]
    manifest = _manifest(ctx, kept, files)
    storage.write_json(storage.join(work.index, MANIFEST), manifest)
    return {"rows": kept, "files": len(files), "segments": len(manifest["segments"]),
            "note": f"{kept} kept rows in {len(files)} files, {len(manifest['segments'])} segment(s)"}


def _cores(ctx: RunContext) -> int:
    return ctx.spark.sparkContext.defaultParallelism


def _member_files(ctx: RunContext, searched: bucket.SearchPlan, writers: set[int], members: DataFrame) -> DataFrame:
    """(task_id, row_id, group_id, group_size, is_kept) of every group member in every index file
    holding it. The files a row lies in follow from its buckets and the search plan, so only the
    assign table (ids and bucket slots) is read, never the embeddings."""
    routes = bucket.route_ids(searched, ctx.model.width, ctx.config.bucketing.seed)
    writer_mask = np.zeros(searched.tasks, dtype=bool)
    writer_mask[sorted(writers)] = True
    lookup = None
    # Up to what group.py broadcasts, the members are looked up in the tasks reading the assign table,
    # so only their routes are shuffled; beyond, every row's routes meet them in a join.
    if ctx.results["group"]["rows"] <= BROADCAST_MEMBERS:
        ids = np.sort(members.select("row_id").toArrow().column("row_id").to_numpy())
        lookup = ctx.spark.sparkContext.broadcast(ids)

    def locate(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            row_ids = batch.column("row_id").to_numpy()
            buckets = batch.column("buckets")
            if lookup is not None:
                known = lookup.value
                at = np.minimum(np.searchsorted(known, row_ids), max(0, len(known) - 1))
                keep = np.flatnonzero(known[at] == row_ids) if len(known) else np.zeros(0, np.int64)
                row_ids, buckets = row_ids[keep], buckets.take(pa.array(keep))
            if len(row_ids) == 0:
                continue
            row, task, _ = routes(row_ids, buckets)
            on = writer_mask[task]
            yield pa.RecordBatch.from_arrays([pa.array(task[on]), pa.array(row_ids[row[on]])], names=_ROUTE_SCHEMA.names)

    routed = tables.map_table(ctx.spark, ctx.work.assigned, ["row_id", "buckets"], locate, _ROUTE_SCHEMA)
    return routed.join(members, "row_id")


def _members_writer(target: str, scratch: str):
    def write(task_id: object, rows: pa.Table) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        context = TaskContext.get()
        name = members_file(int(task_id))
        temporary = storage.join(scratch, f"index-members-{context.stageId()}-{context.attemptNumber()}", name)
        with storage.open_output(temporary) as sink:
            pq.write_table(rows.select(["row_id", "group_id", "group_size", "is_kept"]), sink)
        storage.move(temporary, storage.join(target, name))
        yield pa.RecordBatch.from_pydict({"task_id": [int(task_id)], "rows": [rows.num_rows]},
                                         schema=pa.schema([("task_id", pa.int32(), False), ("rows", pa.int64(), False)]))

    return write


def _manifest(ctx: RunContext, kept: int, files: list[dict]) -> dict:
    """The chain so far: the reference's segments (absolute, without their file lists), then this
    run's (relative, with its files)."""
    model = ctx.model
    own = {"uri": SEGMENT, "rows": kept, "row_id_max": ctx.results["read"].get("row_id_max"), "files": files}
    earlier = [] if ctx.reference is None else ctx.reference.links()
    maxima = [s["row_id_max"] for s in [*earlier, own] if s.get("row_id_max") is not None]
    return {"format": FORMAT, "dim": ctx.dim, "threshold": ctx.threshold, "model_id": model.model_id,
            "buckets": model.rounds * model.buckets_per_round, "width": model.width,
            "id_column": ctx.config.input.id_column, "rows": sum(s["rows"] for s in earlier) + kept,
            "row_id_max": max(maxima, default=None), "segments": [*earlier, own]}


STAGE = Stage("index", _settings, _run)


_SIZES_SCHEMA = T.StructType([T.StructField("group_id", T.LongType(), True),
                              T.StructField("chain_size", T.LongType(), True)])
_SIZES_ARROW = pa.schema([("group_id", pa.int64()), ("chain_size", pa.int64())])


def chain_group_sizes(spark, files: list[tuple[str, dict]]) -> DataFrame:
    """``group_id, chain_size``: each group's size over the whole chain. A group's size is recorded
    in the members files of the run that last added to it (an earlier segment keeps the size it
    had when published), so the largest recorded size is the current one."""
    uris = [storage.join(segment, members_file(entry["task"])) for segment, entry in files if entry.get("members")]

    def sizes(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for uri in batch.column(0).to_pylist():
                with storage.open_input(uri) as handle:
                    members = pq.read_table(handle, columns=["group_id", "group_size"])
                yield from members.rename_columns(_SIZES_SCHEMA.names).cast(_SIZES_ARROW).to_batches()

    listed = spark.createDataFrame([(uri,) for uri in uris] or [("",)], "uri string").where("uri != ''")
    return (listed.repartition(max(1, min(len(uris), spark.sparkContext.defaultParallelism * 2)))
            .mapInArrow(sizes, _SIZES_SCHEMA).groupBy("group_id").agg(F.max("chain_size").alias("chain_size")))


def read_file(segment_uri: str, entry: dict) -> pa.Table:
    """One index file's kept rows: row_id, buckets, embedding, group_id, group_size (a row in no
    group is its own group of one)."""
    with storage.open_input(storage.join(segment_uri, search.index_file(entry["task"]))) as handle:
        rows = pq.read_table(handle)
    row_ids = rows.column("row_id").to_numpy()
    group_ids, sizes = row_ids.copy(), np.ones(len(row_ids), np.int64)
    keep = np.ones(len(row_ids), dtype=bool)
    if entry.get("members"):
        with storage.open_input(storage.join(segment_uri, members_file(entry["task"]))) as handle:
            members = pq.read_table(handle)
        member_ids = members.column("row_id").to_numpy()
        at = np.searchsorted(row_ids, member_ids)
        if not ((at < len(row_ids)).all() and np.array_equal(row_ids[at], member_ids)):
            # Both files are written from one search plan; rows not found mean they are not a pair.
            raise InputError(f"index file {search.index_file(entry['task'])} of {segment_uri} does not hold every "
                             f"row its members file lists: the index is damaged; run that output again")
        group_ids[at] = members.column("group_id").to_numpy()
        sizes[at] = members.column("group_size").to_numpy()
        keep[at] = members.column("is_kept").to_numpy(zero_copy_only=False)
    taken = pa.array(np.flatnonzero(keep))
    return rows.take(taken).append_column("group_id", pa.array(group_ids[keep])).append_column(
        "group_size", pa.array(sizes[keep]))

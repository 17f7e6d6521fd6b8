"""Search stage: exact cosine search inside each search task, in Spark tasks.

Stage ``search``: in, the rows table and the assign table read side by side, routed by the
search plan (``bucket.plan_search``) to tasks; out, the edges table (``Work.edges``). Result:
tasks, pairs per threshold, the similarity histogram, spanning edges, kernel time and the rows
the shuffle carried.

Each task holds one bucket, a pack of buckets that share rows (each searched
over its own rows; a shared row arrives once), or one pair of blocks of a
split bucket, and compares every row of a bucket with every other by float32
matrix products, with an exact float64 check near each threshold
(``kernels.graph_search``); a bucket holding a dense group of near-copies is
searched by representatives instead (``cover``), whose forest closes the same.

What a task emits (EDGES_SCHEMA, told apart by ``level``):

- ``level >= 0``: a spanning forest of the task's >= ``thresholds[level]``
  graph (level 0 is the search threshold; higher levels exist only for
  threshold calibration), over all of a pack's buckets. Never more edges than
  rows, so a group of g copies costs g - 1 edges, not g^2 / 2.
- ``level == PAIR`` (``output.pairs: all`` only): every pair >= the search
  threshold that this task owns. A pair that meets in several buckets (soft
  assignment, several rounds) is owned by the smallest bucket id the two rows
  share, so each pair is emitted exactly once over the whole search.
- ``level == PAIR_COUNT`` / ``HISTOGRAM``: per-task counts, (row_id_a = threshold
  index or histogram bin, row_id_b = owned pairs), summed by ``search_stats``.
- ``level == KERNEL_MICROS``: (0, microseconds the task spent in ``kernels.graph_search``), so the
  report can split the stage into the kernel and the data path that feeds it.
- ``level == TASK_ROWS``: (0, rows the task received): summed, the rows the shuffle carried.
- ``level == COMPARISONS`` / ``ALL_PAIRS`` / ``ATTACHED``: (0, similarities the kernel computed),
  (0, what computing every pair of the task's buckets costs), (0, rows attached to a representative:
  ``kernels.graph_search`` searched a dense group by representatives, and the task's pair counts
  and histogram are then counts among the comparisons made, lower bounds of the owned pairs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import bucket, faults, kernels, storage, tables
from dedup_spark.bucket import rows_by_bucket
from dedup_spark.read import map_valid_rows_beside
from dedup_spark.stage import RunContext, Stage
from dedup_spark.tables import BatchTransform, binary_matrix, stream_groups

EDGES_SCHEMA = T.StructType([
    T.StructField("row_id_a", T.LongType(), False),
    T.StructField("row_id_b", T.LongType(), False),
    T.StructField("similarity", T.FloatType(), False),
    T.StructField("level", T.IntegerType(), False),
])
PAIR = -1
PAIR_COUNT = -2
HISTOGRAM = -3
KERNEL_MICROS = -4
TASK_ROWS = -5
COMPARISONS = -6
ALL_PAIRS = -7
ATTACHED = -8
HISTOGRAM_BINS = 100


def search_task(rows: pa.Table, dim: int, thresholds: list[float], block_rows: int, all_pairs: bool,
                block_memory: int = 256 << 20, bucket_ids: list[int] | None = None,
                bucket_width: int = 0) -> Iterator[pa.RecordBatch]:
    """Edges of one search task. ``rows``: side, row_id, embedding and (when ``bucket_width``) buckets,
    every row's ``bucket_width`` bucket ids; side is 1 only for the second block of a block pair.
    ``bucket_ids``: the buckets the task searches, each over the rows that joined it (several: a
    pack; None: all rows are one bucket, 0); a pair is compared in each of them it shares."""
    side = rows.column("side").to_numpy()
    row_ids = rows.column("row_id").to_numpy()
    embeddings = binary_matrix(rows.column("embedding"), dim)
    buckets = binary_matrix(rows.column("buckets"), bucket_width, "int32") if bucket_width else None
    right_mask = side == 1
    bucket_ids = bucket_ids or [0]
    levels = len(thresholds)
    forests: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in thresholds]
    pair_counts = np.zeros(levels, np.int64)
    histogram = np.zeros(HISTOGRAM_BINS, np.int64)
    kernel_seconds = 0.0
    # Similarities computed, what all pairs would cost, rows attached to a representative.
    work = np.zeros(3, np.int64)
    packed = len(bucket_ids) > 1 and buckets is not None
    if packed:
        rows_of = rows_by_bucket(buckets)
    for bucket_id in bucket_ids:
        started = time.perf_counter()
        if packed:
            # Each bucket's rows gathered first, so the kernel's union-find and gathers span the
            # bucket, not the pack.
            nodes = rows_of(bucket_id)
            points, right, owners = embeddings[nodes], right_mask[nodes], buckets[nodes]
        else:
            nodes, points, right, owners = np.arange(len(row_ids)), embeddings, right_mask, buckets
        found = kernels.graph_search(points, np.flatnonzero(~right), np.flatnonzero(right) if right.any() else None,
                                     thresholds, block_rows, block_memory, owners, bucket_id, all_pairs,
                                     HISTOGRAM_BINS)
        kernel_seconds += time.perf_counter() - started
        for level, (a, b, similarity) in enumerate(found.forests):
            forests[level].append((nodes[a], nodes[b], similarity))
        for a, b, similarity in found.pairs:
            yield _edges_batch(row_ids, nodes[a], nodes[b], similarity, PAIR)
        pair_counts += found.pair_counts
        histogram += found.histogram
        work += (found.comparisons, found.all_pairs, found.attached)
    for level, edges in enumerate(forests):
        a, b, similarity = (np.concatenate(column) for column in zip(*edges))
        if len(bucket_ids) > 1 and len(a):
            # A row in two of the pack's buckets links their groups: one forest over the whole pack.
            keep = kernels.SpanningForest(len(row_ids)).add(a, b, similarity)
            a, b, similarity = a[keep], b[keep], similarity[keep]
        if len(a):
            yield _edges_batch(row_ids, a, b, similarity, level)
    micros = round(kernel_seconds * 1e6)
    for level, counts in ((PAIR_COUNT, pair_counts), (HISTOGRAM, histogram), (KERNEL_MICROS, np.array([micros])),
                          (TASK_ROWS, np.array([len(row_ids)])), (COMPARISONS, work[:1]), (ALL_PAIRS, work[1:2]),
                          (ATTACHED, work[2:])):
        index = np.flatnonzero(counts)
        if index.size:
            yield pa.RecordBatch.from_arrays(
                [pa.array(index.astype(np.int64)), pa.array(counts[index].astype(np.int64)),
                 pa.array(np.zeros(index.size, np.float32)), pa.array(np.full(index.size, level, np.int32))],
                names=EDGES_SCHEMA.names)


def _edges_batch(row_ids: np.ndarray, a: np.ndarray, b: np.ndarray, similarity: np.ndarray,
                 level: int) -> pa.RecordBatch:
    """EDGES_SCHEMA rows for local node pairs (a, b), as row ids with row_id_a < row_id_b."""
    id_a, id_b = row_ids[a], row_ids[b]
    return pa.RecordBatch.from_arrays(
        [pa.array(np.minimum(id_a, id_b)), pa.array(np.maximum(id_a, id_b)), pa.array(similarity, pa.float32()),
         pa.array(np.full(len(a), level, np.int32))],
        names=EDGES_SCHEMA.names)


def search(routed: DataFrame, dim: int, thresholds: list[float], block_rows: int, all_pairs: bool, partitions: int,
           block_memory: int, bucket_width: int, task_buckets: dict[int, list[int]],
           fault_fraction: float = 0.0, index: IndexFiles | None = None) -> DataFrame:
    """Edges (EDGES_SCHEMA) from every search task; a spanning edge found in several tasks may repeat.
    ``task_buckets``: SearchPlan.task_buckets. Task t runs in partition t modulo ``partitions``.
    ``index``: the tasks that also write their rows as a file of the corpus index, and where."""

    def handle(task_id: object, rows: pa.Table) -> Iterator[pa.RecordBatch]:
        faults.maybe_fail("search", fault_fraction, task_id)
        yield from search_task(rows, dim, thresholds, block_rows, all_pairs, block_memory,
                               task_buckets[int(task_id)], bucket_width)
        if index is not None and int(task_id) in index.tasks:
            index.write(int(task_id), rows)

    return stream_groups(routed, "task_id", ["side", "row_id"], partitions, handle, EDGES_SCHEMA, by_id=True)


class IndexFiles(NamedTuple):
    """Search tasks writing the rows they hold as the corpus index's files (``index.py``): the rows
    are already gathered by bucket here, so the index costs their write, not a shuffle of its own."""

    tasks: frozenset[int]  # ``bucket.index_tasks``: each row once per task of a bucket it joined
    target: str  # the segment's directory
    scratch: str  # per task attempt, so a failed or speculative attempt leaves no partial file

    def write(self, task_id: int, rows: pa.Table) -> None:
        import pyarrow.parquet as pq
        from pyspark import TaskContext

        context = TaskContext.get()
        name = index_file(task_id)
        attempt = f"{context.stageId()}-{context.attemptNumber()}" if context else "driver"
        temporary = storage.join(self.scratch, f"index-{attempt}", name)
        with storage.open_output(temporary) as sink:
            pq.write_table(rows.select(["row_id", "buckets", "embedding"]), sink, row_group_size=16384)
        storage.move(temporary, storage.join(self.target, name))


def index_file(task_id: int) -> str:
    return f"task-{task_id:06d}.parquet"


def forest(edges: DataFrame, level: int = 0) -> DataFrame:
    """The spanning edges for ``thresholds[level]``: (row_id_a, row_id_b, similarity)."""
    return edges.where(F.col("level") == level).select("row_id_a", "row_id_b", "similarity")


def found_pairs(edges: DataFrame) -> DataFrame:
    """Every found pair, once (``output.pairs: all`` only)."""
    return edges.where(F.col("level") == PAIR).select("row_id_a", "row_id_b", "similarity")


class SearchStats(NamedTuple):
    # Owned pairs per threshold, and per similarity bin (HISTOGRAM_BINS from the search threshold):
    # among the comparisons made, so lower bounds when rows_attached > 0, exact otherwise.
    pair_counts: list[int]
    histogram: list[int]
    forest_edges: list[int]  # spanning edges per threshold
    kernel_seconds: float  # summed over tasks: time inside kernels.graph_search
    task_rows: int  # summed over tasks: rows received, i.e. carried by the shuffle to search
    comparisons_done: int = 0  # summed over tasks: similarities the kernel computed
    comparisons_all_pairs: int = 0  # summed over tasks: what computing every pair of their buckets costs
    rows_attached: int = 0  # summed over tasks: rows attached to a representative (not compared with each other)


def search_stats(edges: DataFrame, levels: int) -> SearchStats:
    """The per-task counters summed over tasks, and the spanning edges per threshold, in one scan
    (small: collected)."""
    counts_row = F.col("level") <= PAIR_COUNT
    totals = (edges.where(counts_row | (F.col("level") >= 0))
              .groupBy("level", F.when(counts_row, F.col("row_id_a")).alias("index"))
              .agg(F.sum(F.when(counts_row, F.col("row_id_b")).otherwise(1)).alias("count")).collect())
    pair_counts, histogram, forest_edges = [0] * levels, [0] * HISTOGRAM_BINS, [0] * levels
    single = dict.fromkeys((KERNEL_MICROS, TASK_ROWS, COMPARISONS, ALL_PAIRS, ATTACHED), 0)  # index 0 each
    for row in totals:
        if row["level"] >= 0:
            forest_edges[row["level"]] = int(row["count"])
        elif row["level"] in single:
            single[row["level"]] = int(row["count"])
        else:
            target = pair_counts if row["level"] == PAIR_COUNT else histogram
            target[int(row["index"])] = int(row["count"])
    return SearchStats(pair_counts, histogram, forest_edges, single[KERNEL_MICROS] / 1e6, single[TASK_ROWS],
                       single[COMPARISONS], single[ALL_PAIRS], single[ATTACHED])


PROBE_PAIRS_SCHEMA = T.StructType([
    T.StructField("probe_id", T.LongType(), False),
    T.StructField("row_id", T.LongType(), False),
    T.StructField("similarity", T.FloatType(), False),
])


def probe_scanner(probe_ids: np.ndarray, probes: np.ndarray, dim: int,
                  threshold: float) -> BatchTransform:
    """A batch transform from (row_id, embedding) rows to every (probe, row) with cosine >= threshold
    (PROBE_PAIRS_SCHEMA): the small probe matrix, shipped to the tasks, is compared exactly with
    every row it sees.

    Used for the recall estimate (probes: sampled rows) and for audits (probes: query embeddings).
    """

    def scan(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            embeddings = binary_matrix(batch.column("embedding"), dim)
            row_ids = batch.column("row_id").to_numpy()
            for i, j, similarity in kernels.search_pairs(probes, embeddings, threshold):
                yield pa.RecordBatch.from_arrays([pa.array(probe_ids[i]), pa.array(row_ids[j]),
                                                  pa.array(similarity, pa.float32())], names=PROBE_PAIRS_SCHEMA.names)

    return scan


def scan_probes(rows: DataFrame, probe_ids: np.ndarray, probes: np.ndarray, dim: int, threshold: float) -> DataFrame:
    """``probe_scanner`` over a DataFrame of (row_id, embedding) rows, in one scan."""
    return rows.select("row_id", "embedding").mapInArrow(probe_scanner(probe_ids, probes, dim, threshold),
                                                         PROBE_PAIRS_SCHEMA)


class _Plan(NamedTuple):
    """The search's sizing, from the bucket counts and the executors' memory."""

    cap: int  # most rows one task holds
    task_memory: int
    partitions: int
    pack_rows: int
    pack_tasks: int
    shared_rows: np.ndarray | None  # rows each pair of buckets shares (assign stage)


def _sizing(ctx: RunContext) -> _Plan:
    spark = ctx.spark
    task_memory = bucket.task_memory_bytes(spark)
    cap = bucket.max_task_rows(task_memory, ctx.dim, ctx.config)
    # Partitions of about 20,000 routed rows (at least 4 a core). Packs of buckets up to
    # max_task_rows, each at most an eighth of a core's share of the search.
    cores = spark.sparkContext.defaultParallelism
    partitions = max(1, max(cores * 4, math.ceil(ctx.results["assign"]["rows"] / 20000)))
    pack_rows = ctx.config.search.pack_rows if ctx.config.search.pack_rows is not None else cap
    shared = storage.read_npy(ctx.work.bucket_pairs) if storage.exists(ctx.work.bucket_pairs) else None
    return _Plan(cap, task_memory, partitions, pack_rows, cores * 8, shared)


def _settings(ctx: RunContext) -> dict:
    sizing = _sizing(ctx)
    return {"thresholds": ctx.thresholds, "cap": sizing.cap, "task_memory": sizing.task_memory,
            "all_pairs": ctx.all_pairs, "pack_rows": sizing.pack_rows if sizing.shared_rows is not None else 0,
            "pack_tasks": sizing.pack_tasks, "query_block_rows": ctx.config.search.query_block_rows,
            "seed": ctx.config.bucketing.seed}


def plan(ctx: RunContext) -> bucket.SearchPlan:
    """The search plan (deterministic: the index stage recomputes it to find each row's files)."""
    from dedup_spark.assign import bucket_sizes

    sizing = _sizing(ctx)
    return bucket.plan_search(bucket_sizes(ctx), sizing.cap, sizing.shared_rows, sizing.pack_rows, sizing.pack_tasks,
                              bucket.pair_width(ctx.model) <= 2)


def _run(ctx: RunContext) -> dict:
    model, sizing, config, work = ctx.model, _sizing(ctx), ctx.config, ctx.work
    searched = plan(ctx)
    routed = map_valid_rows_beside(ctx.spark, work.rows, work.assigned,
                                   bucket.router(searched, model.width, config.bucketing.seed), bucket.ROUTED_SCHEMA)
    storage.delete_tree(work.index_segment)
    index = IndexFiles(frozenset(bucket.index_tasks(searched)), work.index_segment, work.scratch)
    edges = search(routed, ctx.dim, ctx.thresholds, config.search.query_block_rows, ctx.all_pairs,
                   min(searched.tasks, sizing.partitions), sizing.task_memory // 2, model.width, searched.task_buckets,
                   faults.active().task_fraction, index)
    info = tables.write_table(edges, work.edges)
    stats = search_stats(tables.read_table(ctx.spark, work.edges), len(ctx.thresholds))
    return {"rows": info.rows, "tasks": searched.tasks, "split_buckets": searched.split_buckets,
            "routed_rows": stats.task_rows,
            "packed_buckets": sum(len(b) for b in searched.task_buckets.values() if len(b) > 1),
            "comparisons": searched.comparisons, "largest_task_rows": searched.largest_task_rows,
            "max_task_rows": sizing.cap,
            "pair_counts": stats.pair_counts, "histogram": stats.histogram, "forest_edges": stats.forest_edges,
            "kernel_task_seconds": round(stats.kernel_seconds, 3), "comparisons_done": stats.comparisons_done,
            "comparisons_all_pairs": stats.comparisons_all_pairs, "rows_attached": stats.rows_attached,
            "note": f"{stats.pair_counts[0]} pairs, {searched.tasks} tasks, {searched.split_buckets} split buckets, "
                    f"{stats.task_rows} rows shuffled for {ctx.results['assign']['rows']} bucket joins, "
                    f"cap {sizing.cap}, {stats.kernel_seconds:.1f} s in the kernel over all tasks"}


STAGE = Stage("search", _settings, _run)

"""Recall self-estimate: how many true pairs did the bucketed search miss, in this run?

A seeded uniform sample of rows (``estimate.sample_rows``) is collected to the
driver and shipped to the assign tasks, which compare it exhaustively with every
row they read (exact search as everywhere else; no scan of its own). That yields every true
pair involving a sampled row. Closure recall is the fraction of those pairs
whose two rows ended in the same group; where ``output.pairs: all``, direct
recall is the fraction found as pairs.

The interval: pairs of one sampled row are correlated (a missed bucket loses a
row's pairs together), so the estimate is a ratio over sampled rows,
R = sum(closed_i) / sum(true_i), with the linearised variance
sum((closed_i - R true_i)^2) / (s (s - 1) mean(true)^2) and a normal 95% interval,
clipped to [0, 1].

Stage ``estimate``: in, the probes' true pairs (found by the assign stage), ``duplicates/``
and, with ``output.pairs: all``, ``pairs/``. Result: closure (and direct) recall with their
intervals and the estimate's cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dedup_spark import read, search, tables
from dedup_spark.stage import RunContext, Stage
from dedup_spark.tables import BatchTransform, binary_matrix


def ratio_interval(closed: np.ndarray, true: np.ndarray) -> tuple[float, float, float]:
    """Ratio estimate and its 95% interval from per-sampled-row counts."""
    total = true.sum()
    if total == 0:
        return 1.0, 1.0, 1.0
    ratio = closed.sum() / total
    rows = len(true)
    if rows < 2:
        return float(ratio), 0.0, 1.0
    variance = np.sum((closed - ratio * true) ** 2) / (rows * (rows - 1) * true.mean() ** 2)
    half = 1.96 * math.sqrt(variance)
    return float(ratio), float(max(0.0, ratio - half)), float(min(1.0, ratio + half))


def probe_fraction(sample_rows: int, valid_rows: int) -> float:
    """The Bernoulli fraction drawing the sampled rows (1.5x, trimmed after)."""
    return min(1.0, 1.5 * sample_rows / max(1, valid_rows))


def probes(spark: SparkSession, rows_uri: str, sample_rows: int, valid_count: int, dim: int, seed: int,
           stored: read.StoredSample | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The sampled rows' ids and embeddings (small: on the driver), drawn with seed + 1, from ``stored``
    when it holds the draw. ``search.probe_scanner`` compares them with every row, in the assign
    stage's scan (the rows are read once for both)."""
    picked = read.sample_valid_rows(spark, rows_uri, probe_fraction(sample_rows, valid_count), seed + 1,
                                    sample_rows, stored)
    return picked.column("row_id").to_numpy(), binary_matrix(picked.column("embedding"), dim).copy()


# A probe_id marking a timing row: row_id holds the microseconds the probe comparisons took.
_TIMING = -1


def probe_transform(probe_ids: np.ndarray, probe_matrix: np.ndarray, dim: int, threshold: float) -> BatchTransform:
    """``search.probe_scanner`` that also writes one timing row (probe_id -1) per call, i.e. per batch
    under ``tables.write_mapped_tables``: the probes' cost stays visible in the report although it is
    paid inside the assign stage."""
    scan = search.probe_scanner(probe_ids, probe_matrix, dim, threshold)

    def timed(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        elapsed = 0.0
        for batch in batches:
            started = time.perf_counter()
            found = list(scan(iter([batch])))
            elapsed += time.perf_counter() - started
            yield from found
        yield pa.RecordBatch.from_arrays([pa.array([_TIMING], pa.int64()), pa.array([round(elapsed * 1e6)], pa.int64()),
                                          pa.array([0.0], pa.float32())], names=search.PROBE_PAIRS_SCHEMA.names)

    return timed


def probe_task_seconds(probe_pairs: DataFrame) -> float:
    """Seconds the assign tasks spent comparing rows with the probes, summed over tasks."""
    total = probe_pairs.where(F.col("probe_id") == _TIMING).agg(F.sum("row_id")).first()[0]
    return float(total or 0) / 1e6


def true_pairs(probe_pairs: DataFrame) -> DataFrame:
    """(sample_row_id, row_id) for every pair >= threshold that involves a sampled row, from the probe
    scan's output (``probe_transform``; a probe meets itself there too)."""
    return (probe_pairs.where((F.col("probe_id") != F.col("row_id")) & (F.col("probe_id") != _TIMING))
            .select(F.col("probe_id").alias("sample_row_id"), "row_id"))


def estimate_recall(sample_pairs: DataFrame, sampled: int, duplicates: DataFrame, pairs: DataFrame | None) -> dict:
    """Closure (and direct, when ``pairs`` holds every found pair) recall with 95% intervals."""
    return summarise(closure_flags(sample_pairs, duplicates), sampled, pairs)


def closure_flags(sample_pairs: DataFrame, duplicates: DataFrame) -> DataFrame:
    """(sample_row_id, row_id, closed): closed when the two rows ended in one group."""
    groups = duplicates.select("row_id", "group_id")
    return (sample_pairs
            .join(groups.withColumnRenamed("row_id", "sample_row_id").withColumnRenamed("group_id", "g_a"),
                  "sample_row_id", "left")
            .join(groups.withColumnRenamed("group_id", "g_b"), "row_id", "left")
            .select("sample_row_id", "row_id",
                    (F.col("g_a").isNotNull() & (F.col("g_a") == F.col("g_b"))).cast("long").alias("closed")))


def summarise(flags: DataFrame, sampled: int, pairs: DataFrame | None) -> dict:
    """Per sampled row, its true pairs and those closed (and found), as ratio estimates."""
    joined = flags
    if pairs is not None:
        found = pairs.select(F.col("row_id_a").alias("lo"), F.col("row_id_b").alias("hi"), F.lit(1).alias("found"))
        joined = (joined.withColumn("lo", F.least("sample_row_id", "row_id"))
                  .withColumn("hi", F.greatest("sample_row_id", "row_id"))
                  .join(found, ["lo", "hi"], "left").withColumn("found", F.coalesce("found", F.lit(0))))
    else:
        joined = joined.withColumn("found", F.lit(0))
    per_row = joined.groupBy("sample_row_id").agg(F.count("*").alias("true"), F.sum("closed").alias("closed"),
                                                  F.sum("found").alias("found")).collect()
    true = np.array([r["true"] for r in per_row] + [0] * (sampled - len(per_row)), dtype=np.float64)
    closed = np.array([r["closed"] for r in per_row] + [0] * (sampled - len(per_row)), dtype=np.float64)
    closure, low, high = ratio_interval(closed, true)
    result = {"sample_rows": sampled, "true_pairs_seen": int(true.sum()),
              "closure_recall": round(closure, 5), "closure_recall_ci95": [round(low, 5), round(high, 5)]}
    if pairs is not None:
        found = np.array([r["found"] for r in per_row] + [0] * (sampled - len(per_row)), dtype=np.float64)
        direct, low, high = ratio_interval(found, true)
        result.update(direct_recall=round(direct, 5), direct_recall_ci95=[round(low, 5), round(high, 5)])
    return result


def _settings(ctx: RunContext) -> dict:
    return {"sample_rows": ctx.config.estimate.sample_rows}


def probe_pairs_found(ctx: RunContext) -> DataFrame | None:
    """The probes' true pairs, found by the assign stage's scan; None when the run sampled none
    (the stage is then skipped)."""
    from dedup_spark.assign import probing

    return tables.read_table(ctx.spark, ctx.work.probe_pairs) if probing(ctx) else None


SKIPPED = {"rows": 0, "skipped": True}


def _run(ctx: RunContext) -> dict:
    started = time.perf_counter()
    probe_pairs = probe_pairs_found(ctx)
    if probe_pairs is None:
        return dict(SKIPPED)
    spark, work = ctx.spark, ctx.work
    sampled = ctx.results["assign"]["probe_rows"]
    pairs = tables.read_table(spark, work.pairs) if ctx.all_pairs else None
    result = estimate_recall(true_pairs(probe_pairs), sampled, tables.read_table(spark, work.duplicates), pairs)
    return stage_result(ctx, result, probe_pairs, started)


def stage_result(ctx: RunContext, result: dict, probe_pairs: DataFrame, started: float) -> dict:
    """The stage's result: the estimate and its cost, this stage and the probe comparisons inside
    assign spread over the cores."""
    probe_seconds = probe_task_seconds(probe_pairs)
    result["probe_task_seconds"] = round(probe_seconds, 3)
    cores = ctx.spark.sparkContext.defaultParallelism
    result["seconds"] = round(time.perf_counter() - started + probe_seconds / cores, 3)
    return {"rows": result["sample_rows"], **result,
            "note": f"closure recall {result['closure_recall']} (95% CI {result['closure_recall_ci95']})"}


STAGE = Stage("estimate", _settings, _run)

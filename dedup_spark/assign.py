"""Assign stage: every valid row to its buckets, and the recall probes compared with every row.

In: the rows table and ``model/``. Out: the assign table (``Work.assigned``: each row's bucket
ids, in the rows table's parts and row order, read beside it without a join), bucket sizes and
the rows each pair of buckets shares (``Work.bucket_sizes``, ``Work.bucket_pairs``, for the
search plan), and the probes' true pairs (``Work.probe_pairs``) when the recall self-estimate is
on: the probes ride on this scan of every row. Result: rows x buckets joined, buckets, probes.
"""

from __future__ import annotations

import numpy as np

from dedup_spark import bucket, estimate, search, storage, tables
from dedup_spark.read import StoredSample, write_valid_tables
from dedup_spark.report import AccountingError
from dedup_spark.stage import RunContext, Stage


def probing(ctx: RunContext) -> bool:
    return ctx.config.estimate.sample_rows > 0 and ctx.valid_rows > 0


def _settings(ctx: RunContext) -> dict:
    # The threshold scales the k-means margin, so it changes which further buckets rows join, and
    # it is the probes' threshold.
    probes = probing(ctx)
    return {"threshold": ctx.threshold if ctx.model.margin is not None or probes else None,
            "probes": ctx.config.estimate.sample_rows if probes else 0}


def _run(ctx: RunContext) -> dict:
    model, work = ctx.model, ctx.work
    outputs = {"assigned": (bucket.assigner(work.model, ctx.dim, model.model_id, ctx.threshold),
                            bucket.ASSIGNED_SCHEMA, work.assigned)}
    probe_rows = 0
    if probing(ctx):
        probe_ids, probe_matrix = estimate.probes(ctx.spark, work.rows, ctx.config.estimate.sample_rows,
                                                  ctx.valid_rows, ctx.dim, ctx.config.bucketing.seed,
                                                  StoredSample.from_dict(ctx.results["read"]["sample"]))
        probe_rows = len(probe_ids)
        outputs["probe_pairs"] = (estimate.probe_transform(probe_ids, probe_matrix, ctx.dim, ctx.threshold),
                                  search.PROBE_PAIRS_SCHEMA, work.probe_pairs)
    info = write_valid_tables(ctx.spark, work.rows, outputs)["assigned"]
    if info.rows != ctx.valid_rows:
        raise AccountingError(f"assign wrote {info.rows} rows for {ctx.valid_rows} valid rows")
    sizes, shared = bucket.bucket_counts(tables.read_table(ctx.spark, work.assigned), model.width,
                                         bucket.pair_width(model))
    joins = sum(sizes.values())
    # Every row joins at least its nearest bucket of each round, at most model.width buckets.
    if not ctx.valid_rows * model.rounds <= joins <= ctx.valid_rows * model.width:
        raise AccountingError(f"rows joined {joins} buckets, not between {ctx.valid_rows} valid rows x "
                              f"{model.rounds} and x {model.width}: rows would go unsearched")
    storage.write_npy(work.bucket_sizes, np.array(sorted(sizes.items()), dtype=np.int64).reshape(-1, 2))
    storage.write_npy(work.bucket_pairs, shared)
    return {"rows": joins, "buckets": len(sizes), "probe_rows": probe_rows,
            "note": f"{len(sizes)} non-empty buckets" + (f", {probe_rows} recall probes" if probe_rows else "")}


STAGE = Stage("assign", _settings, _run)


def bucket_sizes(ctx: RunContext) -> dict[int, int]:
    """Rows per non-empty bucket, as the assign stage counted them."""
    return {int(b): int(c) for b, c in storage.read_npy(ctx.work.bucket_sizes)}

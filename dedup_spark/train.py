"""Train stage: the bucketing model, learnt on the samples the read stage drew.

In: the training sample (and two-level k-means's cell sample) of the rows table. Out:
``model/`` (``bucket.train``: centroids and quantizers, or LSH planes; ``bucketing.json``),
with the resolved configuration and the input's manifest beside it, so an audit or an
incremental run can use the model without the run that made it. Result: the model's summary.
"""

from __future__ import annotations

import yaml

from dedup_spark import bucket, storage
from dedup_spark.read import StoredSample
from dedup_spark.stage import RunContext, Stage


def _settings(ctx: RunContext) -> dict:
    # The threshold scales which near-copy centroids are merged.
    merging = ctx.config.bucketing.merge_centroids is not None
    return {"bucketing": ctx.config.to_dict()["bucketing"], "threshold": ctx.threshold if merging else None}


def _run(ctx: RunContext) -> dict:
    read = ctx.results["read"]
    sample = StoredSample.from_dict(read["sample"])
    cells = StoredSample.from_dict(read["cell_sample"]) if read.get("cell_sample") else None
    model = bucket.train(ctx.spark, ctx.work.rows, ctx.valid_rows, ctx.dim, ctx.config, ctx.work.model, sample, cells,
                         ctx.threshold)
    storage.write_bytes(storage.join(ctx.work.model, "config.yaml"),
                        yaml.safe_dump(ctx.config.to_dict(), sort_keys=False).encode())
    storage.write_json(storage.join(ctx.work.model, "manifest.json"), ctx.manifest.to_dict())
    return {"rows": model.train_rows, "model": model.to_dict(),
            "note": f"{model.method} ({model.training}), K={model.buckets_per_round} x {model.rounds} round(s), "
                    f"m={model.m}, {model.assign} assignment"}


STAGE = Stage("train", _settings, _run)

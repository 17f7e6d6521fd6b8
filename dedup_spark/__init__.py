"""dedup-spark: near-duplicate removal for embedding datasets on Apache Spark.

Two ways in:

    from dedup_spark import deduplicate                      # a DataFrame, from your Spark code
    result = deduplicate(df, embedding_col="embedding", id_col="key", threshold=0.95)

    from dedup_spark import load_config, run                 # files in, files out (jobs/dedup.py)
    report = run(load_config(None, {"input.uri": "s3://in", "output.uri": "s3://out"}))

The pipeline, one module per stage (``stage.Stage``), ordered by ``pipeline``:
    read.py     shard manifest (driver) and row decoding (tasks); formats/ has one module per input layout
    train.py    the bucketing model (bucket.py: k-means or LSH, the cost model, the search plan)
    assign.py   every row to its buckets, and the recall probes
    search.py   exact in-bucket search in tasks (kernels.py), local spanning forests
    group.py    connected components, keep policy, similarity to the kept row, captions (captions.py)
    estimate.py recall self-estimate from an exhaustively searched sample
    write.py    deduplicated shards, one per input shard
    report.py   counts, timings, the accounting check; html.py renders it
Around them: api.py (``deduplicate``), publish.py (locations, the output's claim, the atomic
publish), config.py (the one configuration object), storage.py (pyarrow.fs), tables.py (Spark
tables written and read by tasks), session.py, blas.py, faults.py (test-only fault injection),
sample.py (the CLIP-like sample generator), audit.py (replication audits).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["DedupResult", "JobConfig", "deduplicate", "load_config", "run"]
# Imported on first use, so a Spark task importing one kernel module does not load the pipeline.
_EXPORTS = {"DedupResult": ("dedup_spark.api", "DedupResult"), "deduplicate": ("dedup_spark.api", "deduplicate"),
            "JobConfig": ("dedup_spark.config", "JobConfig"), "load_config": ("dedup_spark.config", "load"),
            "run": ("dedup_spark.pipeline", "run")}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dedup_spark' has no attribute {name!r}")
    import importlib

    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(module), attribute)

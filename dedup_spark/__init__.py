"""dedup-spark: near-duplicate removal for embedding datasets on Apache Spark.

The pipeline, one module per stage:
    read.py    shard manifest (driver) and row decoding (tasks)
    bucket.py  k-means training on a sample, top-m assignment, search-task plan
    search.py  exact in-bucket search in tasks, local spanning forests
    group.py   connected components, keep policy, similarity to the kept row
    estimate.py recall self-estimate from an exhaustively searched sample
    write.py   deduplicated shards, one per input shard
    report.py  counts, timings, the accounting check
    pipeline.py runs them in order and publishes the outputs
Support: config.py (the one configuration object), storage.py (pyarrow.fs),
tables.py (Spark tables written and read by tasks), kernels.py (numpy/faiss),
blas.py (which OpenBLAS kernels run the matrix products; faiss loaded on numpy's),
sample.py (the CLIP-like sample generator).
"""

__version__ = "0.1.0"

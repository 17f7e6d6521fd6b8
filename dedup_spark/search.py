"""Search stage: exact cosine search inside each search task, in Spark tasks.

Each task holds one bucket (or one block, or one pair of blocks of a split
bucket), finds every pair >= threshold with float32 matrix products and an
exact float64 check near the threshold (see ``kernels.search_pairs``), and
unions its pairs in a local union-find. It emits its spanning edges (a forest:
fewer edges than rows) and, when ``output.pairs: all``, every pair too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from dedup_spark import kernels
from dedup_spark.tables import binary_matrix, stream_groups

EDGES_SCHEMA = T.StructType([
    T.StructField("row_id_a", T.LongType(), False),
    T.StructField("row_id_b", T.LongType(), False),
    T.StructField("similarity", T.FloatType(), False),
    T.StructField("spanning", T.BooleanType(), False),
])


def search_task(rows: pa.Table, dim: int, threshold: float, block_rows: int, all_pairs: bool) -> Iterator[pa.RecordBatch]:
    """Pairs of one search task. ``rows``: side, row_id, embedding (side 1 only for block pairs)."""
    side = rows.column("side").to_numpy()
    row_ids = rows.column("row_id").to_numpy()
    embeddings = binary_matrix(rows.column("embedding"), dim)
    right_mask = side == 1
    if right_mask.any():
        left_index, right_index = np.flatnonzero(~right_mask), np.flatnonzero(right_mask)
        blocks = kernels.search_pairs(embeddings[left_index], embeddings[right_index], threshold, block_rows)
    else:
        left_index = right_index = np.arange(len(row_ids))
        blocks = kernels.search_pairs(embeddings, None, threshold, block_rows)
    forest = kernels.SpanningForest(len(row_ids))
    for i, j, similarity in blocks:
        a, b = left_index[i], right_index[j]
        chosen = forest.add(a, b, similarity)
        if all_pairs:
            spanning = np.zeros(len(a), dtype=bool)
            spanning[chosen] = True
        else:
            a, b, similarity = a[chosen], b[chosen], similarity[chosen]
            spanning = np.ones(len(a), dtype=bool)
        if len(a) == 0:
            continue
        id_a, id_b = row_ids[a], row_ids[b]
        yield pa.RecordBatch.from_arrays(
            [pa.array(np.minimum(id_a, id_b)), pa.array(np.maximum(id_a, id_b)), pa.array(similarity, pa.float32()),
             pa.array(spanning)],
            names=EDGES_SCHEMA.names,
        )


def search(routed: DataFrame, dim: int, threshold: float, block_rows: int, all_pairs: bool, partitions: int) -> DataFrame:
    """Edges (EDGES_SCHEMA) from every search task; a pair found in several tasks may repeat."""

    def handle(task_id: object, rows: pa.Table) -> Iterator[pa.RecordBatch]:
        del task_id
        yield from search_task(rows, dim, threshold, block_rows, all_pairs)

    return stream_groups(routed, "task_id", ["side", "row_id"], partitions, handle, EDGES_SCHEMA)

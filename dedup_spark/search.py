"""Search stage: exact cosine search inside each search task, in Spark tasks.

Each task holds one bucket (or one block, or one pair of blocks of a split
bucket) and compares every row with every other by float32 matrix products,
with an exact float64 check near the threshold.

- ``output.pairs: spanning | none``: the task emits a spanning forest of its
  >= threshold graph (``kernels.spanning_edges``), never materialising the
  pairs themselves, so a group of g copies costs g - 1 edges, not g^2 / 2.
- ``output.pairs: all``: the task emits every pair (``kernels.search_pairs``),
  flagging those that form its spanning forest for the grouping stage.
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


def search_task(rows: pa.Table, dim: int, threshold: float, block_rows: int, all_pairs: bool,
                block_memory: int = 256 << 20) -> Iterator[pa.RecordBatch]:
    """Pairs of one search task. ``rows``: side, row_id, embedding (side 1 only for block pairs)."""
    side = rows.column("side").to_numpy()
    row_ids = rows.column("row_id").to_numpy()
    embeddings = binary_matrix(rows.column("embedding"), dim)
    right_mask = side == 1
    if not all_pairs:
        left_nodes = np.flatnonzero(~right_mask)
        right_nodes = np.flatnonzero(right_mask) if right_mask.any() else None
        a, b, similarity = kernels.spanning_edges(embeddings, left_nodes, right_nodes, threshold, block_rows, block_memory)
        if len(a):
            yield _edges_batch(row_ids, a, b, similarity, np.ones(len(a), dtype=bool))
        return
    if right_mask.any():
        left_index, right_index = np.flatnonzero(~right_mask), np.flatnonzero(right_mask)
        blocks = kernels.search_pairs(embeddings[left_index], embeddings[right_index], threshold, block_rows)
    else:
        left_index = right_index = np.arange(len(row_ids))
        blocks = kernels.search_pairs(embeddings, None, threshold, block_rows)
    forest = kernels.SpanningForest(len(row_ids))
    for i, j, similarity in blocks:
        a, b = left_index[i], right_index[j]
        spanning = np.zeros(len(a), dtype=bool)
        spanning[forest.add(a, b, similarity)] = True
        yield _edges_batch(row_ids, a, b, similarity, spanning)


def _edges_batch(row_ids: np.ndarray, a: np.ndarray, b: np.ndarray, similarity: np.ndarray,
                 spanning: np.ndarray) -> pa.RecordBatch:
    """EDGES_SCHEMA rows for local node pairs (a, b), as row ids with row_id_a < row_id_b."""
    id_a, id_b = row_ids[a], row_ids[b]
    return pa.RecordBatch.from_arrays(
        [pa.array(np.minimum(id_a, id_b)), pa.array(np.maximum(id_a, id_b)), pa.array(similarity, pa.float32()),
         pa.array(spanning)],
        names=EDGES_SCHEMA.names)


def search(routed: DataFrame, dim: int, threshold: float, block_rows: int, all_pairs: bool, partitions: int,
           block_memory: int) -> DataFrame:
    """Edges (EDGES_SCHEMA) from every search task; a pair found in several tasks may repeat."""

    def handle(task_id: object, rows: pa.Table) -> Iterator[pa.RecordBatch]:
        del task_id
        yield from search_task(rows, dim, threshold, block_rows, all_pairs, block_memory)

    return stream_groups(routed, "task_id", ["side", "row_id"], partitions, handle, EDGES_SCHEMA)

"""Pure numpy / faiss kernels: no Spark here, so each is unit-testable alone.

Exactness contract of the search: a pair is reported when its cosine
similarity on the stored float16 values is >= the threshold. Similarities are
computed by float32 matrix multiplication; pairs whose float32 value lies
within the float32 rounding bound of the threshold are recomputed in float64
(exact for float16 inputs up to the final rounding), so the decision does not
depend on BLAS blocking, thread count or how a bucket was split.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

REJECT_NOT_FINITE = "not_finite"
REJECT_ZERO_NORM = "zero_norm"
REJECT_WRONG_DIM = "wrong_dim"
REJECT_NULL_EMBEDDING = "null_embedding"
REJECT_NULL_ID = "null_id"


def normalize_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise rows to float16.

    Returns the normalised float16 matrix and an object array with a reject
    reason per row (None for good rows). Rejected rows are zero in the output.
    """
    values = np.asarray(matrix, dtype=np.float32)
    reasons = np.full(values.shape[0], None, dtype=object)
    finite = np.isfinite(values).all(axis=1)
    reasons[~finite] = REJECT_NOT_FINITE
    safe = np.where(finite[:, None], values, 0.0)
    norms = np.sqrt(np.einsum("ij,ij->i", safe, safe, dtype=np.float64))
    zero = finite & ~(norms > 0.0)
    reasons[zero] = REJECT_ZERO_NORM
    good = finite & ~zero
    out = np.zeros(values.shape, dtype=np.float16)
    out[good] = (safe[good] / norms[good, None]).astype(np.float16)
    # A vector whose every component underflows float16 after scaling is unusable.
    underflow = good & ~np.any(out != 0, axis=1)
    reasons[underflow] = REJECT_ZERO_NORM
    return out, reasons


def similarity_margin(dim: int) -> float:
    """Twice the worst-case float32 error of a length-``dim`` dot product of unit vectors."""
    return 2.0 * dim * 2.0**-24 * 1.01 + 1e-7


def train_centroids(sample: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (k x d float32, unit rows) with faiss."""
    import faiss

    points = np.ascontiguousarray(sample, dtype=np.float32)
    k = max(1, min(k, points.shape[0]))
    if k == 1:
        centroid = points.mean(axis=0, keepdims=True)
        norm = np.linalg.norm(centroid)
        return (centroid / norm if norm > 0 else np.eye(1, points.shape[1], dtype=np.float32)).astype(np.float32)
    kmeans = faiss.Kmeans(
        points.shape[1], k, niter=iterations, seed=seed, spherical=True,
        min_points_per_centroid=1, max_points_per_centroid=max(256, points.shape[0] // k + 1),
        verbose=False,
    )
    kmeans.train(points)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def build_quantizer(centroids: np.ndarray, kind: str, m: int = 1):
    """A faiss index over the centroids: exact ("flat") or HNSW ("hnsw").

    Flat assignment costs K*d per row; HNSW about log(K)*d*ef, which is what
    makes K in the 10^5-10^6 range affordable. Either way the in-bucket search
    stays exact: the quantizer only decides which buckets a row joins.
    """
    import faiss

    data = np.ascontiguousarray(centroids, dtype=np.float32)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(data.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(data)
        index.hnsw.efSearch = max(64, 4 * m)
        return index
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    return index


def assign_buckets(embeddings: np.ndarray, quantizer, m: int) -> np.ndarray:
    """The ``m`` nearest centroids (largest inner product) of every row: n x m int64.

    ``quantizer``: a faiss index over the centroids, or the centroid matrix itself.
    """
    if isinstance(quantizer, np.ndarray):
        quantizer = build_quantizer(quantizer, "flat")
    k = quantizer.ntotal
    m = min(m, k)
    if m == k:
        return np.broadcast_to(np.arange(k, dtype=np.int64), (embeddings.shape[0], k)).copy()
    _, labels = quantizer.search(np.ascontiguousarray(embeddings, dtype=np.float32), m)
    return labels.astype(np.int64)


def search_pairs(
    left: np.ndarray,
    right: np.ndarray | None,
    threshold: float,
    block_rows: int = 1024,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair with cosine >= threshold, in blocks of ``(i, j, similarity)``.

    ``right is None``: pairs inside ``left`` with i < j. Otherwise every
    (i in left, j in right). Inputs are float16 (or float32) unit rows.
    """
    left32 = np.ascontiguousarray(left, dtype=np.float32)
    same = right is None
    right32 = left32 if same else np.ascontiguousarray(right, dtype=np.float32)
    margin = similarity_margin(left32.shape[1])
    low, high = threshold - margin, threshold + margin
    for start in range(0, left32.shape[0], block_rows):
        stop = min(start + block_rows, left32.shape[0])
        # Inside one set only columns after the block's first row can pair with it.
        col0 = start if same else 0
        scores = left32[start:stop] @ right32[col0:].T
        rows, cols = np.nonzero(scores >= low)
        sims = scores[rows, cols]
        rows = rows + start
        cols = cols + col0
        if same:
            upper = cols > rows
            rows, cols, sims = rows[upper], cols[upper], sims[upper]
        unsure = sims < high
        if unsure.any():
            exact = np.einsum(
                "ij,ij->i",
                left[rows[unsure]].astype(np.float64),
                (left if same else right)[cols[unsure]].astype(np.float64),
            )
            sims = sims.astype(np.float64)
            sims[unsure] = exact
            keep = sims >= threshold
            rows, cols, sims = rows[keep], cols[keep], sims[keep]
        if rows.size:
            yield rows.astype(np.int64), cols.astype(np.int64), sims.astype(np.float32)


class SpanningForest:
    """Incremental union-find over ``n`` local nodes, vectorised with numpy.

    ``add`` returns the indices of the edges that joined two components: over
    all calls these form a spanning forest of the edges seen, so a search task
    can emit at most n - 1 edges whatever the number of pairs it found. Roots
    are always the smallest node of their component.
    """

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def _compress(self) -> None:
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        self.parent = parent

    def add(self, a: np.ndarray, b: np.ndarray, similarity: np.ndarray | None = None) -> np.ndarray:
        """Union the edges (a[i], b[i]); prefer higher-similarity edges as tree edges."""
        edge_ids = np.arange(len(a), dtype=np.int64)
        weight = np.zeros(len(a), dtype=np.float32) if similarity is None else np.asarray(similarity, np.float32)
        chosen: list[np.ndarray] = []
        while edge_ids.size:
            self._compress()
            root_a, root_b = self.parent[a], self.parent[b]
            cross = root_a != root_b
            if not cross.any():
                break
            a, b, weight, edge_ids = a[cross], b[cross], weight[cross], edge_ids[cross]
            low = np.minimum(root_a[cross], root_b[cross])
            high = np.maximum(root_a[cross], root_b[cross])
            # One hook per high root: its best edge to any lower root. Hooks always
            # point to a smaller node, so they never form a cycle.
            order = np.lexsort((-weight, high))
            sorted_high = high[order]
            first = np.ones(order.size, dtype=bool)
            first[1:] = sorted_high[1:] != sorted_high[:-1]
            pick = order[first]
            self.parent[high[pick]] = low[pick]
            chosen.append(edge_ids[pick])
        self._compress()
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    def labels(self) -> np.ndarray:
        self._compress()
        return self.parent.copy()


def _exact_band(scores: np.ndarray, left: np.ndarray, right: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                threshold: float, margin: float) -> None:
    """Settle scores within float32 rounding of the threshold in float64, in place:
    they become clearly above (threshold + 2 margin) or -inf."""
    band = (scores >= threshold - margin) & (scores < threshold + margin)
    if not band.any():
        return
    band_r, band_c = np.nonzero(band)
    if band_r.size:
        exact = np.einsum("ij,ij->i", left[rows[band_r]].astype(np.float64), right[cols[band_c]].astype(np.float64))
        scores[band_r, band_c] = np.where(exact >= threshold, threshold + 2 * margin, -np.inf)


def spanning_edges(
    points: np.ndarray,
    left: np.ndarray,
    right: np.ndarray | None,
    threshold: float,
    block_rows: int = 1024,
    memory_bytes: int = 256 << 20,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A spanning forest of the >= threshold graph, without materialising its pairs.

    ``points``: unit rows (float16). ``left``/``right``: node indices into
    ``points``; ``right is None`` searches pairs inside ``left``, otherwise pairs
    across the two. Returns edges (a, b, exact similarity) that are real pairs,
    at most one per merge, so fewer than len(points).

    Guarantee: the components of the returned edges equal those of all pairs
    >= threshold (closure identical to an exhaustive search). For each block
    of query rows, every row repeatedly links to its most similar neighbour
    outside its current component, and so does every column, until none is
    left (Boruvka rounds: the components touched at least halve each round); memory is O(block x columns), whatever the number of
    pairs, so a 100,000-copy group costs its matrix products and nothing more.
    """
    forest = SpanningForest(points.shape[0])
    as32 = np.ascontiguousarray(points, dtype=np.float32)
    same = right is None
    columns_all = left if same else right
    margin = similarity_margin(points.shape[1])
    # Several q x n float32 temporaries live at once: size the block to the budget.
    step = int(max(16, min(block_rows, memory_bytes // max(1, 16 * len(columns_all)))))
    chosen_a: list[np.ndarray] = []
    chosen_b: list[np.ndarray] = []
    for start in range(0, len(left), step):
        rows = left[start:start + step]
        cols = left[start:] if same else right
        scores = as32[rows] @ as32[cols].T
        if same:  # only pairs (i, j) with j after i: the block's own square keeps its upper triangle
            scores[:, :len(rows)][np.tril(np.ones((len(rows), len(rows)), dtype=bool))] = -np.inf
        _exact_band(scores, points, points, rows, cols, threshold, margin)
        hits = scores >= threshold
        while True:
            # Byte masks first: most rows of a formed group have no neighbour outside it.
            labels = forest.labels()
            cross = hits & (labels[cols][None, :] != labels[rows][:, None])
            if not cross.any():
                break
            # Every row and every column with a neighbour outside its component links to its
            # best such neighbour (Boruvka): the components touched at least halve each round.
            outside = np.where(cross, scores, -np.inf)
            row_best = np.argmax(outside, axis=1)
            row_score = outside[np.arange(len(rows)), row_best]
            col_best = np.argmax(outside, axis=0)
            col_score = outside[col_best, np.arange(len(cols))]
            row_on, col_on = row_score >= threshold, col_score >= threshold
            a = np.concatenate([rows[row_on], rows[col_best[col_on]]])
            b = np.concatenate([cols[row_best[row_on]], cols[col_on]])
            weight = np.concatenate([row_score[row_on], col_score[col_on]])
            picked = forest.add(a, b, weight)
            chosen_a.append(a[picked])
            chosen_b.append(b[picked])
    if not chosen_a:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    a, b = np.concatenate(chosen_a), np.concatenate(chosen_b)
    similarity = np.einsum("ij,ij->i", points[a].astype(np.float64), points[b].astype(np.float64))
    return a, b, similarity.astype(np.float32)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (smallest member) of each of ``n`` nodes."""
    forest = SpanningForest(n)
    forest.add(np.asarray(a, np.int64), np.asarray(b, np.int64))
    return forest.labels()

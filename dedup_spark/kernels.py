"""Pure numpy / faiss kernels: no Spark here, so each is unit-testable alone.

Exactness contract of the search: a pair is reported when the cosine
similarity of its stored float16 vectors, computed in float64, is >= the
threshold. (Stored rows are unit vectors rounded to float16, so their lengths
differ from 1 by up to ~1e-3: the cosine, not the plain dot product, is what
makes two identical rows similar exactly 1.0.) Similarities are computed by
float32 matrix products of the rows scaled to unit length; pairs whose float32
value lies within the float32 rounding bound of a threshold are recomputed in
float64 (``exact_cosine``), so the decision does not depend on BLAS blocking,
thread count or how a bucket was split.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from dedup_spark.blas import import_faiss

REJECT_NOT_FINITE = "not_finite"
REJECT_ZERO_NORM = "zero_norm"
REJECT_WRONG_DIM = "wrong_dim"
REJECT_NULL_EMBEDDING = "null_embedding"
REJECT_NULL_ID = "null_id"


def as_float32(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` (rows x d) as C-contiguous float32.

    float16 is widened by faiss's fp16 decoder (F16C SIMD), bit for bit numpy's ``astype`` over
    all 65,536 values (a test holds them equal) and ~1.7x faster: every stage widens the stored
    float16 rows once per pass (read, assign and its probes, search, group), 5 rows per input
    row at the 1M bench.
    """
    if matrix.dtype != np.float16 or matrix.ndim != 2 or matrix.shape[1] == 0:
        return np.ascontiguousarray(matrix, dtype=np.float32)
    return _fp16_decoder(matrix.shape[1]).decode(np.ascontiguousarray(matrix).view(np.uint8))


def unit_float32(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` (rows x d, stored float16) as float32 rows scaled to unit length: their products
    are the rows' cosines up to float32 rounding (``similarity_margin``)."""
    values = as_float32(matrix)
    if values.size == 0:
        return values
    norms = np.sqrt(np.einsum("ij,ij->i", values, values, dtype=np.float64))
    scale = (1.0 / np.where(norms > 0.0, norms, 1.0)).astype(np.float32)[:, None]
    if np.may_share_memory(values, matrix):  # float32 input comes back as itself: never scale it in place
        return values * scale
    values *= scale
    return values


# A float64 cosine this close to 1 is 1: the rounding of the dot product and the norms of two
# identical rows (d <= ~10^4) stays well inside it, so identical rows meet a threshold of 1.0.
_COSINE_ONE = 2.0**-40


def exact_cosine(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise cosine of ``left[i]`` and ``right[i]`` in float64 (the search's exact decision):
    identical rows give exactly 1.0, zero rows 0.0."""
    a = np.asarray(left, dtype=np.float64)
    b = np.asarray(right, dtype=np.float64)
    if a.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", a, a) * np.einsum("ij,ij->i", b, b))
    cosine = np.einsum("ij,ij->i", a, b) / np.where(norms > 0.0, norms, 1.0)
    return np.where(cosine >= 1.0 - _COSINE_ONE, 1.0, cosine)


@functools.cache
def _fp16_decoder(dim: int):
    faiss = import_faiss()

    return faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)


def normalize_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise rows to float16.

    Returns the normalised float16 matrix and an object array with a reject
    reason per row (None for good rows). Rejected rows are zero in the output.
    """
    rows_total, dim = matrix.shape
    out = np.zeros((rows_total, dim), dtype=np.float16)
    squares = np.empty(rows_total, dtype=np.float64)
    good = np.empty(rows_total, dtype=bool)
    # A slab at a time, every step: the float32 and float64 temporaries stay cache-sized, where a
    # whole batch's were 4 and 8x its float16 bytes, in fresh pages each batch (the read stage's
    # normalising took 14 s of CPU at the 1M bench, 6 in the widening alone).
    slab = max(1, _NORMALIZE_VALUES // max(1, dim))
    for start in range(0, rows_total, slab):
        rows = slice(start, start + slab)
        values = as_float32(matrix[rows])
        # A non-finite component makes its row's float64 square sum non-finite, and finite float32
        # components cannot overflow it: one pass finds both the norms and the bad rows.
        slab_squares = np.einsum("ij,ij->i", values, values, dtype=np.float64)
        squares[rows] = slab_squares
        keep = np.isfinite(slab_squares) & (slab_squares > 0.0)
        good[rows] = keep
        # float64 quotients rounded once to float16.
        quotient = values / np.sqrt(np.where(keep, slab_squares, 1.0))[:, None]
        if keep.all():
            out[rows] = quotient
        else:
            out[rows][keep] = quotient[keep]
    finite = np.isfinite(squares)
    reasons = np.full(rows_total, None, dtype=object)
    reasons[~finite] = REJECT_NOT_FINITE
    reasons[finite & ~good] = REJECT_ZERO_NORM
    # A vector whose every component underflows float16 after scaling is unusable (the bits below
    # the sign are zero exactly for +-0: ~8x faster than comparing float16 values).
    underflow = good & ~np.any(out.view(np.uint16) & np.uint16(0x7FFF), axis=1)
    reasons[underflow] = REJECT_ZERO_NORM
    return out, reasons


# Values per normalising slab: 2 MB of float64 quotients (341 rows at d=768).
_NORMALIZE_VALUES = 1 << 18


def sample_hash(row_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform value in [0, 1) per row id: splitmix64 of (row_id, seed), the same in every
    run whatever the partitioning."""
    with np.errstate(over="ignore"):
        z = np.asarray(row_ids).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_mask(row_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded Bernoulli sample: True for each row id whose ``sample_hash`` falls below ``fraction``.
    Nested: the sample at a smaller fraction is a subset of the one at a larger."""
    return sample_hash(row_ids, seed) < fraction


def similarity_margin(dim: int) -> float:
    """Twice the worst-case float32 error of a length-``dim`` dot product of unit vectors (``unit_float32``
    rows: their scaling's own rounding is inside the factor two)."""
    return 2.0 * dim * 2.0**-24 * 1.01 + 1e-7


def train_centroids(sample: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (k x d float32, unit rows) with faiss."""
    faiss = import_faiss()

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


def allocate_centroids(counts: np.ndarray, k: int) -> np.ndarray:
    """Centroids per coarse cell for two-level training: proportional to the cell's sampled rows
    (largest remainder), summing to min(k, rows), never more than a cell's rows, none for an empty cell."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    k = min(int(k), total)
    share = counts * (k / max(1, total))
    allocated = np.minimum(np.floor(share).astype(np.int64), counts)
    remainder = np.where(allocated < counts, share - allocated, -1.0)
    allocated[np.argsort(-remainder, kind="stable")[: k - int(allocated.sum())]] += 1
    return allocated


def merge_close_centroids(centroids: np.ndarray, min_cosine: float, kind: str = "flat",
                          neighbours: int = 8) -> np.ndarray:
    """The centroids without near copies: of every pair with cosine >= ``min_cosine`` among each
    centroid's ``neighbours`` nearest (by a ``kind`` quantizer), the later one is dropped.

    Why: the mass of a large group of copies draws several k-means centroids onto it, and the
    border between them then cuts the group, so its pairs across that border share no bucket
    unless both rows lie within the margin. On the 1M bench rows (K=1,414, m=2; pairs of the
    first 100k rows against exhaustive search) dropping the 1-8 centroids closer than 0.7 x the
    distance of a pair at the threshold (cosine >= 0.975 at 0.95) cut the pairs sharing no bucket
    from 1,706 to 381 and from 465 to 396 for two flat samples, and from 3,282 to 739 for two-level
    training, with the same comparisons.
    """
    count = len(centroids)
    if count < 2:
        return centroids
    index = build_quantizer(centroids, kind, neighbours)
    scores, ids = index.search(np.ascontiguousarray(centroids, dtype=np.float32), min(count, neighbours + 1))
    rows, slots = np.nonzero((scores >= min_cosine) & (ids > np.arange(count)[:, None]))
    keep = np.ones(count, dtype=bool)
    for i, j in zip(rows, ids[rows, slots]):  # rows ascending: a dropped centroid drops nothing
        if keep[i]:
            keep[j] = False
    return centroids[keep]


def build_quantizer(centroids: np.ndarray, kind: str, m: int = 1):
    """A faiss index over the centroids: exact ("flat") or HNSW ("hnsw").

    Flat assignment costs K*d per row; HNSW about log(K)*d*ef, which is what
    makes K in the 10^5-10^6 range affordable. Either way the in-bucket search
    stays exact: the quantizer only decides which buckets a row joins.
    """
    faiss = import_faiss()

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


def assign_buckets(embeddings: np.ndarray, quantizer, m: int, centroids: np.ndarray | None = None,
                   margin: float | None = None, separations: np.ndarray | None = None) -> np.ndarray:
    """The ``m`` nearest centroids (largest inner product) of every row: n x m int64.

    ``quantizer``: a faiss index over the centroids, or the centroid matrix itself.
    ``margin`` (with ``centroids``): the j-th nearest centroid (j >= 2) is kept only
    when the row lies within ``margin`` (Euclidean) of the bisector between it and the
    nearest; a dropped slot repeats the nearest id. A row at distance > margin from
    every such bisector has all its neighbours within margin in its own cell, so
    soft assignment is spent only where a duplicate pair can straddle a border.
    ``separations``: ``centroid_separations(centroids)``, read instead of computing each
    row's two centroids' distance from their coordinates (2 gathers of d values a row).
    """
    if isinstance(quantizer, np.ndarray):
        quantizer = build_quantizer(quantizer, "flat")
    k = quantizer.ntotal
    m = min(m, k)
    if m == k:
        return np.broadcast_to(np.arange(k, dtype=np.int64), (embeddings.shape[0], k)).copy()
    scores, labels = quantizer.search(as_float32(embeddings), m)
    labels = labels.astype(np.int64)
    if margin is None or centroids is None or m == 1:
        return labels
    centroids = np.asarray(centroids, dtype=np.float32)
    square_norms = np.einsum("ij,ij->i", centroids, centroids)
    nearest = centroids[labels[:, 0]] if separations is None else None
    for slot in range(1, m):
        # For a unit row x: |x - c_j|^2 - |x - c_1|^2 = 2 (s_1 - s_j) + |c_j|^2 - |c_1|^2;
        # its distance to the bisector is that over 2 |c_1 - c_j|.
        gap = (2.0 * (scores[:, 0] - scores[:, slot]) + square_norms[labels[:, slot]]
               - square_norms[labels[:, 0]])
        if separations is None:
            separation = np.linalg.norm(nearest - centroids[labels[:, slot]], axis=1)
        else:
            separation = separations[labels[:, 0], labels[:, slot]]
        far = gap > 2.0 * margin * separation
        labels[far, slot] = labels[far, 0]
    return labels


# Largest K whose separation table is built (K^2 float32: 16 MB at 2,048); above it rows are measured.
SEPARATION_TABLE_MAX_K = 2048


def centroid_separations(centroids: np.ndarray) -> np.ndarray | None:
    """K x K float32 Euclidean distances between centroids, for ``assign_buckets``; None above
    SEPARATION_TABLE_MAX_K. From the float64 Gram matrix (one product, ~50 ms at K=950, d=768)."""
    if len(centroids) > SEPARATION_TABLE_MAX_K:
        return None
    wide = np.asarray(centroids, dtype=np.float64)
    square_norms = np.einsum("ij,ij->i", wide, wide)
    squared = square_norms[:, None] + square_norms[None, :] - 2.0 * (wide @ wide.T)
    return np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)


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
    left32 = unit_float32(left)
    same = right is None
    right32 = left32 if same else unit_float32(right)
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
            exact = exact_cosine(left[rows[unsure]], (left if same else right)[cols[unsure]])
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
        exact = exact_cosine(left[rows[band_r]], right[cols[band_c]])
        scores[band_r, band_c] = np.where(exact >= threshold, threshold + 2 * margin, -np.inf)


def owned(buckets: np.ndarray, bucket_id: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Which pairs (a[i], b[i]) this bucket owns: those whose rows share no smaller bucket id.

    ``buckets``: every point's bucket ids (n x w). A pair that meets in several
    buckets (soft assignment, several rounds) is found by each of them but
    counted and emitted only by the smallest, so counts need no global
    de-duplication. Evaluated on found pairs only (w^2 compares each), never
    on the whole similarity block.
    """
    left, right = buckets[a], buckets[b]
    shared = np.zeros(len(a), dtype=bool)
    for slot in range(left.shape[1]):
        candidate = left[:, slot]
        lower = candidate < bucket_id
        if lower.any():
            shared |= lower & (right == candidate[:, None]).any(axis=1)
    return ~shared


def _owned_mask(buckets: np.ndarray, bucket_id: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``owned`` for a whole block: False where the row and column share a smaller bucket."""
    row_buckets, col_buckets = buckets[rows], buckets[cols]
    mask = np.ones((rows.size, cols.size), dtype=bool)
    lower_values = np.intersect1d(row_buckets[row_buckets < bucket_id], col_buckets[col_buckets < bucket_id])
    for value in lower_values:
        mask &= ~((row_buckets == value).any(axis=1)[:, None] & (col_buckets == value).any(axis=1)[None, :])
    return mask


def _lower_sharing(buckets: np.ndarray, bucket_id: int, rows: np.ndarray, cols: np.ndarray) -> str:
    """How a block's pairs share buckets smaller than this one: "none" (all owned here),
    "all" (every row and column is in one common smaller bucket: none owned here) or "some"."""
    row_lower = np.where(buckets[rows] < bucket_id, buckets[rows], -1)
    col_lower = np.where(buckets[cols] < bucket_id, buckets[cols], -1)
    if not (row_lower >= 0).any() or not (col_lower >= 0).any():
        return "none"
    for candidate in np.unique(row_lower[0][row_lower[0] >= 0]):
        if (row_lower == candidate).any(axis=1).all() and (col_lower == candidate).any(axis=1).all():
            return "all"
    return "some"


_DENSE_HITS = 1 << 16
_DENSE_STRIDE = 16


def _scale_counts(counts: np.ndarray, total: int) -> np.ndarray:
    """``counts`` scaled to sum exactly to ``total`` (largest remainders round up)."""
    if counts.sum() == 0:
        return np.zeros_like(counts)
    scaled = counts * (total / counts.sum())
    floor = np.floor(scaled).astype(np.int64)
    short = total - int(floor.sum())
    floor[np.argsort(floor - scaled)[:short]] += 1
    return floor


def _bin_counts(values: np.ndarray, threshold: float, bin_width: float, bins: int) -> np.ndarray:
    index = ((values - np.float32(threshold)) * np.float32(1.0 / bin_width)).astype(np.int32)
    return np.bincount(np.clip(index, 0, bins - 1), minlength=bins)


@dataclass
class GraphSearchResult:
    """What one search task found, in local node indices."""

    # One spanning forest per threshold: (a, b, exact similarity) edges.
    forests: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    # Owned pairs >= each threshold (each pair counted by one bucket only), among the similarities
    # computed: every pair unless ``attached`` > 0, then a lower bound.
    pair_counts: np.ndarray
    # Owned pairs >= thresholds[0] per similarity bin (``histogram_bins`` equal bins over [thresholds[0], 1]),
    # among the similarities computed. Exact, except in blocks with over 65,536 pairs (giant groups), whose
    # shape is binned from every 16th row and scaled to the block's exact count.
    histogram: np.ndarray
    # Every owned pair >= thresholds[0] as (a, b, similarity), when asked for.
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    # Similarities computed (cells of the products, the path's probe included).
    comparisons: int = 0
    # What comparing every pair the task answers for costs: n(n-1)/2, or |left| x |right|.
    all_pairs: int = 0
    # Rows attached to a representative (``cover``): their pairs inside a group were not computed, so
    # pair_counts and histogram count the pairs among the comparisons made (lower bounds) when > 0.
    attached: int = 0


def histogram_edges(threshold: float, bins: int) -> np.ndarray:
    """Bin edges of the similarity histogram: ``bins`` equal bins from the threshold to 1."""
    return np.linspace(threshold, 1.0, bins + 1)


@dataclass
class _Found:
    """One ``graph_search``: its fixed inputs, and what it accumulates over its blocks."""

    points: np.ndarray
    thresholds: list[float]
    margin: float
    buckets: np.ndarray | None
    bucket_id: int
    forests: list[SpanningForest]
    chosen: list[list[tuple[np.ndarray, np.ndarray]]]
    pair_counts: np.ndarray
    histogram: np.ndarray
    bin_width: float
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    emit_pairs: bool

    def link(self, level: int, a: np.ndarray, b: np.ndarray, similarity: np.ndarray) -> None:
        picked = self.forests[level].add(a, b, similarity)
        self.chosen[level].append((a[picked], b[picked]))


def graph_search(
    points: np.ndarray,
    left: np.ndarray,
    right: np.ndarray | None,
    thresholds: list[float] | np.ndarray,
    block_rows: int = 1024,
    memory_bytes: int = 256 << 20,
    buckets: np.ndarray | None = None,
    bucket_id: int = 0,
    emit_pairs: bool = False,
    histogram_bins: int = 100,
    representatives: bool = True,
) -> GraphSearchResult:
    """Spanning forests of the >= threshold graphs, for several thresholds, from one set of matrix products.

    ``points``: unit rows (float16). ``left``/``right``: node indices into
    ``points``; ``right is None`` searches pairs inside ``left``, otherwise pairs
    across the two. ``thresholds``: ascending; the first is the search
    threshold. ``buckets``/``bucket_id``: every point's bucket ids and this
    task's bucket, for the ownership rule of ``owned`` (None: all owned).

    Guarantee per threshold: the components of the returned forest equal those
    of all pairs >= that threshold (closure identical to an exhaustive search),
    and the forest has fewer edges than points. Each block of query rows is
    scored by float32 matrix products against the columns it can pair with
    (inside one set: a syrk against itself and a gemm against the rows after
    it, so the products cover half the square, as the cost model counts). A
    product is then handled one of two ways, by how many of its cells reach
    the lowest threshold:

    - sparse (the usual case): the candidate cells are listed once, settled in
      float64 near the thresholds, and their edges fed to a union-find, so
      everything after the product costs two passes over the block plus work
      proportional to the pairs found;
    - dense (over 1/8 of the cells: a giant group): no pair is listed; rows and
      columns repeatedly link to their best neighbour outside their component
      (Boruvka rounds, components touched at least halve each round), so memory
      stays O(block x columns) and a 100,000-copy group costs its products.

    Each threshold's decisions are exact, so a threshold's forest closes
    exactly like a search at that threshold alone.

    ``representatives`` (one threshold, no pairs emitted, a task whose
    sampled pairs show a dense part): the task is searched by
    ``cover.search`` instead, whose cost on a group of near-copies grows with
    its size; the forest closes the same, and pair counts and the histogram
    then count the pairs among the comparisons made (``attached`` > 0).
    """
    thresholds = [float(t) for t in thresholds]
    margin = similarity_margin(points.shape[1])
    found = _Found(points, thresholds, margin, buckets, bucket_id,
                   [SpanningForest(points.shape[0]) for _ in thresholds], [[] for _ in thresholds],
                   np.zeros(len(thresholds), dtype=np.int64), np.zeros(histogram_bins, dtype=np.int64),
                   (1.0 - thresholds[0]) / histogram_bins if thresholds[0] < 1.0 else 1.0, [], emit_pairs)
    all_pairs = len(left) * (len(left) - 1) // 2 if right is None else len(left) * len(right)
    probed = 0
    if representatives and len(thresholds) == 1 and not emit_pairs:
        from dedup_spark import cover  # it builds on this module

        nodes = left if right is None else np.concatenate([left, right])
        dense, probed = cover.probe_dense(points, nodes, thresholds[0], margin)
        if dense:
            comparisons, attached = cover.search(found, left, right, block_rows, memory_bytes)
            return _result(found, probed + comparisons, all_pairs, attached)
    _plain_search(found, left, right, block_rows, memory_bytes)
    return _result(found, probed + all_pairs, all_pairs, 0)


def _plain_search(found: _Found, left: np.ndarray, right: np.ndarray | None, block_rows: int,
                  memory_bytes: int) -> None:
    """Every pair the task answers for, by blocks of matrix products (``graph_search``)."""
    points, thresholds, margin, buckets, bucket_id = (found.points, found.thresholds, found.margin, found.buckets,
                                                      found.bucket_id)
    same = right is None
    columns_all = left if same else right
    # Gathered once: each block is then a slice, not a copy of its columns.
    left32 = unit_float32(points[left])
    right32 = left32 if same else unit_float32(points[right])
    lowest = np.float32(thresholds[0] - margin)
    # Bytes per similarity cell while a block is live: scores and masks, and where every cell is a
    # hit (a giant group) the found pairs' indices, values and bins; 8 more per extra threshold's copy.
    per_cell = 48 + 8 * (len(thresholds) - 1)
    step = int(max(16, min(block_rows, memory_bytes // max(1, per_cell * len(columns_all)))))
    # Blocks of equal size: a short last block (1,280 rows at 1,024 a block leave 256) multiplies
    # far below the BLAS peak, and buckets sit near the mean size, so most tasks would pay for one.
    blocks = max(1, -(-len(left) // step))  # ceil: the fewest blocks of at most step rows
    step = max(1, -(-len(left) // blocks))
    for start in range(0, len(left), step):
        stop = min(start + step, len(left))
        rows = left[start:stop]
        sharing = "none" if buckets is None else _lower_sharing(buckets, bucket_id, rows, columns_all[start if same else 0:])
        if same:
            # The block against itself is a syrk (numpy's a @ a.T computes one triangle), and against
            # the rows after it a gemm: together exactly the pairs (i, j > i), no product wasted.
            block = left32[start:stop]
            products = [(block @ block.T, left[start:stop], True)]
            if stop < len(left):
                products.append((block @ left32[stop:].T, left[stop:], False))
        else:
            products = [(left32[start:stop] @ right32.T, right, False)]
        for raw, cols, diagonal in products:
            candidate = raw >= lowest
            if np.count_nonzero(candidate) * 8 <= candidate.size:
                _sparse_block(found, raw, candidate, rows, cols, diagonal, sharing)
            else:
                _dense_block(found, raw, rows, cols, diagonal, sharing)


def _result(found: _Found, comparisons: int, all_pairs: int, attached: int) -> GraphSearchResult:
    """The search's forests with each chosen edge's exact similarity, and its counters."""
    points = found.points
    result = []
    for picked in found.chosen:
        if not picked:
            empty = np.zeros(0, dtype=np.int64)
            result.append((empty, empty, np.zeros(0, dtype=np.float32)))
            continue
        a = np.concatenate([p[0] for p in picked])
        b = np.concatenate([p[1] for p in picked])
        similarity = exact_cosine(points[a], points[b])
        result.append((a, b, similarity.astype(np.float32)))
    return GraphSearchResult(result, found.pair_counts, found.histogram, found.pairs, comparisons, all_pairs, attached)


def _sparse_block(found: _Found, raw: np.ndarray, candidate: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                  diagonal: bool, sharing: str) -> None:
    """One block whose candidate cells are few: list them, settle them exactly, link them."""
    points, thresholds, margin = found.points, found.thresholds, found.margin
    r, c = np.divmod(np.flatnonzero(candidate), raw.shape[1])
    if diagonal:  # the rows against themselves: each pair once, j after i
        upper = c > r
        r, c = r[upper], c[upper]
    if not r.size:
        return
    similarity = raw[r, c].astype(np.float64)
    node_a, node_b = rows[r], cols[c]
    unsure = np.zeros(r.size, dtype=bool)
    for threshold in thresholds:
        unsure |= (similarity >= threshold - margin) & (similarity < threshold + margin)
    if unsure.any():
        similarity[unsure] = exact_cosine(points[node_a[unsure]], points[node_b[unsure]])
    hit = similarity >= thresholds[0]
    similarity, node_a, node_b = similarity[hit], node_a[hit], node_b[hit]
    if sharing == "none":
        mine = np.ones(node_a.size, dtype=bool)
    elif sharing == "all":
        mine = np.zeros(node_a.size, dtype=bool)
    else:
        mine = owned(found.buckets, found.bucket_id, node_a, node_b)
    for level, threshold in enumerate(thresholds):
        level_hit = similarity >= threshold
        found.pair_counts[level] += int(np.count_nonzero(level_hit & mine))
        if level == 0:
            found.histogram += _bin_counts(similarity[mine], threshold, found.bin_width, len(found.histogram))
            if found.emit_pairs:
                found.pairs.append((node_a[mine], node_b[mine], similarity[mine].astype(np.float32)))
        found.link(level, node_a[level_hit], node_b[level_hit], similarity[level_hit])


def _dense_block(found: _Found, raw: np.ndarray, rows: np.ndarray, cols: np.ndarray, diagonal: bool,
                 sharing: str) -> None:
    """One block where most cells are pairs (a giant group): count and link without listing pairs."""
    points, thresholds, margin = found.points, found.thresholds, found.margin
    if diagonal:  # the rows against themselves: each pair once, j after i
        raw[np.tril(np.ones(raw.shape, dtype=bool))] = -np.inf
    histogram_bins = len(found.histogram)
    own_mask = kept_r = kept_c = None
    for level, threshold in enumerate(thresholds):
        scores = raw if level == len(thresholds) - 1 else raw.copy()
        _exact_band(scores, points, points, rows, cols, threshold, margin)
        hits = scores >= threshold
        if sharing == "all":
            pass  # every pair of the block meets in a smaller bucket, which counts it
        elif level > 0:
            # A pair >= a higher threshold is also >= the first: count among the owned ones.
            if kept_r is not None:
                found.pair_counts[level] += int(np.count_nonzero(hits[kept_r, kept_c]))
            else:
                found.pair_counts[level] += int(np.count_nonzero(hits if own_mask is None else hits & own_mask))
        else:
            if sharing == "some":
                # One mask per shared smaller bucket beats per-pair checks on this many pairs.
                own_mask = _owned_mask(found.buckets, found.bucket_id, rows, cols)
            counted = hits if own_mask is None else hits & own_mask
            if found.emit_pairs:
                kept_r, kept_c = np.nonzero(counted)
                found.pair_counts[0] += kept_r.size
                if kept_r.size:
                    values = scores[kept_r, kept_c].astype(np.float64)
                    found.histogram += _bin_counts(values, threshold, found.bin_width, histogram_bins)
                    # Scores settled in float64 were set to threshold + 2 margin: give them their exact value.
                    settled = values == np.float32(threshold + 2 * margin)
                    if settled.any():
                        values[settled] = exact_cosine(points[rows[kept_r[settled]]], points[cols[kept_c[settled]]])
                    found.pairs.append((rows[kept_r], cols[kept_c], values.astype(np.float32)))
            else:
                # No pair indices materialised: a giant group's blocks are all hits.
                count = int(np.count_nonzero(counted))
                found.pair_counts[0] += count
                if count > _DENSE_HITS:
                    # Binning every hit would cost more than the matrix product: bin every
                    # _DENSE_STRIDE-th row and scale to the exact total.
                    sampled = _bin_counts(scores[::_DENSE_STRIDE][counted[::_DENSE_STRIDE]], threshold,
                                          found.bin_width, histogram_bins)
                    found.histogram += _scale_counts(sampled, count)
                elif count:
                    found.histogram += _bin_counts(scores[counted], threshold, found.bin_width, histogram_bins)
        _link_block(found.forests[level], found.chosen[level], scores, hits, rows, cols, threshold)


def _link_block(forest: SpanningForest, chosen: list[tuple[np.ndarray, np.ndarray]], scores: np.ndarray,
                hits: np.ndarray, rows: np.ndarray, cols: np.ndarray, threshold: float) -> None:
    """Boruvka rounds over one block: link rows and columns to their best neighbour outside their component."""
    while True:
        # Byte masks first: most rows of a formed group have no neighbour outside it.
        labels = forest.labels()
        cross = hits & (labels[cols][None, :] != labels[rows][:, None])
        if not cross.any():
            return
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
        chosen.append((a[picked], b[picked]))


def spanning_edges(
    points: np.ndarray,
    left: np.ndarray,
    right: np.ndarray | None,
    threshold: float,
    block_rows: int = 1024,
    memory_bytes: int = 256 << 20,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A spanning forest of the >= threshold graph (``graph_search`` at one threshold)."""
    return graph_search(points, left, right, [threshold], block_rows, memory_bytes, histogram_bins=1).forests[0]


def lsh_buckets(embeddings: np.ndarray, center: np.ndarray, planes: np.ndarray, m: int) -> np.ndarray:
    """Random-hyperplane LSH codes of every row, with multi-probe: n x m int64.

    ``planes``: bits x d hyperplane normals; rows are centred first (web
    embeddings share a large common direction, which would put most rows on one
    side of every plane). Column 0 is the row's own code; column j > 0 flips the
    j-th least certain bit (smallest |projection|), the bucket a near neighbour
    most likely fell into instead.
    """
    projections = (as_float32(embeddings) - center) @ planes.T
    bits = planes.shape[0]
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    codes = (projections > 0).astype(np.int64) @ weights
    m = min(m, bits + 1)
    out = np.empty((len(codes), m), dtype=np.int64)
    out[:, 0] = codes
    if m > 1:
        uncertain = np.argsort(np.abs(projections), axis=1)[:, : m - 1]
        out[:, 1:] = codes[:, None] ^ weights[uncertain]
    return out


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (smallest member) of each of ``n`` nodes."""
    forest = SpanningForest(n)
    forest.add(np.asarray(a, np.int64), np.asarray(b, np.int64))
    return forest.labels()

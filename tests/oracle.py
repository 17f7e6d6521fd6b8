"""Independent oracles: brute-force pair search and a plain union-find.

Nothing here imports dedup_spark's kernels; the only shared definition is the
data contract itself (rows are L2-normalised in float64 and stored as float16,
and a pair is a duplicate when the float64 cosine of the stored values is >= the
threshold, a cosine within float64 rounding of 1 counting as 1).
"""

from __future__ import annotations

import numpy as np


def normalize(raw: np.ndarray) -> np.ndarray:
    values = raw.astype(np.float32)
    norms = np.sqrt((values.astype(np.float64) ** 2).sum(axis=1))
    return (values / norms[:, None]).astype(np.float16)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise float64 cosine of stored rows; identical rows are exactly 1."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    values = (a64 * b64).sum(axis=1) / np.sqrt((a64 * a64).sum(axis=1) * (b64 * b64).sum(axis=1))
    return np.where(values > 1.0 - 1e-12, 1.0, values)


def brute_force_pairs(embeddings: np.ndarray, threshold: float, row_ids: np.ndarray | None = None) -> dict:
    """{(row_id_a, row_id_b): similarity} for every pair with exact similarity >= threshold."""
    stored = np.asarray(embeddings, dtype=np.float16)
    as32 = stored.astype(np.float32)
    ids = np.arange(len(stored)) if row_ids is None else np.asarray(row_ids)
    pairs = {}
    for start in range(0, len(stored), 2048):
        # Stored lengths are within ~1e-3 of 1: a wide float32 prefilter, then the exact cosine.
        scores = as32[start:start + 2048] @ as32.T
        rows, cols = np.nonzero(scores >= threshold - 5e-3)
        rows = rows + start
        upper = cols > rows
        rows, cols = rows[upper], cols[upper]
        exact = cosine(stored[rows], stored[cols])
        for i, j, s in zip(rows[exact >= threshold], cols[exact >= threshold], exact[exact >= threshold]):
            a, b = sorted((int(ids[i]), int(ids[j])))
            pairs[(a, b)] = float(s)
    return pairs


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def groups_of(pairs) -> dict[int, int]:
    """{row_id: smallest row_id of its component} for every row in some pair."""
    forest = UnionFind()
    for a, b in pairs:
        forest.union(a, b)
    members = {x for pair in pairs for x in pair}
    roots = {x: forest.find(x) for x in members}
    smallest: dict[int, int] = {}
    for x, root in roots.items():
        smallest[root] = min(smallest.get(root, x), x)
    return {x: smallest[root] for x, root in roots.items()}


def exact_jaccard(a: str | None, b: str | None, kind: str = "chars", size: int = 4) -> float | None:
    """Exact Jaccard similarity of two captions' shingle sets (None if either has none)."""
    from dedup_spark import minhash

    left, right = set(minhash.shingles(a, kind, size)), set(minhash.shingles(b, kind, size))
    if not left or not right:
        return None
    return len(left & right) / len(left | right)


def closure_labels(embeddings: np.ndarray, threshold: float, extra_edges: tuple | None = None) -> np.ndarray:
    """The smallest row index of every row's component under all pairs with exact similarity >=
    threshold (rows in no pair are their own), without listing the pairs at once: each block of rows
    is compared with every row in float64, cells near the threshold are settled by ``cosine``, and
    the block's components (scipy's connected components) are kept as stars, so a group of g
    copies costs g^2 products but O(g) memory. ``extra_edges``: (a, b) index arrays also joined."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    stored = np.asarray(embeddings, dtype=np.float16)
    wide = stored.astype(np.float64)
    wide /= np.sqrt((wide * wide).sum(axis=1))[:, None]
    n = len(stored)
    stars_a, stars_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if extra_edges is not None:
        stars_a.append(np.asarray(extra_edges[0], np.int64))
        stars_b.append(np.asarray(extra_edges[1], np.int64))
    for start in range(0, n, 512):
        scores = wide[start:start + 512] @ wide.T
        rows, cols = np.nonzero(scores >= threshold - 1e-9)
        rows = rows + start
        keep = cols > rows
        rows, cols = rows[keep], cols[keep]
        band = scores[rows - start, cols] < threshold + 1e-9
        exact = np.ones(rows.size, dtype=bool)
        exact[band] = cosine(stored[rows[band]], stored[cols[band]]) >= threshold
        rows, cols = rows[exact], cols[exact]
        if not rows.size:
            continue
        graph = coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
        touched = np.unique(np.concatenate([rows, cols]))
        _, first, inverse = np.unique(labels[touched], return_index=True, return_inverse=True)
        stars_a.append(touched)
        stars_b.append(touched[first][inverse.ravel()])
    return smallest_member(n, np.concatenate(stars_a), np.concatenate(stars_b))


def smallest_member(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest node of each of ``n`` nodes' component under the edges (a, b) (scipy)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a)), (np.asarray(a, np.int64), np.asarray(b, np.int64))), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n))
    return smallest[labels]

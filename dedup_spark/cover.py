"""Search by representatives: a dense group of near-copies at the cost of its size, not its square.

``kernels.graph_search`` compares every pair of a task's rows. Inside a group of g near-copies that
costs g^2 / 2 comparisons to find pairs whose only use is to join the group. Here rows are compared
with representatives instead, and pairs are computed only where the triangle inequality on angles
cannot rule them out:

1. Cover. Blocks of rows are multiplied with the representatives that have attached rows, and the
   rows none of those takes with the other representatives. A row whose cosine with some
   representative reaches the threshold is attached to the most similar one (a real pair, linked in
   the forest). The rows left are compared with each other; an independent set of them (highest
   degree first) becomes new representatives, and the others attach to one of those. Every pair a
   block computes that reaches the threshold is linked, so representatives that share a row join
   one component.
2. Late representatives. Each cluster's attached rows are compared with the representatives they
   did not meet in the cover (later ones, and the ones without attached rows) that they can reach.
3. Rims. Two clusters still in different components can hold a pair only between rows near each
   other's representative: the attached rows of the two are multiplied only where every bound allows.

Bounds: with a and b representatives, x attached to a, y attached to b, the angle on the sphere is a
metric, so angle(x, y) >= angle(a, b) - angle(x, a) - angle(y, b), and angle(x, y) >= angle(x, b) -
angle(y, b). Angles come from float32 cosines widened by the float32 rounding bound (a lower bound of
a gap, an upper bound of a radius) plus ``ANGLE_SLACK``, so a pair whose exact cosine is the threshold
is never pruned. Decisions are the contract's exact cosine (``kernels.exact_cosine`` near the
threshold), so each task's forest closes exactly like an exhaustive search of it.

Cost: rows x representatives, plus the rims. A group of copies that vary in few directions is covered
by a number of representatives that does not grow with its size. Copies that each move in a
direction of their own (a halo of rows below the threshold to the source and to each other) are
each their own representative and cost their pairs, as in any exact search.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from dedup_spark import kernels

# Rows of a task whose pairs are sampled to choose the path (evenly spaced: a task's rows arrive in
# row-id order, which says nothing about groups).
PROBE_ROWS = 512
# Smallest task searched by representatives: below it the plain product is short anyway.
MIN_ROWS = 2048
# Share of the probe's pairs at or above the threshold from which the task has a dense part (a
# group holding over ~1/6 of the task's rows): below it every row would be its own representative.
DENSE_PAIRS = 1 / 32
# Radians added to every angle bound: float64 rounding of arccos and sums, and the contract's
# cosine within 2^-40 of 1 counted as 1 (an angle of up to ~1.5e-6).
ANGLE_SLACK = 1e-5
# Bytes per similarity cell while a product is live: the float32 scores, masks, listed hits.
_CELL_BYTES = 48


@dataclass
class _Cover:
    """A task's rows by position: representatives at [0, leaders), then attached rows, then rows not
    yet searched. Representatives never move after they are placed, so a position is their id."""

    rows32: np.ndarray  # unit float32 rows
    nodes: np.ndarray  # node index (into points) of each position
    owner: np.ndarray  # position of the row's representative (a representative's own)
    radius: np.ndarray  # upper bound of the angle to the owner, radians
    seen: np.ndarray  # the row was compared with every representative in [0, seen)
    leaders: int = 0


@dataclass
class _Search:
    """One representative search: the inputs, the cover, and the counters."""

    found: kernels._Found
    cover: _Cover
    side: np.ndarray | None  # per node: True for the right set of a block-pair task
    threshold: float
    theta: float  # arccos(threshold) + ANGLE_SLACK: no pair at the threshold lies farther apart
    margin: float
    memory_bytes: int
    followers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # per position
    comparisons: int = 0
    leader_forest: kernels.SpanningForest | None = None
    clusters: tuple = field(default_factory=tuple)


def probe_dense(points: np.ndarray, nodes: np.ndarray, threshold: float, margin: float) -> tuple[bool, int]:
    """Whether a task has a dense part worth searching by representatives, and the comparisons the
    probe made: the share of pairs reaching the threshold (within rounding) among evenly spaced rows."""
    if len(nodes) < MIN_ROWS:
        return False, 0
    sample = kernels.unit_float32(points[nodes[np.linspace(0, len(nodes) - 1, PROBE_ROWS).astype(np.int64)]])
    scores = sample @ sample.T
    pairs = PROBE_ROWS * (PROBE_ROWS - 1) // 2
    hits = (np.count_nonzero(scores >= np.float32(threshold - margin)) - PROBE_ROWS) // 2
    return hits >= DENSE_PAIRS * pairs, pairs


def search(found: kernels._Found, left: np.ndarray, right: np.ndarray | None, block_rows: int,
           memory_bytes: int) -> tuple[int, int]:
    """Link ``found``'s forest at its single threshold over ``left`` (and ``right``: a block-pair task,
    searched as one set, its pairs counted only across the sides), counting owned pairs among the
    comparisons made. Returns (comparisons made, rows attached to a representative)."""
    nodes = left if right is None else np.concatenate([left, right])
    side = None
    if right is not None:
        side = np.zeros(found.points.shape[0], dtype=bool)
        side[right] = True
    n = len(nodes)
    cover = _Cover(kernels.unit_float32(found.points[nodes]), nodes.copy(), np.arange(n), np.zeros(n),
                   np.zeros(n, dtype=np.int64))
    threshold = found.thresholds[0]
    state = _Search(found, cover, side, threshold, math.acos(min(1.0, max(-1.0, threshold))) + ANGLE_SLACK,
                    found.margin, memory_bytes, np.zeros(n, dtype=np.int64))
    start = 0
    while start < n:
        # Block height: the products against the representatives stay within the memory bound.
        step = int(max(16, min(block_rows, memory_bytes // (_CELL_BYTES * max(1, cover.leaders, block_rows)))))
        stop = min(n, start + step)
        _cover_block(state, start, stop)
        start = stop
    _seed_leader_forest(state)
    _late_leaders(state)
    _rims(state)
    return state.comparisons, n - cover.leaders


def _hits(state: _Search, raw: np.ndarray, rows: np.ndarray, cols: np.ndarray,
          upper: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells of a product whose exact cosine reaches the threshold: (row, column, similarity), the
    similarity settled in float64 within the rounding bound. ``rows``/``cols``: their nodes."""
    threshold, margin = state.threshold, state.margin
    r, c = np.nonzero(raw >= np.float32(threshold - margin))
    if upper:
        keep = c > r
        r, c = r[keep], c[keep]
    similarity = raw[r, c].astype(np.float64)
    unsure = similarity < threshold + margin
    if unsure.any():
        points = state.found.points
        similarity[unsure] = kernels.exact_cosine(points[rows[r[unsure]]], points[cols[c[unsure]]])
    keep = similarity >= threshold
    return r[keep], c[keep], similarity[keep]


def _account(state: _Search, a: np.ndarray, b: np.ndarray, similarity: np.ndarray) -> None:
    """Count the owned pairs among found pairs (nodes a, b) and link all of them in the forest."""
    if not a.size:
        return
    found = state.found
    mine = np.ones(a.size, dtype=bool) if found.buckets is None else kernels.owned(found.buckets, found.bucket_id, a, b)
    if state.side is not None:  # a block-pair task answers for the pairs across its sides only
        mine &= state.side[a] != state.side[b]
    found.pair_counts[0] += int(np.count_nonzero(mine))
    found.histogram += kernels._bin_counts(similarity[mine], state.threshold, found.bin_width, len(found.histogram))
    found.link(0, a, b, similarity)


def _radius(similarity: np.ndarray, margin: float) -> np.ndarray:
    """An upper bound of the angle between rows whose computed cosine is ``similarity``."""
    return np.arccos(np.clip(np.asarray(similarity, dtype=np.float64) - margin, -1.0, 1.0))


def _gap(similarity: np.ndarray, margin: float) -> np.ndarray:
    """A lower bound of the angle between rows whose computed cosine is ``similarity``."""
    return np.arccos(np.clip(np.asarray(similarity, dtype=np.float64) + margin, -1.0, 1.0))


def _best(r: np.ndarray, c: np.ndarray, similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct r, the (r, c, similarity) of its most similar c."""
    order = np.lexsort((-similarity, r))
    first = order[np.r_[True, r[order][1:] != r[order][:-1]]] if order.size else order
    return r[first], c[first], similarity[first]


def _cover_block(state: _Search, start: int, stop: int) -> None:
    """Search positions [start, stop): attach rows to representatives, make new ones of the rest.

    Rows meet the representatives that already have attached rows first (a dense group's), and only
    the rows none of those takes meet the others (in a task that also holds sparse rows, one per
    row): a row attached here meets the others later, and only those its cluster can reach."""
    cover = state.cover
    leaders, size = cover.leaders, stop - start
    block, nodes = cover.rows32[start:stop], cover.nodes[start:stop]
    owner = np.full(size, -1, dtype=np.int64)
    best = np.ones(size)
    cover.seen[start:stop] = 0
    hot = np.flatnonzero(state.followers[:leaders] > 0)
    # Few hot ones among many: the rest are met as the contiguous slice of all (no gather; the hot
    # ones again, which those rows did not reach).
    cold = np.arange(leaders) if hot.size * 8 < leaders else np.flatnonzero(state.followers[:leaders] == 0)
    for targets, rows in ((hot, np.arange(size)), (cold, None)):
        if rows is None:  # the rows no hot representative took meet every representative
            rows = np.flatnonzero(owner < 0)
            cover.seen[start + rows] = leaders
        if not targets.size or not rows.size:
            continue
        columns = cover.rows32[:leaders] if targets.size == leaders else cover.rows32[targets]
        raw = (block if rows.size == size else block[rows]) @ columns.T
        state.comparisons += raw.size
        r, c, similarity = _hits(state, raw, nodes[rows], cover.nodes[targets])
        _account(state, nodes[rows[r]], cover.nodes[targets[c]], similarity)
        r, c, similarity = _best(r, c, similarity)
        owner[rows[r]], best[rows[r]] = targets[c], similarity
    free = np.flatnonzero(owner < 0)
    placed = new = np.zeros(0, dtype=np.int64)
    if free.size:
        new, u, v, s = _new_leaders(state, block, nodes, free)
        cover.seen[start + free] = leaders + new.size
        placed = _placement(leaders, start + free[new])
        slot = np.full(free.size, -1, dtype=np.int64)
        slot[new] = placed
        owner[free[u]], best[free[u]] = slot[v], s
        owner[free[new]] = placed
    cover.owner[start:stop] = owner
    cover.radius[start:stop] = _radius(best, state.margin)
    cover.radius[start + free[new]] = 0.0
    np.add.at(state.followers, owner, 1)
    state.followers[placed] -= 1  # a representative is not its own follower
    _move(cover, start + free[new], placed)
    cover.leaders += new.size


def _new_leaders(state: _Search, block: np.ndarray, nodes: np.ndarray,
                 free: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The free rows of a block against each other: an independent set of them becomes new
    representatives (indices into ``free``), and each other free row (u) attaches to its most
    similar new one (v, similarity s); every pair found is linked."""
    sub = block[free]
    raw = sub @ sub.T
    state.comparisons += free.size * (free.size - 1) // 2
    r, c, similarity = _hits(state, raw, nodes[free], nodes[free], upper=True)
    _account(state, nodes[free[r]], nodes[free[c]], similarity)
    adjacency = np.zeros((free.size, free.size), dtype=bool)
    adjacency[r, c] = adjacency[c, r] = True
    new = _independent_set(adjacency)
    is_new = np.zeros(free.size, dtype=bool)
    is_new[new] = True
    # Every other free row has a new representative among its hits (the set is maximal).
    u, v, s = np.concatenate([r, c]), np.concatenate([c, r]), np.concatenate([similarity, similarity])
    pick = is_new[v] & ~is_new[u]
    u, v, s = _best(u[pick], v[pick], s[pick])
    return new, u, v, s


def _placement(leaders: int, sources: np.ndarray) -> np.ndarray:
    """Where each new representative at ``sources`` (ascending) goes: into [leaders, leaders + k),
    staying put if already there; the attached rows it displaces take the vacated positions."""
    targets = np.arange(leaders, leaders + sources.size)
    placed = sources.copy()
    moving = ~np.isin(sources, targets)
    placed[moving] = targets[~np.isin(targets, sources)]
    return placed


def _move(cover: _Cover, sources: np.ndarray, targets: np.ndarray) -> None:
    """Swap the rows at ``sources`` and ``targets`` (and everything known of them)."""
    moving = sources != targets
    a, b = sources[moving], targets[moving]
    for values in (cover.rows32, cover.nodes, cover.owner, cover.radius, cover.seen):
        values[a], values[b] = values[b].copy(), values[a].copy()


def _independent_set(adjacency: np.ndarray) -> np.ndarray:
    """A maximal independent set of the graph, highest degree first (central rows represent the
    most), ties by a fixed pseudo-random order so each round takes many at once. Ascending."""
    n = len(adjacency)
    priority = adjacency.sum(axis=1).astype(np.int64) * n + np.random.default_rng(0).permutation(n)
    open_rows = np.ones(n, dtype=bool)
    chosen = np.zeros(n, dtype=bool)
    while open_rows.any():
        index = np.flatnonzero(open_rows)
        local = adjacency[np.ix_(index, index)]
        rival = np.where(local, priority[index][None, :], -1).max(axis=1)
        winners = index[priority[index] > rival]
        chosen[winners] = True
        open_rows &= ~adjacency[winners].any(axis=0)
        open_rows[winners] = False
    return np.flatnonzero(chosen)


def _seed_leader_forest(state: _Search) -> None:
    """A union-find over the representatives holding the components the cover found, and each
    cluster's attached rows by position (grouped by representative, farthest from it first)."""
    cover = state.cover
    leaders = cover.leaders
    labels = state.found.forests[0].labels()[cover.nodes[:leaders]]
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    forest = kernels.SpanningForest(leaders)
    forest.add(np.arange(leaders, dtype=np.int64), first[inverse.ravel()].astype(np.int64))
    state.leader_forest = forest
    attached = np.arange(leaders, len(cover.nodes))
    attached = attached[np.lexsort((-cover.radius[attached], cover.owner[attached]))]
    counts = np.bincount(cover.owner[attached], minlength=leaders)
    ends = np.cumsum(counts)
    reach = np.zeros(leaders)
    np.maximum.at(reach, cover.owner[attached], cover.radius[attached])
    state.clusters = (attached, ends - counts, ends, reach)


def _near(state: _Search, clusters: np.ndarray,
          candidates: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For chunks of ``clusters``: which ``candidates`` representatives may hold a pair with them
    (angle(a, b) <= theta + reach(a) + reach(b)), as a boolean chunk x candidates matrix, and the
    lower bounds of those angles."""
    cover, reach = state.cover, state.clusters[3]
    if not clusters.size or not candidates.size:
        return
    step = max(1, min(len(clusters), state.memory_bytes // (_CELL_BYTES * len(candidates))))
    others = cover.rows32[candidates]
    for begin in range(0, len(clusters), step):
        chunk = clusters[begin:begin + step]
        gram = cover.rows32[chunk] @ others.T
        state.comparisons += gram.size
        gap = _gap(gram, state.margin)
        near = gap <= state.theta + reach[chunk][:, None] + reach[candidates][None, :]
        near &= chunk[:, None] != candidates[None, :]
        yield chunk, near, gap


def _late_leaders(state: _Search) -> None:
    """Compare each cluster's attached rows with the representatives they can reach that lie in
    another component and that the cover did not compare them with: x attached to a can reach b only
    if angle(x, a) >= angle(a, b) - theta, so rows near their own representative meet fewer."""
    cover, forest = state.cover, state.leader_forest
    attached, starts, ends, _ = state.clusters
    leaders = np.arange(cover.leaders)
    for chunk, near, gap in _near(state, np.flatnonzero(ends > starts), leaders):
        for a, row, to_a in zip(chunk, near, gap):
            labels = forest.parent  # compressed after every add
            cols = np.flatnonzero(row)
            cols = cols[labels[cols] != labels[a]]
            members = attached[starts[a]:ends[a]]
            step = max(1, state.memory_bytes // (_CELL_BYTES * max(1, cols.size)))
            for begin in range(0, members.size if cols.size else 0, step):
                piece = members[begin:begin + step]  # the piece's first row lies farthest from a
                later = cols[(cols >= cover.seen[piece].min()) & (to_a[cols] - state.theta <= cover.radius[piece[0]])]
                if not later.size:
                    continue
                raw = cover.rows32[piece] @ cover.rows32[later].T
                state.comparisons += raw.size
                r, c, similarity = _hits(state, raw, cover.nodes[piece], cover.nodes[later])
                _account(state, cover.nodes[piece[r]], cover.nodes[later[c]], similarity)
                forest.add(np.full(r.size, a, dtype=np.int64), later[c])


def _rims(state: _Search) -> None:
    """Pairs of attached rows between clusters still in different components, where the bounds
    through both representatives allow one."""
    forest = state.leader_forest
    attached, starts, ends, _ = state.clusters
    clusters = np.flatnonzero(ends > starts)
    for chunk, near, _ in _near(state, clusters, clusters):
        for a, row in zip(chunk, near):
            labels = forest.parent
            others = clusters[row]
            others = others[(others > a) & (labels[others] != labels[a])]
            if others.size:
                _rim_pairs(state, a, others)


def _rim_pairs(state: _Search, a: int, others: np.ndarray) -> None:
    """Attached rows of cluster ``a`` against those of the clusters ``others``: y of b is kept when
    angle(y, a) <= theta + reach(a); the pair (x, y) is computed when angle(y, a) <= theta + radius(x)
    and angle(x, b) <= theta + radius(y)."""
    attached, starts, ends, _ = state.clusters
    # The others' rows a part at a time, so the rows gathered stay within the memory bound.
    sizes = np.cumsum(ends[others] - starts[others])
    limit = max(1024, state.memory_bytes // (_CELL_BYTES * state.cover.rows32.shape[1]))
    part = sizes // limit
    for value in np.unique(part):
        _rim_part(state, a, others[part == value])


def _rim_part(state: _Search, a: int, others: np.ndarray) -> None:
    """``_rim_pairs`` for some of the other clusters."""
    cover, forest = state.cover, state.leader_forest
    attached, starts, ends, reach = state.clusters
    ys = np.concatenate([attached[starts[b]:ends[b]] for b in others])
    home = np.repeat(np.arange(others.size), ends[others] - starts[others])
    to_a = _gap(cover.rows32[ys] @ cover.rows32[a], state.margin)
    state.comparisons += ys.size
    keep = to_a <= state.theta + reach[a]
    ys, home, to_a = ys[keep], home[keep], to_a[keep]
    if not ys.size:
        return
    xs = attached[starts[a]:ends[a]]
    step = max(1, state.memory_bytes // (_CELL_BYTES * (ys.size + others.size)))
    for begin in range(0, xs.size, step):
        piece = xs[begin:begin + step]
        to_b = _gap(cover.rows32[piece] @ cover.rows32[others].T, state.margin)
        state.comparisons += to_b.size
        possible = ((to_b[:, home] <= state.theta + cover.radius[ys][None, :])
                    & (to_a[None, :] <= state.theta + cover.radius[piece][:, None]))
        rows, cols = np.flatnonzero(possible.any(axis=1)), np.flatnonzero(possible.any(axis=0))
        if not rows.size:
            continue
        raw = cover.rows32[piece[rows]] @ cover.rows32[ys[cols]].T
        state.comparisons += raw.size
        raw[~possible[np.ix_(rows, cols)]] = -np.inf
        r, c, similarity = _hits(state, raw, cover.nodes[piece[rows]], cover.nodes[ys[cols]])
        _account(state, cover.nodes[piece[rows[r]]], cover.nodes[ys[cols[c]]], similarity)
        forest.add(cover.owner[piece[rows[r]]], cover.owner[ys[cols[c]]])

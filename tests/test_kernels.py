"""Pure kernels, without Spark: normalisation, exact search, block splitting, spanning forests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from oracle import brute_force_pairs, groups_of, normalize

from dedup_spark import kernels
from dedup_spark.bucket import plan_search
from dedup_spark.sample import SampleSpec, generate


@pytest.fixture(scope="module")
def sample():
    return generate(SampleSpec(rows=4000, dim=48, seed=2))


def test_normalize_matches_contract_and_flags_bad_rows():
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((6, 5)).astype(np.float32)
    raw[1] = 0
    raw[2, 0] = np.nan
    raw[3, 1] = -np.inf
    normalized, reasons = kernels.normalize_rows(raw)
    assert list(reasons) == [None, "zero_norm", "not_finite", "not_finite", None, None]
    good = [0, 4, 5]
    assert np.array_equal(normalized[good], normalize(raw[good]))
    assert not normalized[[1, 2, 3]].any()


def test_normalize_is_exact_across_slabs_and_extreme_values():
    rng = np.random.default_rng(1)
    # Three slabs and a part of d=16, bad rows in each.
    raw = rng.standard_normal((3 * kernels._NORMALIZE_VALUES // 16 + 500, 16)).astype(np.float32)
    raw[5000] = 1e30  # squares overflow float32 but not the float64 sum: a good row
    raw[6000, 3] = np.inf
    raw[9000] = 0
    raw[9500] = 1e-30  # tiny but normalisable: a good row
    raw[20000, 0] = np.nan
    raw[40000] = -0.0
    raw[len(raw) - 1, 15] = -np.inf
    normalized, reasons = kernels.normalize_rows(raw)
    bad = {6000: "not_finite", 9000: "zero_norm", 20000: "not_finite", 40000: "zero_norm", len(raw) - 1: "not_finite"}
    assert {i: r for i, r in enumerate(reasons) if r is not None} == bad
    good = np.array([i for i in range(len(raw)) if i not in bad])
    assert np.array_equal(normalized[good], normalize(raw[good]))
    assert not normalized[list(bad)].any()
    # float16 input (the stored and LAION form) gives the same as its float32 widening.
    half = raw[:3000].astype(np.float16)
    assert np.array_equal(kernels.normalize_rows(half)[0], kernels.normalize_rows(half.astype(np.float32))[0])


def test_as_float32_widens_every_float16_exactly():
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(-1, 64)
    widened = kernels.as_float32(every)
    assert widened.dtype == np.float32 and widened.flags.c_contiguous
    # Bit for bit numpy's widening, NaNs included.
    assert np.array_equal(widened.view(np.uint32), every.astype(np.float32).view(np.uint32))
    # Views that are not contiguous, no rows, other dtypes.
    assert np.array_equal(kernels.as_float32(every[::3, 5:40]), every[::3, 5:40].astype(np.float32), equal_nan=True)
    assert kernels.as_float32(every[:0]).shape == (0, 64)
    assert np.array_equal(kernels.as_float32(np.arange(6.0).reshape(2, 3)), np.arange(6, dtype=np.float32).reshape(2, 3))


def _as_dict(blocks, ids_left, ids_right):
    found = {}
    for i, j, s in blocks:
        for a, b, sim in zip(ids_left[i], ids_right[j], s):
            found[(min(a, b), max(a, b))] = sim
    return found


@pytest.mark.parametrize("threshold", [0.9, 0.95, 0.99])
def test_search_pairs_equals_brute_force(sample, threshold):
    stored = normalize(sample.embeddings)
    ids = np.arange(len(stored))
    found = _as_dict(kernels.search_pairs(stored, None, threshold, block_rows=333), ids, ids)
    oracle = brute_force_pairs(stored, threshold)
    assert set(found) == set(oracle)
    assert all(abs(found[p] - oracle[p]) < 1e-4 for p in oracle)


def test_exactness_at_the_threshold_does_not_depend_on_blocking(sample):
    stored = normalize(sample.embeddings)
    # Put the threshold exactly on a real pair's float64 similarity: that pair must be kept.
    oracle = brute_force_pairs(stored, 0.9)
    edge = sorted(oracle.values())[len(oracle) // 2]
    ids = np.arange(len(stored))
    for block_rows in (1, 7, 4000):
        found = _as_dict(kernels.search_pairs(stored, None, edge, block_rows), ids, ids)
        assert set(found) == {p for p, s in oracle.items() if s >= edge}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_rows_meet_every_threshold_up_to_one(seed):
    """Stored rows are unit vectors rounded to float16, so an identical pair's plain dot product is
    its squared length, 1 +- ~1e-3: on either side of 1.0. The cosine makes it exactly 1."""
    rng = np.random.default_rng(seed)
    sources = normalize(rng.standard_normal((60, 96)).astype(np.float32))
    copies = np.repeat(sources, rng.integers(2, 6, size=len(sources)), axis=0)
    # Near but not identical copies: one float16 step apart in one component.
    nudged = copies[::7].copy()
    nudged[:, 0] = np.nextafter(nudged[:, 0], np.float16(1.0))
    # And one large group, whose blocks take the dense path.
    crowd = np.repeat(sources[1:2], 300, axis=0)
    stored = np.concatenate([copies, nudged, crowd, normalize(rng.standard_normal((200, 96)).astype(np.float32))])
    lengths = (stored.astype(np.float64) ** 2).sum(axis=1)
    assert lengths.min() < 1.0 < lengths.max()  # the case this guards: identical rows' dots straddle 1
    _, first = np.unique(stored.view(np.uint16), axis=0, return_inverse=True)
    first = first.ravel()
    identical = {(i, j) for i in range(len(stored)) for j in np.flatnonzero(first == first[i]).tolist() if j > i}
    ids = np.arange(len(stored))
    for threshold in (1.0, 0.999999):
        oracle = brute_force_pairs(stored, threshold)
        assert identical <= set(oracle)
        found = _as_dict(kernels.search_pairs(stored, None, threshold, block_rows=50), ids, ids)
        assert set(found) == set(oracle)
        assert all(found[p] == 1.0 for p in identical)
        a, b, _ = kernels.spanning_edges(stored, ids, None, threshold, block_rows=64)
        assert groups_of(list(zip(a.tolist(), b.tolist()))) == groups_of(oracle)


def test_block_splitting_gives_the_same_pairs_as_unsplit_search(sample):
    stored = normalize(sample.embeddings)
    ids = np.arange(len(stored))
    whole = set(_as_dict(kernels.search_pairs(stored, None, 0.95), ids, ids))
    blocks = np.array_split(np.random.default_rng(1).permutation(len(stored)), 5)
    split = set()
    for x in range(5):
        for y in range(x, 5):
            left, right = blocks[x], blocks[y]
            if x == y:
                split |= set(_as_dict(kernels.search_pairs(stored[left], None, 0.95), left, left))
            else:
                split |= set(_as_dict(kernels.search_pairs(stored[left], stored[right], 0.95), left, right))
    assert split == whole


def test_plan_search_covers_every_block_pair_within_the_cap():
    plan = plan_search({0: 10, 1: 100, 2: 5}, cap=40)
    by_bucket: dict[int, list] = {}
    for bucket_id, block, task, side in plan.routes:
        by_bucket.setdefault(bucket_id, []).append((block, task, side))
    assert len({t for _, t, _ in by_bucket[0]}) == 1
    blocks = dict(plan.blocks)[1]
    assert blocks >= 6  # 100 rows in blocks of at most 0.45 * 40
    tasks: dict[int, set] = {}
    for block, task, _side in by_bucket[1]:
        tasks.setdefault(task, set()).add(block)
    covered = {tuple(sorted(b)) if len(b) == 2 else (min(b), min(b)) for b in tasks.values()}
    assert covered == {(i, j) for i in range(blocks) for j in range(i, blocks)}


def _shared_rows(slots: np.ndarray) -> np.ndarray:
    """Oracle for bucket_counts' pairs: (a, b, rows joining both) over each row's distinct buckets."""
    from collections import Counter
    from itertools import combinations

    counted = Counter(pair for row in slots for pair in combinations(sorted(set(row.tolist())), 2))
    return np.array([(a, b, n) for (a, b), n in sorted(counted.items())], dtype=np.int64).reshape(-1, 3)


@pytest.mark.parametrize("cap, pack_rows", [(250, 0), (500, 450)])
def test_router_makes_every_pair_sharing_a_bucket_meet_in_exactly_one_task_of_it(cap, pack_rows):
    """Block pairs of a split bucket, and (with pack_rows) packs of buckets in one task: every pair
    of rows sharing a bucket is compared in exactly one task searching that bucket, a row reaches
    a task once, and no task holds more than the cap."""
    from itertools import combinations

    import pyarrow as pa

    from dedup_spark.bucket import joined_buckets, router
    from dedup_spark.tables import packed_binary

    rng = np.random.default_rng(3)
    rows, width = 600, 3
    # Slots over 6 buckets, sorted, some repeated (a bucket the margin dropped repeats one joined).
    slots = np.sort(rng.choice([0, 1, 1, 1, 1, 2, 3, 5], size=(rows, width)), axis=1).astype(np.int32)
    row_index, bucket_ids = joined_buckets(slots)
    sizes = {int(b): int(c) for b, c in zip(*np.unique(bucket_ids, return_counts=True))}
    # Bucket 1 (~525 rows) is split into blocks; the rest (~200 rows, ~50 shared pairwise) are not.
    plan = plan_search(sizes, cap=cap, shared=_shared_rows(slots), pack_rows=pack_rows)
    assert plan.split_buckets == 1 and dict(plan.blocks)[1] > 2
    packs = [b for b in plan.task_buckets.values() if len(b) > 1]
    assert bool(packs) == (pack_rows > 0)
    row_ids = rng.permutation(10**6)[:rows].astype(np.int64)
    embeddings = rng.standard_normal((rows, 4)).astype(np.float16)
    route = router(plan, width, seed=7)
    tasks: dict[int, list] = {}
    for start in range(0, rows, 250):  # several batches, as a task sees them
        part = slice(start, start + 250)
        batch = pa.RecordBatch.from_arrays([pa.array(row_ids[part]), packed_binary(embeddings[part])],
                                           names=["row_id", "embedding"])
        assigned = pa.RecordBatch.from_arrays([pa.array(row_ids[part]), packed_binary(slots[part])],
                                              names=["row_id", "buckets"])
        for routed in route(batch, assigned):
            for task, side, row_id, embedding, buckets in zip(*(routed.column(i).to_pylist() for i in range(5))):
                index = int(np.flatnonzero(row_ids == row_id)[0])
                assert embedding == embeddings[index].tobytes() and buckets == slots[index].tobytes()
                tasks.setdefault(task, []).append((side, index))
    assert sorted(tasks) == list(range(plan.tasks))
    assert max(len(members) for members in tasks.values()) <= cap
    # Each row reaches a task once; a pack's rows are the rows of its buckets.
    assert all(len(set(members)) == len(members) for members in tasks.values())
    for task, buckets in plan.task_buckets.items():
        if len(buckets) > 1:
            assert {i for _, i in tasks[task]} == {i for i in range(rows) if set(slots[i]) & set(buckets)}
    met: dict[tuple, int] = {}
    for task, members in tasks.items():
        sides = [side for side, _ in members]
        for bucket in plan.task_buckets[task]:
            joined = [(side, i) for side, i in members if bucket in slots[i]]
            for (side_a, a), (side_b, b) in combinations(joined, 2):
                # A block-pair task compares its two sides; a one-block task, all its rows.
                if side_a != side_b or 1 not in sides:
                    key = (bucket, min(a, b), max(a, b))
                    met[key] = met.get(key, 0) + 1
    expected = {(int(b), int(min(i, j)), int(max(i, j)))
                for b in sizes for i, j in combinations(row_index[bucket_ids == b], 2)}
    assert set(met) == expected and set(met.values()) == {1}
    for task, buckets in plan.task_buckets.items():  # the rows a pack's buckets share travel once
        if len(buckets) > 1:
            assert len(tasks[task]) < sum(sizes[b] for b in buckets)


def test_pack_buckets_merges_the_most_shared_within_the_limit():
    from dedup_spark.bucket import pack_buckets

    sizes = {0: 100, 1: 100, 2: 100, 3: 100, 4: 500}
    # 0-1 share 60 rows, 2-3 share 50, 1-2 share 10, 3-4 share 90 (4 is too large to join anyone).
    shared = np.array([(0, 1, 60), (2, 3, 50), (1, 2, 10), (3, 4, 90)], dtype=np.int64)
    assert pack_buckets(sizes, shared, 150) == [([0, 1], 140), ([2, 3], 150), ([4], 500)]
    # A larger limit joins the two packs over their 10 shared rows; 0 packs nothing.
    assert pack_buckets(sizes, shared, 300) == [([0, 1, 2, 3], 280), ([4], 500)]
    assert pack_buckets(sizes, shared, 0) == [([b], n) for b, n in sorted(sizes.items())]
    # A pack's estimated cost (pairs + 1,000 a row; 104,950 for one bucket here) bounds it too.
    assert pack_buckets(sizes, shared, 300, max_cost=140_000) == [([b], n) for b, n in sorted(sizes.items())]
    # Two links between the packs: with at most two buckets a row their sum is what the packs share;
    # otherwise a row may be in both links, and only the larger is subtracted.
    shared = np.concatenate([shared, [(0, 2, 5)]])
    assert pack_buckets(sizes, shared, 300) == [([0, 1, 2, 3], 275), ([4], 500)]
    assert pack_buckets(sizes, shared, 300, exact=False) == [([0, 1, 2, 3], 280), ([4], 500)]


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("binding", ["rows", "cost"])
def test_packs_cover_every_bucket_within_their_bounds_and_no_two_linked_packs_could_merge(exact, binding):
    """On a random graph of few links a bucket (all of them among its strongest): every bucket is in
    one pack; a pack of several fits the row limit and the cost bound, with its rows its buckets'
    less the links inside it (exact), or at least that (an upper bound otherwise); and two packs that
    share a link could not merge within the bounds, since merging stops only then."""
    from dedup_spark.bucket import _task_cost, pack_buckets

    rng = np.random.default_rng(7)
    ids = [int(b) for b in rng.choice(10_000, 400, replace=False)]
    sizes = {b: int(n) for b, n in zip(ids, rng.integers(50, 400, len(ids)))}
    links: dict[tuple[int, int], int] = {}
    for i, b in enumerate(ids):
        for step in (1, 2, 5):
            c = ids[(i + step) % len(ids)]
            links[min(b, c), max(b, c)] = int(rng.integers(1, min(sizes[b], sizes[c]) // 2))
    shared = np.array([(a, c, w) for (a, c), w in links.items()], dtype=np.int64)
    # Either bound alone stops the merging.
    limit = 900 if binding == "rows" else 1_500
    max_cost = math.inf if binding == "rows" else sum(_task_cost(n * (n - 1) // 2, n) for n in sizes.values()) / 60
    packs = pack_buckets(sizes, shared, limit, max_cost, exact)
    assert sorted(b for members, _ in packs for b in members) == sorted(ids)
    pack_of = {b: i for i, (members, _) in enumerate(packs) for b in members}

    def pairs_of(members: list[int]) -> int:
        return sum(sizes[b] * (sizes[b] - 1) // 2 for b in members)

    inside = [0] * len(packs)
    between: dict[tuple[int, int], int] = {}
    for (a, c), w in links.items():
        p, q = sorted((pack_of[a], pack_of[c]))
        if p == q:
            inside[p] += w
        else:
            between[p, q] = between.get((p, q), 0) + w
    for (members, rows), shared_inside in zip(packs, inside):
        union = sum(sizes[b] for b in members) - shared_inside
        assert rows == union if exact else union <= rows <= sum(sizes[b] for b in members)
        if len(members) > 1:
            assert rows <= limit and _task_cost(pairs_of(members), rows) <= max_cost
    assert sum(len(members) > 1 for members, _ in packs) >= 40, "the bounds leave room for packs"
    if exact:
        for (p, q), w in between.items():
            merged = packs[p][1] + packs[q][1] - w
            assert merged > limit or _task_cost(pairs_of(packs[p][0] + packs[q][0]), merged) > max_cost


def test_packing_leaves_tasks_for_every_core_when_rows_join_many_buckets():
    """LSH with many tables puts every row in dozens of buckets that all share rows: packing by rows
    alone would make one task of everything; bounding a pack at 1/min_tasks of the estimated cost
    keeps tasks for the cores (packs fill that bound only partly: at least half as many)."""
    sizes = {b: 1_000 for b in range(64)}
    shared = np.array([(a, b, 500) for a in range(64) for b in range(a + 1, 64)], dtype=np.int64)
    assert plan_search(sizes, cap=100_000, shared=shared, pack_rows=100_000, shared_exact=False).tasks == 1
    plan = plan_search(sizes, cap=100_000, shared=shared, pack_rows=100_000, min_tasks=16, shared_exact=False)
    assert 8 <= plan.tasks < 64


@pytest.mark.parametrize("seed", range(5))
def test_spanning_forest_matches_union_find(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    a = rng.integers(0, n, size=3000)
    b = rng.integers(0, n, size=3000)
    forest = kernels.SpanningForest(n)
    chosen = np.concatenate([forest.add(a[:1500], b[:1500]), 1500 + forest.add(a[1500:], b[1500:])])
    pairs = [(int(x), int(y)) for x, y in zip(a, b) if x != y]
    expected = groups_of(pairs)
    labels = forest.labels()
    assert {x: int(labels[x]) for x in expected} == expected
    # A forest: the chosen edges connect the same components with no cycle.
    assert len(chosen) == len(expected) - len(set(expected.values()))
    assert groups_of([(int(a[i]), int(b[i])) for i in chosen]) == expected


def test_spanning_forest_on_a_long_path_and_a_star():
    n = 50_000
    path = np.arange(n - 1)
    order = np.random.default_rng(0).permutation(n - 1)
    labels = kernels.components(n, path[order], path[order] + 1)
    assert (labels == 0).all()
    star = kernels.components(n, np.full(n - 1, n - 1), np.arange(n - 1))
    assert (star == 0).all()


def test_train_and_assign_cover_top_m(sample):
    stored = normalize(sample.embeddings).astype(np.float32)
    centroids = kernels.train_centroids(stored, 16, 10, 0)
    assert centroids.shape == (16, 48)
    buckets = kernels.assign_buckets(stored, centroids, 3)
    scores = stored @ centroids.T
    best = np.argsort(-scores, axis=1)[:, :3]
    assert np.mean([set(x) == set(y) for x, y in zip(buckets, best)]) > 0.999


def test_two_level_allocation_is_proportional_and_sums_to_k():
    rng = np.random.default_rng(3)
    for counts, k in ((rng.integers(0, 500, 40), 300), (np.array([1000, 0, 3, 1, 0, 7]), 50),
                      (np.array([5, 5, 5]), 100), (rng.integers(0, 3, 200), 90)):
        allocated = kernels.allocate_centroids(counts, k)
        # Oracle: the exact proportional quota of each cell, from which no cell may be a whole centroid off.
        quota = counts * min(k, counts.sum()) / counts.sum()
        assert allocated.sum() == min(k, counts.sum())
        assert (allocated <= counts).all() and (allocated[counts == 0] == 0).all()
        assert np.abs(allocated - quota).max() < 1.0, (counts, k, allocated)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_near_copy_centroids_are_merged_and_no_others(kind):
    rng = np.random.default_rng(4)
    spread = normalize(rng.standard_normal((300, 48))).astype(np.float32)
    # Near copies of the first 40 centroids (cosine ~0.99), placed after them, and one copy of a copy.
    noise = normalize(rng.standard_normal((40, 48))).astype(np.float32)
    copies = normalize(spread[:40] + 0.1 * noise).astype(np.float32)
    twice = normalize(copies[:1] + 0.02 * noise[1:2]).astype(np.float32)
    centroids = np.concatenate([spread, copies, twice])
    min_cosine = 0.975
    kept = kernels.merge_close_centroids(centroids, min_cosine, kind)
    # Oracle: every pair's cosine by brute force. No two kept centroids are that close, and every
    # dropped one is that close to a kept one; here exactly the planted copies go.
    cosine = kept.astype(np.float64) @ kept.T.astype(np.float64)
    np.fill_diagonal(cosine, -1)
    assert cosine.max() < min_cosine
    assert len(kept) == 300 and np.array_equal(kept, spread)
    full = centroids.astype(np.float64) @ spread.T.astype(np.float64)
    assert (full[300:].max(axis=1) >= min_cosine).all()


@pytest.mark.parametrize("table", [False, True])
def test_margin_keeps_a_further_bucket_only_near_its_border(sample, table):
    stored = normalize(sample.embeddings).astype(np.float32)
    centroids = kernels.train_centroids(stored, 16, 10, 0)
    margin = 0.3 * np.sqrt(2 * (1 - 0.95))
    separations = kernels.centroid_separations(centroids) if table else None
    buckets = kernels.assign_buckets(stored, centroids, 3, centroids, margin, separations)
    # Oracle: float64 Euclidean distances to every centroid, and each row's distance to the
    # bisector between its nearest centroid and its 2nd / 3rd nearest.
    x, c = stored.astype(np.float64), centroids.astype(np.float64)
    square = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    order = np.argsort(square, axis=1)[:, :3]
    rows = np.arange(len(x))[:, None]
    bisector = (square[rows, order[:, 1:]] - square[rows, order[:, :1]]) / (
        2 * np.linalg.norm(c[order[:, :1]] - c[order[:, 1:]], axis=2))
    expected = [{int(o[0])} | {int(o[j + 1]) for j in range(2) if d[j] <= margin} for o, d in zip(order, bisector)]
    got = [set(row.tolist()) for row in buckets]
    # Ties and rows within float32 rounding of a border may differ.
    assert np.mean([g == e for g, e in zip(got, expected)]) > 0.995
    assert np.mean(buckets[:, 0] == order[:, 0]) > 0.995, "the nearest bucket is always joined"
    sizes = [len(g) for g in got]
    assert 1 < np.mean(sizes) < 3, "the margin keeps some further buckets and drops others"
    assert np.array_equal(kernels.assign_buckets(stored, centroids, 3, centroids, np.inf, separations),
                          kernels.assign_buckets(stored, centroids, 3))
    nearest_only = kernels.assign_buckets(stored, centroids, 3, centroids, 0.0, separations)
    assert (nearest_only == nearest_only[:, :1]).all()
    if table:
        # The table's distances are the rows' own up to rounding, and decide the same buckets.
        wide = centroids.astype(np.float64)
        direct = np.linalg.norm(wide[:, None, :] - wide[None, :, :], axis=2)
        assert np.allclose(separations, direct, rtol=1e-5, atol=1e-6)
        per_row = kernels.assign_buckets(stored, centroids, 3, centroids, margin)
        assert np.mean((buckets == per_row).all(axis=1)) > 0.999
        assert kernels.centroid_separations(np.zeros((kernels.SEPARATION_TABLE_MAX_K + 1, 2))) is None


@pytest.mark.parametrize("threshold", [0.9, 0.95])
def test_spanning_edges_close_exactly_like_all_pairs(sample, threshold):
    stored = normalize(sample.embeddings)
    oracle = brute_force_pairs(stored, threshold)
    nodes = np.arange(len(stored))
    a, b, similarity = kernels.spanning_edges(stored, nodes, None, threshold, block_rows=257)
    edges = list(zip(a.tolist(), b.tolist()))
    assert all((min(e), max(e)) in oracle for e in edges), "every spanning edge is a real pair"
    assert all(abs(s - oracle[(min(x, y), max(x, y))]) < 1e-6 for x, y, s in zip(a, b, similarity))
    expected = groups_of(oracle)
    assert groups_of(edges) == expected
    assert len(edges) == len(expected) - len(set(expected.values()))


def test_spanning_edges_across_two_blocks_match_the_cross_pairs(sample):
    stored = normalize(sample.embeddings)
    rng = np.random.default_rng(3)
    order = rng.permutation(len(stored))
    left, right = order[:1500], order[1500:3500]
    cross = {(min(i, j), max(i, j)) for (i, j) in brute_force_pairs(stored, 0.95)
             if (i in set(left) and j in set(right)) or (j in set(left) and i in set(right))}
    a, b, _ = kernels.spanning_edges(stored, left, right, 0.95, block_rows=100)
    assert {(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist())} <= cross
    assert groups_of(list(zip(a.tolist(), b.tolist()))) == groups_of(cross)


def test_spanning_edges_on_a_giant_group_stay_linear():
    rng = np.random.default_rng(4)
    base = rng.standard_normal(32)
    rows = normalize((base + 0.02 * rng.standard_normal((6000, 32))).astype(np.float32))
    a, b, _ = kernels.spanning_edges(rows, np.arange(6000), None, 0.95, block_rows=512)
    assert len(a) == 5999
    assert len(set(groups_of(list(zip(a.tolist(), b.tolist()))).values())) == 1


def test_hnsw_assignment_agrees_with_flat_for_large_k():
    rng = np.random.default_rng(9)
    centroids = normalize(rng.standard_normal((9000, 48)).astype(np.float32)).astype(np.float32)
    rows = normalize(rng.standard_normal((2000, 48)).astype(np.float32))
    flat = kernels.assign_buckets(rows, kernels.build_quantizer(centroids, "flat"), 2)
    hnsw = kernels.assign_buckets(rows, kernels.build_quantizer(centroids, "hnsw", 2), 2)
    agreement = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(flat, hnsw)])
    assert agreement > 0.95, agreement


def test_sample_mask_is_a_seeded_bernoulli_sample_of_ids():
    ids = np.arange(10**6, dtype=np.int64) * 7 + 3
    first = kernels.sample_mask(ids, 0.01, seed=5)
    # Binomial(10^6, 0.01): sd ~ 99.5, so 5 sd either side.
    assert abs(int(first.sum()) - 10_000) < 500
    assert np.array_equal(first, kernels.sample_mask(ids, 0.01, seed=5))
    # Order-free: the same ids shuffled are sampled the same way.
    order = np.random.default_rng(0).permutation(ids.size)
    assert np.array_equal(kernels.sample_mask(ids[order], 0.01, seed=5), first[order])
    # Another seed gives an independent sample: overlap ~ 10^6 * 0.01^2 = 100.
    other = kernels.sample_mask(ids, 0.01, seed=6)
    assert int((first & other).sum()) < 200
    assert not kernels.sample_mask(ids, 0.0, seed=5).any() and kernels.sample_mask(ids, 1.0, seed=5).all()


# Search by representatives (dedup_spark.cover): closure per threshold against independent oracles.

T_COVER = 0.95


@pytest.fixture
def small_tasks(monkeypatch):
    """Tasks of a few thousand rows take the representatives' path too, so each case stays fast."""
    from dedup_spark import cover

    monkeypatch.setattr(cover, "MIN_ROWS", 256)


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    v = rng.standard_normal(d)
    return v / np.linalg.norm(v)


def _copies(rng: np.random.Generator, source: np.ndarray, similarity: np.ndarray, directions: int | None) -> np.ndarray:
    """Rows at the given cosines to ``source``, each moved along a random direction of a fixed
    ``directions``-dimensional subspace (None: of the whole space)."""
    d = source.size
    if directions is None:
        moves = rng.standard_normal((similarity.size, d))
    else:
        moves = rng.standard_normal((similarity.size, directions)) @ np.linalg.qr(rng.standard_normal((d, directions)))[0].T
    moves -= (moves @ source)[:, None] * source
    moves /= np.linalg.norm(moves, axis=1, keepdims=True)
    return similarity[:, None] * source + np.sqrt(1.0 - similarity**2)[:, None] * moves


def _searched(stored: np.ndarray, threshold: float, **options) -> tuple[np.ndarray, kernels.GraphSearchResult]:
    """The kernel's components (smallest member of each row's) over one task of all rows, after
    checking every forest edge is a real pair."""
    from oracle import cosine, smallest_member

    found = kernels.graph_search(stored, np.arange(len(stored)), None, [threshold], **options)
    a, b, _ = found.forests[0]
    assert (cosine(stored[a], stored[b]) >= threshold).all(), "every forest edge is a real pair"
    assert len(a) < len(stored)
    return smallest_member(len(stored), a, b), found


@pytest.mark.parametrize("seed", [0, 1])
def test_representatives_close_a_tight_group_of_20000_copies(seed):
    """20,000 copies within half the threshold's angle of one row (so all their pairs are pairs,
    by the triangle inequality, checked on the stored values) among 2,000 CLIP-like rows at least
    1.5 times that angle away: the group is one component, at a tenth of its pairs or less."""
    rng = np.random.default_rng(seed)
    d, half = 32, math.acos(T_COVER) / 2
    source = _unit(rng, d)
    group = _copies(rng, source, np.cos(rng.uniform(0, 0.9 * half, 20_000)), None)
    rest = generate(SampleSpec(rows=2_000, dim=d, seed=seed)).embeddings.astype(np.float64)
    order = rng.permutation(22_000)
    stored = normalize(np.concatenate([group, rest])[order])
    wide = stored.astype(np.float64) / np.linalg.norm(stored.astype(np.float64), axis=1, keepdims=True)
    in_group = order < 20_000
    assert (wide[in_group] @ source > math.cos(half)).all() and (wide[~in_group] @ source < math.cos(3 * half)).all()
    others = np.flatnonzero(~in_group)
    expected = np.arange(len(stored))
    for row, smallest in groups_of(brute_force_pairs(stored[others], T_COVER, others)).items():
        expected[row] = smallest
    expected[in_group] = np.flatnonzero(in_group).min()
    labels, found = _searched(stored, T_COVER)
    assert np.array_equal(labels, expected)
    assert found.attached >= 19_000 and found.comparisons * 10 < found.all_pairs, (found.comparisons, found.all_pairs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_representatives_close_a_chain_whose_ends_are_far_apart(small_tasks, seed):
    """Rows along an arc of 2.5 radians, each a small step from the last: the ends are far below the
    threshold to each other, and only the steps join them."""
    from oracle import closure_labels

    rng = np.random.default_rng(seed)
    d, n = 32, 3_000
    e1, e2 = _unit(rng, d), _unit(rng, d)
    e2 -= (e2 @ e1) * e1
    e2 /= np.linalg.norm(e2)
    angle = np.sort(rng.uniform(0, 2.5, n))
    rows = np.cos(angle)[:, None] * e1 + np.sin(angle)[:, None] * e2 + 0.02 * rng.standard_normal((n, d))
    stored = normalize(rows[rng.permutation(n)])
    expected = closure_labels(stored, T_COVER)
    wide = stored.astype(np.float64)
    assert wide[np.argmin(wide @ e2)] @ wide[np.argmax(wide @ e2)] < 0.2, "the ends are far apart"
    labels, found = _searched(stored, T_COVER, block_rows=256)
    assert found.attached > 0
    assert np.array_equal(labels, expected)


def _two_groups(rng: np.random.Generator, d: int, size: int, gap_degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Two tight groups whose sources are ``gap_degrees`` apart; rows and each row's group (0, 1)."""
    first = _unit(rng, d)
    turn = _unit(rng, d)
    turn -= (turn @ first) * first
    turn /= np.linalg.norm(turn)
    gap = math.radians(gap_degrees)
    second = math.cos(gap) * first + math.sin(gap) * turn
    spread = np.cos(rng.uniform(0, math.radians(5), size))
    rows = np.concatenate([_copies(rng, first, spread, None), _copies(rng, second, spread, None)])
    return rows, np.repeat([0, 1], size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_representatives_join_two_giant_groups_bridged_by_one_row(small_tasks, seed):
    """Two groups of 2,500 copies 30 degrees apart (no pair across them) and one row halfway: the
    groups are one component with it and two without it."""
    from oracle import cosine

    rng = np.random.default_rng(seed)
    rows, member = _two_groups(rng, 32, 2_500, 30.0)
    midpoint = rows[:2_500].mean(axis=0) + rows[2_500:].mean(axis=0)
    rows = np.concatenate([rows, midpoint[None, :] / np.linalg.norm(midpoint)])
    order = rng.permutation(len(rows))
    stored = normalize(rows[order])
    member = np.append(member, 2)[order]
    wide = stored.astype(np.float64) / np.linalg.norm(stored.astype(np.float64), axis=1, keepdims=True)
    first, second, bridge = (np.flatnonzero(member == k) for k in range(3))
    assert (wide[first] @ wide[second].T).max() < T_COVER - 1e-3, "no pair across the groups"
    assert (wide[first] @ wide[first].T).min() > T_COVER and (wide[second] @ wide[second].T).min() > T_COVER
    reach = cosine(np.repeat(stored[bridge], len(stored), axis=0), stored) >= T_COVER
    assert reach[first].any() and reach[second].any(), "the bridge reaches both groups"
    labels, found = _searched(stored, T_COVER)
    assert found.attached > 4_000
    assert np.array_equal(labels, np.full(len(stored), 0)), "one component through the bridge"
    keep = np.flatnonzero(member != 2)
    labels, _ = _searched(stored[keep], T_COVER)
    groups = member[keep]
    assert np.array_equal(labels, np.where(groups == 0, np.argmax(groups == 0), np.argmax(groups == 1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_representatives_keep_a_pair_exactly_at_the_threshold(small_tasks, seed):
    """Two tight groups joined by one pair only, the threshold set to that pair's exact cosine: the
    pair must be found (the bounds may prune nothing at the threshold), and just above it must not."""
    from oracle import cosine

    rng = np.random.default_rng(seed)
    rows, member = _two_groups(rng, 32, 1_500, 24.0)
    order = rng.permutation(len(rows))
    stored, member = normalize(rows[order]), member[order]
    first, second = np.flatnonzero(member == 0), np.flatnonzero(member == 1)
    wide = stored.astype(np.float64) / np.linalg.norm(stored.astype(np.float64), axis=1, keepdims=True)
    across = wide[first] @ wide[second].T
    top = np.sort(across, axis=None)[-2:]
    i, j = np.unravel_index(np.argmax(across), across.shape)
    edge = float(cosine(stored[first[i]][None], stored[second[j]][None])[0])
    assert top[0] < edge - 1e-6, "one pair across the groups is the closest"
    assert min((wide[first] @ wide[first].T).min(), (wide[second] @ wide[second].T).min()) > edge
    labels, found = _searched(stored, edge)
    assert found.attached > 2_500
    assert (labels == 0).all()
    labels, _ = _searched(stored, float(np.nextafter(edge, 2.0)))
    assert len(set(labels.tolist())) == 2


@pytest.mark.parametrize("seed", [0, 1])
def test_representatives_close_a_group_split_across_a_buckets_blocks(small_tasks, seed):
    """A group of 3,000 copies whose similarities to their source spread around the threshold (moving
    in 4 directions) and 1,000 other rows, split into 3 blocks by hash and searched as the plan does
    (each block alone, each pair of blocks across): the forests together close like all pairs."""
    from oracle import closure_labels, smallest_member

    rng = np.random.default_rng(seed)
    d = 32
    source = _unit(rng, d)
    group = _copies(rng, source, rng.uniform(0.9, 1.0, 3_000), 4)
    rest = generate(SampleSpec(rows=1_000, dim=d, seed=seed + 10)).embeddings.astype(np.float64)
    stored = normalize(np.concatenate([group, rest]))
    blocks = np.array_split(rng.permutation(len(stored)), 3)
    edges, attached = [], 0
    for x in range(3):
        for y in range(x, 3):
            found = kernels.graph_search(stored, blocks[x], None if x == y else blocks[y], [T_COVER], block_rows=300)
            edges.append(found.forests[0][:2])
            attached += found.attached
            assert found.all_pairs == (len(blocks[x]) * (len(blocks[x]) - 1) // 2 if x == y
                                       else len(blocks[x]) * len(blocks[y]))
    a, b = (np.concatenate(side) for side in zip(*edges))
    assert attached > 0
    assert np.array_equal(smallest_member(len(stored), a, b), closure_labels(stored, T_COVER))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("directions", [4, None])
def test_representatives_close_a_giant_group_among_sparse_rows(small_tasks, monkeypatch, seed, directions):
    """A group of 2,500 copies spread around the threshold, moving in 4 directions or in all (a halo
    of rows below the threshold to the source and to each other, taken by representatives whatever
    the probe says), among 2,500 CLIP-like rows with their own small groups; the pairs counted among
    the comparisons made never exceed the true ones."""
    from oracle import closure_labels

    from dedup_spark import cover

    if directions is None:
        monkeypatch.setattr(cover, "DENSE_PAIRS", 0.0)
    rng = np.random.default_rng(seed)
    d = 48
    group = _copies(rng, _unit(rng, d), rng.uniform(0.88, 1.0, 2_500), directions)
    rest = generate(SampleSpec(rows=2_500, dim=d, seed=seed + 20)).embeddings.astype(np.float64)
    stored = normalize(np.concatenate([group, rest])[rng.permutation(5_000)])
    labels, found = _searched(stored, T_COVER, block_rows=512)
    assert found.attached > 0
    assert np.array_equal(labels, closure_labels(stored, T_COVER))
    assert found.pair_counts[0] <= len(brute_force_pairs(stored, T_COVER))


@pytest.mark.parametrize("seed", [0, 1])
def test_random_rows_take_the_plain_path_and_representatives_stay_exact_on_them(small_tasks, monkeypatch, seed):
    """CLIP-like rows with no giant group: the probe keeps the plain product (every pair computed,
    counts exact); forced onto representatives, the closure is still exact."""
    from oracle import closure_labels

    from dedup_spark import cover

    stored = normalize(generate(SampleSpec(rows=3_000, dim=32, seed=seed + 30)).embeddings)
    expected = closure_labels(stored, T_COVER)
    labels, found = _searched(stored, T_COVER)
    assert found.attached == 0 and found.pair_counts[0] == len(brute_force_pairs(stored, T_COVER))
    assert np.array_equal(labels, expected)
    monkeypatch.setattr(cover, "DENSE_PAIRS", 0.0)
    labels, found = _searched(stored, T_COVER, block_rows=200)
    assert found.attached > 0
    assert np.array_equal(labels, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_representatives_prune_nothing_at_the_threshold_where_the_bounds_are_tight(small_tasks, seed):
    """Two dense arcs of one great circle, the threshold set to the exact cosine of the gap between
    their nearest ends: on a circle the triangle inequality is an equality, so the bound through two
    representatives meets the threshold exactly for that pair, which must still be found."""
    from oracle import cosine

    rng = np.random.default_rng(seed)
    d = 32
    plane = np.linalg.qr(rng.standard_normal((d, 2)))[0].T
    angles = np.concatenate([np.sort(rng.uniform(0.0, 0.6, 1_500)), 0.85 + np.sort(rng.uniform(0.0, 0.6, 1_500))])
    rows = np.cos(angles)[:, None] * plane[0] + np.sin(angles)[:, None] * plane[1]
    order = rng.permutation(len(rows))
    stored = normalize(rows[order])
    arc = (order >= 1_500).astype(np.int64)
    first, second = np.flatnonzero(arc == 0), np.flatnonzero(arc == 1)
    wide = stored.astype(np.float64) / np.linalg.norm(stored.astype(np.float64), axis=1, keepdims=True)
    across = wide[first] @ wide[second].T
    i, j = np.unravel_index(np.argmax(across), across.shape)
    edge = float(cosine(stored[first[i]][None], stored[second[j]][None])[0])
    assert np.sort(across, axis=None)[-2] < edge - 1e-7, "one pair across the arcs is the closest"
    labels, found = _searched(stored, edge, block_rows=256)
    assert found.attached > 2_000
    assert (labels == 0).all()
    labels, _ = _searched(stored, float(np.nextafter(edge, 2.0)), block_rows=256)
    assert np.array_equal(labels, np.where(arc == 0, first.min(), second.min()))

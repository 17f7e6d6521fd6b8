"""Skew: giant components, giant groups, oversized buckets, low memory."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import output_groups, output_pairs, random_caption, run_job
from oracle import brute_force_pairs, exact_jaccard, groups_of, normalize

from dedup_spark import config as config_module
from dedup_spark import search
from dedup_spark.group import connected_components
from dedup_spark.sample import SampleSpec, generate

REPO = Path(__file__).resolve().parent.parent
THRESHOLD = 0.95


def spark_components(spark, a: np.ndarray, b: np.ndarray) -> tuple[dict, dict]:
    edges = spark.createDataFrame(pd.DataFrame({"row_id_a": a.astype(np.int64), "row_id_b": b.astype(np.int64)}))
    members, stats = connected_components(edges, config_module.JobConfig())
    result = members.toPandas()
    return dict(zip(result["row_id"].tolist(), result["group_id"].tolist())), stats


@pytest.mark.parametrize("shape", ["path", "star"])
def test_components_on_a_100k_path_and_a_100k_star(spark, shape):
    n = 100_000
    labels = np.random.default_rng(1).permutation(n) * 7 + 3  # node ids in no helpful order
    if shape == "path":
        a, b = labels[:-1], labels[1:]
    else:
        center = labels[n // 2]
        leaves = np.delete(labels, n // 2)
        a, b = np.full(n - 1, center), leaves
    # Edges in random order, so each partition holds scattered pieces: the local union-find
    # that starts the alternation cannot collapse the path by itself.
    order = np.random.default_rng(2).permutation(len(a))
    a, b = a[order], b[order]
    groups, stats = spark_components(spark, a, b)
    print(shape, stats)
    assert groups == groups_of(list(zip(a.tolist(), b.tolist())))
    # Bounded rounds: O(log^2 n) worst case for large-star/small-star, far fewer in practice.
    assert stats["rounds"] <= 2 * math.ceil(math.log2(n)), stats


def test_local_union_find_takes_up_to_local_edges_per_task(spark):
    n = 60_000
    labels = np.random.default_rng(5).permutation(n) * 3 + 1
    order = np.random.default_rng(6).permutation(n - 1)
    a, b = labels[:-1][order], labels[1:][order]
    edges = spark.createDataFrame(pd.DataFrame({"row_id_a": a.astype(np.int64), "row_id_b": b.astype(np.int64)}))
    edges = edges.repartition(12)
    expected = groups_of(list(zip(a.tolist(), b.tolist())))
    for local_edges, finished_locally in [(n, True), (n // 12, False)]:
        config = config_module.JobConfig(group=config_module.GroupConfig(local_edges=local_edges))
        members, stats = connected_components(edges, config, edge_count=n - 1)
        result = members.toPandas()
        assert dict(zip(result["row_id"].tolist(), result["group_id"].tolist())) == expected
        # All edges in one task: the union-find finishes the path and no round is needed. At one
        # twelfth each, the scattered pieces of the path must be joined by the rounds.
        assert (stats["rounds"] == 0) == finished_locally, (local_edges, stats)


def giant_group_data(copies: int, others: int, dim: int, seed: int):
    """``copies`` near-identical rows plus ``others`` CLIP-like rows, shuffled, with an exact oracle.

    The oracle needs no all-pairs pass over the giant group: every copy lies within
    half the threshold's angle of the base vector, so every two copies are >= the
    threshold (triangle inequality on angles), and every other row lies farther than
    1.5 times that angle from the base, so it is below the threshold to every copy.
    Both facts are checked on the stored float16 values.
    """
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(dim)
    base /= np.linalg.norm(base)
    group = base + 0.012 * rng.standard_normal((copies, dim))
    rest = generate(SampleSpec(rows=others, dim=dim, seed=seed)).embeddings.astype(np.float32)
    rows = np.concatenate([group, rest]).astype(np.float32)
    order = rng.permutation(len(rows))
    rows = rows[order]
    stored = normalize(rows)
    in_group = order < copies
    half_angle = math.acos(THRESHOLD) / 2
    to_base = stored.astype(np.float64) @ base
    assert np.all(to_base[in_group] / np.linalg.norm(stored[in_group].astype(np.float64), axis=1) > math.cos(half_angle))
    assert np.all(to_base[~in_group] < math.cos(3 * half_angle) - 1e-3)
    other_ids = np.flatnonzero(~in_group)
    group_ids = np.flatnonzero(in_group)
    expected = groups_of(list(brute_force_pairs(stored[other_ids], THRESHOLD, other_ids)))
    expected.update({int(i): int(group_ids.min()) for i in group_ids})
    return rows, expected


def write_npy_shards(rows: np.ndarray, root: Path, shard_rows: int) -> None:
    root.mkdir(parents=True)
    for index, start in enumerate(range(0, len(rows), shard_rows)):
        np.save(root / f"part_{index}.npy", rows[start:start + shard_rows])


def test_one_100k_copy_group_keeps_edges_linear(spark, tmp_path):
    rows, expected = giant_group_data(copies=100_000, others=10_000, dim=32, seed=41)
    write_npy_shards(rows, tmp_path / "in", 20_000)
    out = tmp_path / "out"
    # One bucket holding everything: exhaustive, so the groups must equal the oracle's exactly,
    # and split into B blocks, searched as B(B+1)/2 tasks.
    report = run_job(spark, tmp_path / "in", out, bucketing__k=1, search__max_task_rows=30_000)
    assert output_groups(out) == expected
    blocks = math.ceil(len(rows) / int(30_000 * 0.45))
    assert report["bucketing"]["search_tasks"] == blocks * (blocks + 1) // 2
    # Each task emits a forest (fewer edges than its rows), so edges written and shuffled into
    # grouping are at most B x rows, against ~5e9 pairs inside the group.
    assert report["search"]["edges_emitted"] < blocks * len(rows), report["search"]
    assert report["search"]["pairs_written"] <= report["search"]["edges_emitted"]
    # Searched by representatives: the copies are attached (in every task that holds them), and the
    # similarities computed are a small share of the ~6e9 all pairs cost; pair counts are lower bounds.
    searched = report["search"]
    assert searched["comparisons_all_pairs"] == len(rows) * (len(rows) - 1) // 2, searched
    assert searched["rows_attached"] > 0.9 * 100_000 and searched["pairs_found_is_lower_bound"] is True
    assert searched["comparisons_done"] < searched["comparisons_all_pairs"] / 20, searched
    assert report["accounting"]["kept_rows"] == len(rows) - (len(expected) - len(set(expected.values())))
    # The tasks' kernel time is part of the stage's core-seconds (the rest feeds the kernel its rows).
    kernel = report["search"]["kernel_task_seconds"]
    assert 0 < kernel <= report["timings_seconds"]["search"] * spark.sparkContext.defaultParallelism, kernel


def test_search_stats_count_spanning_edges_apart_from_pairs_and_counters(spark):
    """Connected components size their tasks by the spanning edges: under output.pairs all the
    edges table also holds every pair and the per-task counters, which must not be counted in."""
    rng = np.random.default_rng(9)
    levels = [0] * 700 + [1] * 300 + [search.PAIR] * 5_000
    rows = [(int(a), int(a) + 1, 0.97, level) for a, level in zip(rng.integers(0, 10**6, len(levels)), levels)]
    # Two tasks' counters: owned pairs per threshold index, and histogram bins.
    counters = [(0, 3_000, search.PAIR_COUNT), (1, 900, search.PAIR_COUNT), (0, 2_000, search.PAIR_COUNT),
                (95, 4_000, search.HISTOGRAM), (99, 1_000, search.HISTOGRAM), (95, 7, search.HISTOGRAM),
                (0, 1_250_000, search.KERNEL_MICROS), (0, 500_000, search.KERNEL_MICROS),
                (0, 1_234, search.TASK_ROWS), (0, 66, search.TASK_ROWS), (0, 10**10, search.COMPARISONS),
                (0, 5, search.COMPARISONS), (0, 3 * 10**10, search.ALL_PAIRS), (0, 700, search.ATTACHED)]
    rows += [(index, count, 0.0, level) for index, count, level in counters]
    edges = spark.createDataFrame(rows, search.EDGES_SCHEMA).repartition(4)
    stats = search.search_stats(edges, 2)
    assert stats.forest_edges == [levels.count(0), levels.count(1)]
    assert stats.pair_counts == [5_000, 900]
    assert stats.histogram[95] == 4_007 and stats.histogram[99] == 1_000 and sum(stats.histogram) == 5_007
    assert stats.kernel_seconds == 1.75 and stats.task_rows == 1_300
    assert (stats.comparisons_done, stats.comparisons_all_pairs, stats.rows_attached) == (10**10 + 5, 3 * 10**10, 700)


@pytest.mark.parametrize("paired", [None, 2])
def test_bucket_counts_match_a_count_of_every_rows_buckets(spark, paired):
    """Rows per bucket and per pair of buckets (what packing works from), against a plain count over
    each row's distinct buckets; with ``paired`` 2, only pairs inside each round's two slots."""
    from itertools import combinations

    from dedup_spark.bucket import ASSIGNED_SCHEMA, bucket_counts
    from dedup_spark.tables import packed_binary

    rng = np.random.default_rng(5)
    rows, width = 5_000, 4
    # Two rounds of two slots, round 1's ids above round 0's; a repeat is a bucket the margin dropped.
    slots = np.concatenate([rng.choice([0, 1, 2, 3, 3], (rows, 2)), rng.choice([10, 11, 12], (rows, 2))], axis=1)
    slots = np.sort(slots, axis=1).astype(np.int32)
    assigned = spark.createDataFrame(
        pa.table({"row_id": pa.array(np.arange(rows)), "buckets": packed_binary(slots)}).to_pandas(),
        ASSIGNED_SCHEMA).repartition(3)
    sizes, shared = bucket_counts(assigned, width, paired)
    assert sizes == dict(Counter(int(b) for row in slots for b in set(row.tolist())))
    runs = [slots] if paired is None else [slots[:, :2], slots[:, 2:]]
    expected = Counter(pair for run in runs for row in run for pair in combinations(sorted(set(row.tolist())), 2))
    assert {(int(a), int(b)): int(n) for a, b, n in shared} == dict(expected)


def test_block_split_search_gives_the_unsplit_pairs(spark, tmp_path):
    sample = generate(SampleSpec(rows=3000, dim=32, seed=42))
    write_npy_shards(sample.embeddings, tmp_path / "in", 1000)
    out = tmp_path / "out"
    report = run_job(spark, tmp_path / "in", out, bucketing__k=1, search__max_task_rows=500, output__pairs="all")
    assert report["bucketing"]["split_buckets"] == 1 and report["bucketing"]["search_tasks"] > 50
    assert report["bucketing"]["largest_task_rows"] <= 500
    assert set(output_pairs(out)) == set(brute_force_pairs(normalize(sample.embeddings), THRESHOLD))


def test_low_memory_run_with_a_50k_copy_group_an_oversized_cluster_and_distinct_captions(tmp_path):
    """1g driver and executors. The 50,000 copies carry captions drawn from 300 random ones, and
    captions.policy keep_distinct keeps one copy per distinct caption: caption clustering of a
    group larger than the issue's 20,000 copies, in bounded memory."""
    rows, expected = giant_group_data(copies=50_000, others=10_000, dim=32, seed=43)
    rng = np.random.default_rng(44)
    pool = [random_caption(rng) for _ in range(300)]
    assert max(exact_jaccard(a, b) for a, b in itertools.combinations(pool, 2)) < 0.3
    giant = Counter(expected.values()).most_common(1)[0][0]
    in_giant = np.array([expected.get(row) == giant for row in range(len(rows))])
    captions = [pool[rng.integers(len(pool))] if in_giant[row] else random_caption(rng) for row in range(len(rows))]
    (tmp_path / "in" / "img_emb").mkdir(parents=True)
    (tmp_path / "in" / "metadata").mkdir()
    for index, start in enumerate(range(0, len(rows), 20_000)):
        np.save(tmp_path / "in" / "img_emb" / f"img_emb_{index}.npy", rows[start:start + 20_000])
        pq.write_table(pa.table({"key": [f"{row:06d}" for row in range(start, min(start + 20_000, len(rows)))],
                                 "caption": captions[start:start + 20_000]}),
                       tmp_path / "in" / "metadata" / f"metadata_{index}.parquet")
    out = tmp_path / "out"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]", "--driver-memory", "1g",
         "--conf", "spark.executor.memory=1g", "--conf", "spark.ui.enabled=false",
         str(REPO / "jobs" / "dedup.py"), "--input", str(tmp_path / "in"), "--output", str(out),
         "--set", "bucketing.k=4", "--set", "search.max_task_rows=16000", "--set", "captions.policy=keep_distinct"],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["bucketing"]["bucket_sizes"]["max"] > report["bucketing"]["max_task_rows"], "a bucket must be oversized"
    assert report["bucketing"]["split_buckets"] >= 1
    assert report["bucketing"]["largest_task_rows"] <= report["bucketing"]["max_task_rows"] * 1.05
    assert output_groups(out) == expected
    # One copy per distinct caption survives in the giant group; every other group's members have
    # unrelated random captions, so they all survive.
    duplicates = pq.read_table(sorted((out / "duplicates").glob("part-*.parquet"))).to_pylist()
    kept_giant = [row["row_id"] for row in duplicates if row["is_kept"] and row["group_id"] == giant]
    used = {captions[row] for row in np.flatnonzero(in_giant)}
    assert sorted(captions[row] for row in kept_giant) == sorted(used)
    assert all(row["is_kept"] for row in duplicates if row["group_id"] != giant)
    assert report["accounting"]["removed_rows"] == int(in_giant.sum()) - len(used)
    assert report["accounting"]["balanced"]


def test_the_task_cap_derives_from_memory_and_dimension():
    config = config_module.JobConfig()
    from dedup_spark.bucket import max_task_rows

    small, large = max_task_rows(256 << 20, 768, config), max_task_rows(1 << 30, 768, config)
    assert small < large and max_task_rows(256 << 20, 32, config) > small
    assert small * (8 * 768 + 128) <= 128 << 20  # the rows fit in half of the task's memory
    assert max_task_rows(1 << 30, 768, config.replace({"search.max_task_rows": 5000})) == 5000


def test_hnsw_assignment_in_the_pipeline(spark, tmp_path):
    sample = generate(SampleSpec(rows=4000, dim=32, seed=44))
    write_npy_shards(sample.embeddings, tmp_path / "in", 2000)
    out = tmp_path / "out"
    report = run_job(spark, tmp_path / "in", out, bucketing__k=40, bucketing__assign="auto", bucketing__hnsw_min_k=32,
                     output__pairs="all")
    assert report["bucketing"]["assign"] == "hnsw"
    oracle = set(brute_force_pairs(normalize(sample.embeddings), THRESHOLD))
    found = set(output_pairs(out))
    assert found <= oracle and len(found) / len(oracle) >= 0.97

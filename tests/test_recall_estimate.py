"""The recall self-estimate against the true recall computed by brute force."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_sample, output_groups, run_job
from oracle import brute_force_pairs, normalize

from dedup_spark.estimate import ratio_interval


@pytest.fixture(scope="module")
def lossy(tmp_path_factory):
    sample, root = make_sample(tmp_path_factory.mktemp("estimate"), rows=12_000, dim=64, seed=51)
    return sample, root, brute_force_pairs(normalize(sample.embeddings), 0.95)


def test_interval_contains_the_true_recall_when_recall_is_clearly_below_one(spark, lossy, tmp_path):
    sample, root, oracle = lossy
    out = tmp_path / "out"
    report = run_job(spark, root, out, bucketing__k=400, bucketing__m=1, estimate__sample_rows=1500)
    groups = output_groups(out)
    true_recall = sum(1 for a, b in oracle if a in groups and groups.get(a) == groups.get(b)) / len(oracle)
    estimate = report["recall_estimate"]
    assert true_recall < 0.97, f"settings should lose pairs, true closure recall {true_recall}"
    low, high = estimate["closure_recall_ci95"]
    assert low <= true_recall <= high, (true_recall, estimate)
    assert high - low < 0.1 and estimate["true_pairs_seen"] > 100
    assert 0 < estimate["fraction_of_run"] < 1


def test_exhaustive_settings_estimate_exactly_one(spark, lossy, tmp_path):
    sample, root, oracle = lossy
    report = run_job(spark, root, tmp_path / "out", bucketing__k=1, output__pairs="all", estimate__sample_rows=300)
    estimate = report["recall_estimate"]
    assert estimate["closure_recall"] == 1.0 and estimate["direct_recall"] == 1.0
    assert estimate["closure_recall_ci95"] == [1.0, 1.0]
    assert estimate["true_pairs_seen"] > 0


def test_ratio_interval_is_the_clustered_ratio_estimate():
    true = np.array([10, 0, 4, 6, 0, 2], dtype=float)
    closed = np.array([10, 0, 2, 6, 0, 1], dtype=float)
    ratio, low, high = ratio_interval(closed, true)
    assert ratio == pytest.approx(19 / 22)
    residual = closed - ratio * true
    half = 1.96 * np.sqrt(np.sum(residual**2) / (6 * 5 * true.mean() ** 2))
    assert (low, high) == pytest.approx((ratio - half, min(1.0, ratio + half)))

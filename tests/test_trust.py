"""Results users can trust (issue 5): the recall self-estimate against brute force,
several bucketings and LSH, threshold calibration, and report.html."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import check_html_numbers, make_sample, output_groups, output_pairs, run_job
from oracle import brute_force_pairs, normalize

from dedup_spark.config import BucketingConfig
from dedup_spark.estimate import ratio_interval


@pytest.fixture(scope="module")
def lossy(tmp_path_factory):
    sample, root = make_sample(tmp_path_factory.mktemp("estimate"), rows=12_000, dim=64, seed=51)
    return sample, root, brute_force_pairs(normalize(sample.embeddings), 0.95)


def test_interval_contains_the_true_recall_when_recall_is_clearly_below_one(spark, lossy, tmp_path):
    sample, root, oracle = lossy
    out = tmp_path / "out"
    # Lossy on purpose (one bucket a row, and no merging of near-copy centroids, which finds more).
    report = run_job(spark, root, out, bucketing__k=400, bucketing__m=1, bucketing__merge_centroids=None,
                     estimate__sample_rows=2000)
    groups = output_groups(out)
    true_recall = sum(1 for a, b in oracle if a in groups and groups.get(a) == groups.get(b)) / len(oracle)
    estimate = report["recall_estimate"]
    assert true_recall < 0.97, f"settings should lose pairs, true closure recall {true_recall}"
    low, high = estimate["closure_recall_ci95"]
    assert low <= true_recall <= high, (true_recall, estimate)
    # Pairs come in clusters (a sampled row of a large group brings many): 2,000 of 12,000 rows give
    # a ~0.09-wide interval at this recall; 1,500 gave 0.10.
    assert high - low < 0.1 and estimate["true_pairs_seen"] > 100
    # The probe comparisons run inside the assign stage's tasks; their time is still counted.
    assert estimate["probe_task_seconds"] > 0 and 0 < estimate["fraction_of_run"] < 1


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


def _found_and_recall(out, oracle) -> tuple[set, float]:
    found = set(output_pairs(out))
    return found, len(found & set(oracle)) / len(oracle)


def test_more_buckets_per_row_or_more_rounds_never_lose_pairs_and_raise_recall(spark, lossy, tmp_path):
    sample, root, oracle = lossy
    lossy_settings = {"bucketing__k": 400, "output__pairs": "all", "estimate__sample_rows": 0,
                      "bucketing__merge_centroids": None}
    run_job(spark, root, tmp_path / "one", bucketing__m=1, **lossy_settings)
    run_job(spark, root, tmp_path / "m2", bucketing__m=2, **lossy_settings)
    report = run_job(spark, root, tmp_path / "rounds3", bucketing__m=1, bucketing__rounds=3, **lossy_settings)
    one, recall_one = _found_and_recall(tmp_path / "one", oracle)
    wider, recall_wider = _found_and_recall(tmp_path / "m2", oracle)
    rounds, recall_rounds = _found_and_recall(tmp_path / "rounds3", oracle)
    assert one <= wider and one <= rounds, "a wider search lost pairs the narrower one found"
    assert wider <= set(oracle) and rounds <= set(oracle)
    assert recall_one < 0.97 and recall_wider > recall_one + 0.02 and recall_rounds > recall_one + 0.02, (
        recall_one, recall_wider, recall_rounds)
    assert report["bucketing"]["rounds"] == 3 and report["search"]["pairs_found"] == len(rounds)


def test_lsh_bucketing_finds_only_true_pairs_and_reports_its_recall(spark, lossy, tmp_path):
    sample, root, oracle = lossy
    out = tmp_path / "lsh"
    report = run_job(spark, root, out, bucketing__method="lsh", output__pairs="all", estimate__sample_rows=600)
    found, recall = _found_and_recall(out, oracle)
    assert found <= set(oracle), f"{len(found - set(oracle))} LSH pairs are not duplicates by brute force"
    assert report["bucketing"]["method"] == "lsh" and report["bucketing"]["rounds"] == 8
    assert report["search"]["pairs_found"] == len(found)
    assert recall > 0.8, recall
    estimate = report["recall_estimate"]
    low, high = estimate["direct_recall_ci95"]
    assert low - 0.02 <= recall <= high + 0.02, (recall, estimate)


@pytest.fixture(scope="module")
def calibrated(spark, tmp_path_factory):
    """One run that calibrates three more thresholds from one search at 0.93."""
    directory = tmp_path_factory.mktemp("calibrate")
    sample, root = make_sample(directory, rows=4_000, dim=48, seed=57)
    out = directory / "out"
    report = run_job(spark, root, out, search__threshold=0.93, search__thresholds=[0.95, 0.97, 0.99],
                     bucketing__k=20, bucketing__m=2, estimate__sample_rows=100)
    return sample, root, out, report


def test_per_threshold_counts_equal_separate_runs(spark, calibrated, tmp_path):
    sample, root, out, report = calibrated
    rows = {entry["threshold"]: entry for entry in report["calibration"]}
    assert sorted(rows) == [0.93, 0.95, 0.97, 0.99]
    assert rows[0.93]["pairs"] == report["search"]["pairs_found"]
    assert rows[0.93]["removed_rows"] == report["accounting"]["removed_rows"]
    counts = [rows[t]["removed_rows"] for t in sorted(rows)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] > 0
    for threshold in (0.95, 0.99):
        # The same buckets as the calibrated run: bucketing.margin is a fraction of the distance of a
        # pair at the threshold, so it is scaled to keep the 0.93 run's absolute margin.
        margin = BucketingConfig().margin * ((1 - 0.93) / (1 - threshold)) ** 0.5
        separate = run_job(spark, root, tmp_path / f"at-{threshold}", search__threshold=threshold,
                           bucketing__k=20, bucketing__m=2, bucketing__margin=margin, estimate__sample_rows=0,
                           output__pairs="all")
        assert rows[threshold]["pairs"] == separate["search"]["pairs_found"] == len(output_pairs(tmp_path / f"at-{threshold}"))
        assert rows[threshold]["groups"] == separate["groups"]["count"]
        assert rows[threshold]["removed_rows"] == separate["accounting"]["removed_rows"]
    histogram = report["similarity_histogram"]
    assert sum(histogram["counts"]) == report["search"]["pairs_found"]
    assert histogram["edges"][0] == 0.93 and histogram["edges"][-1] == 1.0


def test_thresholds_below_the_search_threshold_are_refused():
    from dedup_spark import config as config_module

    with pytest.raises(config_module.ConfigError, match="search.thresholds"):
        config_module.load(None, {"search.threshold": 0.95, "search.thresholds": "0.9,0.97"})
    assert config_module.load(None, {"search.thresholds": "0.96,0.98"}).search.thresholds == [0.96, 0.98]


def test_report_html_is_self_contained_and_shows_report_json_numbers(calibrated):
    sample, root, out, report = calibrated
    page = (out / "report.html").read_text()
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert not re.search(r"https?://", page, re.IGNORECASE), "report.html refers to the network"
    assert not re.search(r"<(script|link|img|iframe)\b", page, re.IGNORECASE)
    assert page.count("<svg") >= 4  # similarity, group sizes, bucket sizes, stages
    keys = check_html_numbers(page, report)
    for needed in ("accounting.input_rows", "accounting.kept_rows", "accounting.removed_rows", "accounting.balanced",
                   "recall_estimate.closure_recall", "calibration.3.removed_rows", "timings_seconds.total",
                   "blas.executor.openblas.numpy", "blas.executor.openblas.faiss"):
        assert needed in keys, needed
    # The largest groups and the size distribution, against the published duplicates table.
    duplicates = pq.read_table(sorted((out / "duplicates").glob("part-*.parquet"))).to_pandas()
    sizes = duplicates.groupby("group_id").size()
    assert [entry["size"] for entry in report["largest_groups"]] == sorted(sizes, reverse=True)[:50]
    assert dict(map(tuple, report["group_sizes"])) == sizes.value_counts().to_dict()
    assert [size for size, _ in report["group_sizes"]] == sorted(set(sizes))  # ascending, as the chart draws them
    largest = report["largest_groups"][0]
    kept = duplicates[duplicates.is_kept & (duplicates.group_id == largest["group_id"])].row_id.item()
    assert largest["members"][0]["row_id"] == kept and largest["members"][0]["caption"] == sample.captions[kept]
    assert f"img.example.com/{sample.topic[kept]}/{kept:09d}.jpg" in page

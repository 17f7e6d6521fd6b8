"""Atomic publish, resume of failed runs, and the refusal cases."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import make_sample, run_job

from dedup_spark.faults import InjectedFault
from dedup_spark.publish import OutputError


def published(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "_work" not in p.parts)


def same_outputs(first, second) -> None:
    for table in ("duplicates", "pairs", "rejected"):
        a = pq.read_table(sorted((first / table).glob("part-*.parquet")))
        b = pq.read_table(sorted((second / table).glob("part-*.parquet")))
        assert sorted(a.to_pylist(), key=str) == sorted(b.to_pylist(), key=str), table
    for shard in sorted((first / "dedup" / "img_emb").glob("*.npy")):
        assert np.array_equal(np.load(shard), np.load(second / "dedup" / "img_emb" / shard.name))
    assert np.array_equal(np.load(first / "model" / "centroids.npy"), np.load(second / "model" / "centroids.npy"))


def test_failed_run_publishes_nothing_and_the_rerun_resumes(spark, tmp_path, caplog):
    sample, root = make_sample(tmp_path, rows=6000, dim=32, seed=31)
    out = tmp_path / "out"
    settings = {"bucketing__k": 12, "output__pairs": "all"}
    with pytest.raises(InjectedFault):
        run_job(spark, root, out, faults={"fail_after_stage": "search"}, **settings)
    assert not (out / "_SUCCESS").exists()
    assert published(out) == [], "a failed run must not publish anything"

    # A relevant setting changed: the stages before it are reused, the rest recomputed.
    with pytest.raises(InjectedFault):
        run_job(spark, root, out, faults={"fail_after_stage": "search"}, search__threshold=0.96, **settings)
    assert published(out) == []

    caplog.set_level(logging.INFO, logger="dedup_spark")
    caplog.clear()
    report = run_job(spark, root, out, search__threshold=0.96, **settings)
    assert report["stages_reused"] == ["read", "train", "assign", "search"]
    assert sum("reused from an earlier run" in r.getMessage() for r in caplog.records) == 4
    assert (out / "_SUCCESS").exists() and not (out / "_work").exists()

    clean = tmp_path / "clean"
    clean_report = run_job(spark, root, clean, search__threshold=0.96, **settings)
    assert clean_report["stages_reused"] == []
    same_outputs(out, clean)
    assert report["accounting"] == clean_report["accounting"]


def test_changing_the_threshold_after_a_failed_search_reuses_only_earlier_stages(spark, tmp_path):
    sample, root = make_sample(tmp_path, rows=3000, dim=32, seed=32)
    out = tmp_path / "out"
    with pytest.raises(InjectedFault):
        run_job(spark, root, out, faults={"fail_after_stage": "group"}, bucketing__k=6)
    report = run_job(spark, root, out, bucketing__k=6, search__threshold=0.97)
    # The threshold scales which near-copy centroids are merged, so the model is trained again.
    assert report["stages_reused"] == ["read"]
    # Without merging the k-means model is kept; assignment is redone, since the threshold scales
    # bucketing.margin.
    unmerged = tmp_path / "unmerged"
    with pytest.raises(InjectedFault):
        run_job(spark, root, unmerged, faults={"fail_after_stage": "group"}, bucketing__k=6, bucketing__merge_centroids=None)
    report = run_job(spark, root, unmerged, bucketing__k=6, bucketing__merge_centroids=None, search__threshold=0.97)
    assert report["stages_reused"] == ["read", "train"]
    # Without the margin and without the recall probes (run_job turns them off; they ride on the
    # assign scan and are compared at the threshold), assignment does not depend on the threshold.
    without_margin = tmp_path / "without-margin"
    fixed = {"bucketing__k": 6, "bucketing__margin": None, "bucketing__merge_centroids": None}
    with pytest.raises(InjectedFault):
        run_job(spark, root, without_margin, faults={"fail_after_stage": "group"}, **fixed)
    report = run_job(spark, root, without_margin, search__threshold=0.97, **fixed)
    assert report["stages_reused"] == ["read", "train", "assign"]
    with_probes = tmp_path / "with-probes"
    settings = {**fixed, "estimate__sample_rows": 64}
    with pytest.raises(InjectedFault):
        run_job(spark, root, with_probes, faults={"fail_after_stage": "group"}, **settings)
    report = run_job(spark, root, with_probes, search__threshold=0.97, **settings)
    assert report["stages_reused"] == ["read", "train"]
    assert report["recall_estimate"]["sample_rows"] == 64


def test_refuses_output_inside_the_input(spark, tmp_path):
    sample, root = make_sample(tmp_path, rows=300, dim=16)
    with pytest.raises(OutputError, match="inside"):
        run_job(spark, root, root / "out")
    with pytest.raises(OutputError, match="inside"):
        run_job(spark, root, root)
    with pytest.raises(OutputError, match="inside"):
        run_job(spark, root / "img_emb", root)


def test_refuses_to_replace_a_published_output_without_overwrite(spark, tmp_path):
    sample, root = make_sample(tmp_path, rows=500, dim=16)
    out = tmp_path / "out"
    run_job(spark, root, out, bucketing__k=1)
    before = (out / "report.json").read_bytes()
    with pytest.raises(OutputError, match="--overwrite"):
        run_job(spark, root, out, bucketing__k=1)
    assert (out / "report.json").read_bytes() == before
    first = set(json.loads((out / "_SUCCESS").read_text())["files"])
    (out / "notes.txt").write_text("not the job's")
    report = run_job(spark, root, out, bucketing__k=1, output__overwrite=True)
    second = set(json.loads((out / "_SUCCESS").read_text())["files"])
    assert report["accounting"]["balanced"]
    # --overwrite removes exactly what the replaced result published (its tables' parts are named
    # by run, so they all change), and nothing else.
    assert first - second and not any((out / name).exists() for name in first - second)
    assert all((out / name).exists() for name in second)
    assert (out / "notes.txt").read_text() == "not the job's"


def test_a_kept_work_prefix_is_reused_and_still_publishes_every_output(spark, tmp_path):
    # A kept work prefix must stay whole after publishing: a rerun with --overwrite reuses its
    # stages, and what it publishes must not lack the outputs of the reused ones.
    sample, root = make_sample(tmp_path, rows=500, dim=16)
    out = tmp_path / "out"
    first = run_job(spark, root, out, bucketing__k=1, run__keep_work=True)
    assert (out / "_work" / "read").exists()
    kept = tmp_path / "first"
    shutil.copytree(out, kept, ignore=shutil.ignore_patterns("_work"))
    again = run_job(spark, root, out, bucketing__k=1, run__keep_work=True, output__overwrite=True)
    assert again["stages_reused"] == ["read", "train", "assign", "search", "group", "estimate", "write", "index"]
    assert len(published(out)) == len(published(kept))
    same_outputs(kept, out)
    assert again["accounting"] == first["accounting"]

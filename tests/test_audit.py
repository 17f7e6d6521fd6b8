"""jobs/audit.py (issue 6, item 2): replication audits and decontamination, against brute force."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import make_sample, output_groups, read_table, run_job
from oracle import cosine, normalize

from dedup_spark import config as config_module
from dedup_spark.audit import run_audit

THRESHOLD = 0.95


@pytest.fixture(scope="module")
def audited(spark, tmp_path_factory):
    """A training set, its dedup run, and queries: near-copies of known rows plus unrelated ones."""
    directory = tmp_path_factory.mktemp("audit")
    sample, root = make_sample(directory, rows=2000, dim=32, seed=71)
    dedup_out = directory / "dedup-run"
    run_job(spark, root, dedup_out, estimate__sample_rows=0)
    rng = np.random.default_rng(72)
    train = normalize(sample.embeddings)
    sources = rng.choice(len(train), 30, replace=False)
    copies = train[sources] + 0.02 * rng.standard_normal((30, 32)).astype(np.float32)
    unrelated = rng.standard_normal((30, 32)).astype(np.float32)
    queries = np.concatenate([copies, unrelated]).astype(np.float32)
    (directory / "queries").mkdir()
    np.save(directory / "queries" / "generated.npy", queries)
    stored_queries = normalize(queries)
    query_index, train_index = np.meshgrid(np.arange(len(queries)), np.arange(len(train)), indexing="ij")
    scores = cosine(stored_queries[query_index.ravel()], train[train_index.ravel()]).reshape(query_index.shape)
    truth = {(int(q), int(r)) for q, r in zip(*np.nonzero(scores >= THRESHOLD), strict=True)}
    return sample, root, dedup_out, directory / "queries", sources, truth


def _audit(spark, queries, train, out, **settings):
    overrides = {"audit.queries_uri": str(queries), "input.uri": str(train), "output.uri": str(out),
                 "search.threshold": THRESHOLD, **{k.replace("__", "."): v for k, v in settings.items()}}
    return run_audit(config_module.load(None, overrides), spark)


def test_planted_copies_match_their_rows_and_unrelated_queries_match_nothing(spark, audited, tmp_path):
    sample, root, dedup_out, queries, sources, truth = audited
    report = _audit(spark, queries, dedup_out, tmp_path / "audit")
    matches = read_table(tmp_path / "audit" / "matches").to_pylist()
    found = {(m["query_id"], m["row_id"]) for m in matches}
    assert found == truth, "matches must equal the brute-force query x train pairs"
    for query, source in enumerate(sources):
        assert (query, int(source)) in found, f"planted copy {query} of row {source} not matched"
    assert not any(query >= 30 for query, _ in found), "unrelated queries matched something"
    assert report["train"]["dedup_run"] and report["queries_with_match"] == 30
    assert report["fraction_of_queries_matched"] == pytest.approx(0.5)
    groups = output_groups(dedup_out)
    sizes = {row: sum(1 for g in groups.values() if g == group) for row, group in groups.items()}
    for match in matches:
        assert match["group_size"] == sizes.get(match["row_id"], 1)
        assert match["caption"] == sample.captions[match["row_id"]]
    assert report["group_sizes"]["matched_rows"]["rows"] == len({r for _, r in found})
    assert report["group_sizes"]["random_training_rows"]["rows"] > 1000
    assert report["top_matches"][0]["similarity"] == pytest.approx(max(m["similarity"] for m in matches), abs=1e-5)
    assert json.loads((tmp_path / "audit" / "audit_report.json").read_text())["matches"] == len(matches)


def test_exclude_removes_exactly_the_rows_within_the_threshold_of_some_query(spark, audited, tmp_path):
    sample, root, dedup_out, queries, sources, truth = audited
    out = tmp_path / "decontaminate"
    report = _audit(spark, queries, root, out, audit__exclude=True)
    assert not report["train"]["dedup_run"]
    matched = sorted({row for _, row in truth})
    counts = report["decontamination"]
    assert counts["removed_rows"] == len(matched) and counts["balanced"]
    kept = np.concatenate([np.load(p) for p in sorted((out / "decontaminated" / "img_emb").glob("*.npy"))])
    keys = [k for p in sorted((out / "decontaminated" / "metadata").glob("*.parquet"))
            for k in pq.read_table(p).column("key").to_pylist()]
    expected = [i for i in range(len(sample.embeddings)) if i not in set(matched)]
    assert keys == [f"{i:09d}" for i in expected]
    assert kept.shape[0] == len(expected) == counts["kept_rows"] == counts["written_rows"]

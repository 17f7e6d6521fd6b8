"""The library API: ``deduplicate(df)`` on a DataFrame built in memory and on a catalog table gives
the command line's groups, kept and removed rows, and the brute-force oracle's; the caller's
session is left as it was; results carry the caller's key."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import make_sample, output_groups, read_table, run_job
from oracle import brute_force_pairs, groups_of, normalize
from pyspark.sql import functions as F

from dedup_spark import deduplicate

REPO = Path(__file__).resolve().parent.parent
# m = k: every row in every bucket, so the search is exhaustive and the oracle is exact.
EXHAUSTIVE = {"bucketing": {"k": 3, "m": 3}, "estimate": {"sample_rows": 0}, "captions": {"column": None}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A parquet sample with an integer id column, the same rows as an in-memory DataFrame's."""
    directory = tmp_path_factory.mktemp("api")
    sample, root = make_sample(directory, rows=1500, dim=24, seed=91, fmt="parquet", id_column="photo_id",
                               shard_rows=500)
    truth = pq.read_table(directory / f"{root.name}_ground_truth.parquet")
    return sample, root, truth.column("row_id").to_numpy()


def _frame(spark, sample, ids):
    rows = [(int(i), v.astype(np.float32).tolist(), c, f"k{int(i):07d}")
            for i, v, c in zip(ids, sample.embeddings, sample.captions)]
    return spark.createDataFrame(rows, "photo_id long, embedding array<float>, caption string, key string")


def _groups(duplicates) -> dict[int, int]:
    return {int(r["row_id"]): int(r["group_id"]) for r in duplicates.select("row_id", "group_id").collect()}


def _session_state(spark) -> dict:
    level = spark.sparkContext._jvm.org.apache.logging.log4j.LogManager.getRootLogger().getLevel().toString()
    return {"conf": dict(spark.conf.getAll), "log level": level, "environment": dict(os.environ)}


def test_a_dataframe_and_a_catalog_table_give_the_command_lines_and_the_oracles_groups(spark, data, tmp_path):
    sample, root, ids = data
    oracle = groups_of(brute_force_pairs(normalize(sample.embeddings), 0.95, ids))
    cli_out = tmp_path / "cli"
    run_job(spark, root, cli_out, input__id_column="photo_id", bucketing__k=3, bucketing__m=3)
    cli_groups = output_groups(cli_out)
    cli_kept = {int(i) for f in sorted(cli_out.glob("dedup/*.parquet")) for i in pq.read_table(f)["photo_id"].to_pylist()}
    assert cli_groups == oracle

    before = _session_state(spark)
    frame = _frame(spark, sample, ids)
    spark.sql("drop table if exists api_images")
    frame.write.saveAsTable("api_images")
    for source in (frame, spark.table("api_images")):
        with deduplicate(source, id_col="photo_id", **EXHAUSTIVE) as result:
            assert _groups(result.duplicates) == oracle == cli_groups
            assert result.kept.columns == frame.columns
            kept = result.kept.select("photo_id", "embedding").collect()
            assert {r["photo_id"] for r in kept} == cli_kept
            by_id = dict(zip(ids.tolist(), sample.embeddings.astype(np.float32)))
            assert all(np.array_equal(np.asarray(r["embedding"], np.float32), by_id[r["photo_id"]]) for r in kept[:50])
            removed = {r["photo_id"] for r in result.duplicates.where("not is_kept").collect()}
            assert removed == {row for row, group in oracle.items() if row != group}
            assert result.report["accounting"]["balanced"] and result.rejected.count() == 0
            work = result.work_dir
        assert not Path(work).exists(), "the work prefix is removed with the result"
    assert _session_state(spark) == before, "the caller's session and environment must be left as they were"


def test_a_string_id_is_carried_as_the_key_and_results_can_be_written_in_the_cli_layout(spark, data, tmp_path):
    sample, root, ids = data
    frame = _frame(spark, sample, ids).drop("photo_id")
    result = deduplicate(frame, id_col="key", **EXHAUSTIVE)
    try:
        assert result.kept.columns == frame.columns
        duplicates = result.duplicates.select("row_id", "group_id", "is_kept", "key").collect()
        assert all(r["key"] is not None and r["key"].startswith("k") for r in duplicates)
        # The key identifies the same rows the oracle groups, whatever row ids were generated.
        by_key = {r["key"]: r for r in duplicates}
        key_of = {int(i): f"k{int(i):07d}" for i in ids}
        oracle = groups_of(brute_force_pairs(normalize(sample.embeddings), 0.95, ids))
        assert set(by_key) == {key_of[row] for row in oracle}
        same_group: dict[int, set[str]] = {}
        for r in duplicates:
            same_group.setdefault(r["group_id"], set()).add(r["key"])
        assert sorted(map(sorted, same_group.values())) == sorted(
            sorted(key_of[m] for m in members) for members in _members(oracle).values())
        published = result.write(str(tmp_path / "out"))
        assert "report.json" in published and (tmp_path / "out" / "_SUCCESS").exists()
        written = read_table(tmp_path / "out" / "duplicates")
        assert sorted(written.column("key").to_pylist()) == sorted(by_key)
        kept_files = sorted((tmp_path / "out" / "dedup").glob("*.parquet"))
        assert sum(pq.read_metadata(f).num_rows for f in kept_files) == result.report["accounting"]["kept_rows"]
    finally:
        result.cleanup()
    # A second call in the same session works.
    again = deduplicate(frame.limit(200), id_col="key", **EXHAUSTIVE)
    assert again.report["accounting"]["input_rows"] == 200
    again.cleanup()


def _members(groups: dict[int, int]) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    for row, group in groups.items():
        members.setdefault(group, []).append(row)
    return members


def test_the_command_line_reads_a_catalog_table(spark, data, tmp_path, capsys):
    sample, root, ids = data
    spark.sql("drop table if exists api_cli_images")
    _frame(spark, sample, ids).write.saveAsTable("api_cli_images")
    sys.path.insert(0, str(REPO / "jobs"))
    import dedup as cli

    out = tmp_path / "out"
    code = cli.main(["--table", "default.api_cli_images", "--output", str(out), "--set", "input.id_column=photo_id",
                     "--set", "bucketing.k=3", "--set", "bucketing.m=3", "--set", "captions.column=null"])
    assert code == 0, capsys.readouterr().err
    assert output_groups(out) == groups_of(brute_force_pairs(normalize(sample.embeddings), 0.95, ids))
    report = json.loads((out / "report.json").read_text())
    assert report["accounting"]["balanced"] and report["input"]["format"] == "parquet"


def test_duplicates_and_rejected_carry_the_rows_key(spark, tmp_path):
    # LAION layout: the metadata's key column.
    sample, root = make_sample(tmp_path, rows=800, dim=16, seed=92, shard_rows=400)
    raw = np.load(root / "img_emb" / "img_emb_1.npy")
    raw[5] = np.nan
    np.save(root / "img_emb" / "img_emb_1.npy", raw)
    run_job(spark, root, tmp_path / "laion")
    duplicates = read_table(tmp_path / "laion" / "duplicates").to_pylist()
    assert duplicates and all(r["key"] == f"{r['row_id']:09d}" for r in duplicates)
    rejected = read_table(tmp_path / "laion" / "rejected").to_pylist()
    assert [(r["row_id"], r["key"]) for r in rejected] == [(405, "000000405")]
    # Parquet with an id column: that column.
    sample, root = make_sample(tmp_path, rows=800, dim=16, seed=93, fmt="parquet", id_column="photo_id")
    run_job(spark, root, tmp_path / "parquet", input__id_column="photo_id")
    duplicates = read_table(tmp_path / "parquet" / "duplicates").to_pylist()
    assert duplicates and all(r["photo_id"] == r["row_id"] for r in duplicates)


def test_an_embedding_column_of_another_type_is_a_clear_error(spark):
    frame = spark.range(5).withColumn("embedding", F.lit("not a vector"))
    with pytest.raises(ValueError, match="expected an array of floats"):
        deduplicate(frame)


def test_a_reference_is_refused_by_the_dataframe_call(spark):
    """An incremental run is the files job's: deduplicate() says so instead of ignoring the setting."""
    frame = spark.range(5).withColumn("embedding", F.array(F.lit(1.0), F.lit(0.0)))
    with pytest.raises(ValueError, match="--reference"):
        deduplicate(frame, input={"reference": "/some/published/output"})

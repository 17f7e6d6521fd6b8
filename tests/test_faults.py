"""Bad input and faults (issue 7): clear errors, quarantine, accounting, and
outputs unchanged by task retries. The S3 fault cases are in test_object_storage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_sample, read_table, run_job

from dedup_spark import config as config_module
from dedup_spark.pipeline import OutputError, run
from dedup_spark.read import InputError
from dedup_spark.report import AccountingError


def _vectors(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def _npy(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def _truncate(path: Path, keep: float) -> None:
    payload = path.read_bytes()
    path.write_bytes(payload[: int(len(payload) * keep)])


def _laion(root: Path, rows: int = 40, meta_rows: int | None = None) -> None:
    _npy(root / "img_emb" / "img_emb_0.npy", _vectors(rows, 16))
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    count = rows if meta_rows is None else meta_rows
    pq.write_table(pa.table({"key": [str(i) for i in range(count)]}), root / "metadata" / "metadata_0.parquet")


def _parquet(root: Path, embedding: pa.Array, name: str = "embedding") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(embedding))), name: embedding}), root / "part-0.parquet")
    return root / "part-0.parquet"


def _bad_input(case: str, root: Path) -> dict:
    """Build one kind of bad input under ``root``; return config overrides the case needs."""
    if case == "missing input":
        return {}
    if case == "empty directory":
        root.mkdir()
    elif case == "no embedding files":
        root.mkdir()
        (root / "README.txt").write_text("nothing here")
    elif case == "unknown format":
        _npy(root / "a.npy", _vectors(10, 16))
        return {"input.format": "csv"}
    elif case == "unsupported dtype":
        _npy(root / "a.npy", np.arange(64, dtype=np.int32).reshape(4, 16))
    elif case == "3-d array":
        _npy(root / "a.npy", _vectors(8, 16).reshape(2, 4, 16))
    elif case == "truncated npy":
        _npy(root / "a.npy", _vectors(100, 16))
        _truncate(root / "a.npy", 0.6)
    elif case == "not an npy file":
        root.mkdir()
        (root / "a.npy").write_bytes(b"\x93NUMPY garbage that is no header at all")
    elif case == "truncated parquet":
        _truncate(_parquet(root, pa.array(_vectors(50, 16).tolist(), pa.list_(pa.float32()))), 0.5)
    elif case == "mixed dimensions":
        _npy(root / "a.npy", _vectors(100, 16))
        _npy(root / "b.npy", _vectors(40, 8))
    elif case == "laion npy without metadata":
        _npy(root / "img_emb" / "img_emb_0.npy", _vectors(10, 16))
        (root / "metadata").mkdir()
    elif case == "laion metadata row count":
        _laion(root, rows=40, meta_rows=30)
    elif case == "integer embeddings":
        _parquet(root, pa.array(np.arange(80).reshape(5, 16).tolist(), pa.list_(pa.int64())))
    elif case == "missing embedding column":
        _parquet(root, pa.array(_vectors(5, 16).tolist(), pa.list_(pa.float32())), name="vector")
    elif case == "id column on npy":
        _npy(root / "a.npy", _vectors(10, 16))
        return {"input.id_column": "id"}
    elif case == "output inside the input":
        _npy(root / "a.npy", _vectors(10, 16))
        return {"output.uri": str(root / "out")}
    return {}


BAD_INPUTS = [
    ("missing input", InputError, "does not exist", False),
    ("empty directory", InputError, "holds no files", False),
    ("no embedding files", InputError, "no .npy or .parquet", False),
    ("unknown format", config_module.ConfigError, "input.format", False),
    ("unsupported dtype", InputError, "float16/32/64, found int32", True),
    ("3-d array", InputError, "2-D array", True),
    ("truncated npy", InputError, "truncated", True),
    ("not an npy file", InputError, "not a readable .npy", True),
    ("truncated parquet", InputError, "not a readable parquet", True),
    ("mixed dimensions", InputError, "mixed dimensions", True),
    ("laion npy without metadata", InputError, "no matching metadata", True),
    ("laion metadata row count", InputError, "has 40 rows but its metadata", True),
    ("integer embeddings", InputError, "must hold floats", True),
    ("missing embedding column", InputError, "no embedding column", True),
    ("id column on npy", InputError, "needs parquet", False),
    ("output inside the input", OutputError, "inside", False),
]


@pytest.mark.parametrize("case,error,message,names_file", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_error_and_publishes_nothing(spark, tmp_path, case, error, message, names_file):
    root, out = tmp_path / "in", tmp_path / "out"
    overrides = {"input.uri": str(root), "output.uri": str(out), **_bad_input(case, root)}
    with pytest.raises(error, match=message) as raised:
        run(config_module.load(None, overrides), spark)
    if names_file:
        assert str(root) in str(raised.value), f"the message should say which file: {raised.value}"
    assert "\n" not in str(raised.value)
    assert not (out / "_SUCCESS").exists()


@pytest.mark.parametrize("case", ["truncated npy", "mixed dimensions", "output inside the input"])
def test_the_command_line_says_what_and_where_in_one_line(tmp_path, capsys, case):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))
    import dedup as cli

    root = tmp_path / "in"
    overrides = _bad_input(case, root)
    output = overrides.get("output.uri", str(tmp_path / "out"))
    assert cli.main(["--input", str(root), "--output", output]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dedup.py: ") and "Traceback" not in lines[0], lines
    assert str(root) in lines[0]


def test_bad_shards_can_be_skipped_and_are_listed_and_counted(spark, tmp_path):
    root = tmp_path / "in"
    good = _vectors(300, 16, seed=3)
    good[7] = good[8]  # one duplicate pair
    _npy(root / "part_0.npy", good)
    _npy(root / "part_1.npy", _vectors(120, 16, seed=4))
    _npy(root / "part_2.npy", _vectors(100, 16, seed=5))
    _truncate(root / "part_2.npy", 0.5)
    _npy(root / "part_3.npy", _vectors(40, 8, seed=6))
    out = tmp_path / "out"
    report = run_job(spark, root, out, input__on_bad_shard="skip", bucketing__k=1)
    skipped = {entry["file"]: entry for entry in report["skipped_shards"]}
    assert sorted(skipped) == ["part_2.npy", "part_3.npy"]
    assert "truncated" in skipped["part_2.npy"]["reason"] and skipped["part_2.npy"]["rows"] is None
    assert "dimension 8" in skipped["part_3.npy"]["reason"] and skipped["part_3.npy"]["rows"] == 40
    counts = report["accounting"]
    assert counts["input_rows"] == 460 and counts["skipped_shard_rows"] == 40 and counts["removed_rows"] == 1
    assert counts["kept_rows"] + counts["removed_rows"] + counts["rejected_rows"] + 40 == 460 and counts["balanced"]
    assert sorted(p.name for p in (out / "dedup").iterdir()) == ["part_0.npy", "part_1.npy"]
    assert np.load(out / "dedup" / "part_0.npy").shape == (299, 16)


@pytest.mark.parametrize("case", ["every row rejected", "no two rows alike"])
def test_a_run_with_nothing_to_group_finishes_and_publishes_readable_empty_tables(spark, tmp_path, case):
    """Allowed to reject every row (input.max_rejected_fraction: 1), or given rows with no duplicate,
    the job finishes and accounts for every row; a published table with no rows still holds a part
    with its schema, which Spark needs to read the directory at all."""
    from dedup_spark.group import DUPLICATES_SCHEMA

    values = _vectors(50, 16, seed=3)
    if case == "every row rejected":
        values[:] = np.nan
    root = _npy(tmp_path / "in" / "a_0.npy", values).parent
    out = tmp_path / "out"
    report = run_job(spark, root, out, input__max_rejected_fraction=1.0, estimate__sample_rows=64,
                     output__pairs="all")
    rejected = 50 if case == "every row rejected" else 0
    counts = report["accounting"]
    assert (counts["kept_rows"], counts["removed_rows"], counts["rejected_rows"]) == (50 - rejected, 0, rejected)
    assert counts["balanced"] and report["groups"]["count"] == 0
    assert np.load(out / "dedup" / "a_0.npy").shape == (50 - rejected, 16)
    assert spark.read.parquet(str(out / "rejected")).count() == rejected
    for name, columns in (("duplicates", DUPLICATES_SCHEMA.names), ("pairs", ["row_id_a", "row_id_b", "similarity"])):
        table = spark.read.parquet(str(out / name))
        assert table.columns == columns and table.count() == 0


def test_rejected_rows_name_their_shard_and_too_many_fail_the_run(spark, tmp_path):
    root = tmp_path / "in"
    values = _vectors(200, 16, seed=9)
    values[[3, 5]] = np.nan
    values[9] = 0.0
    _npy(root / "a_0.npy", _vectors(100, 16, seed=8))
    _npy(root / "a_1.npy", values)
    out = tmp_path / "out"
    report = run_job(spark, root, out, bucketing__k=1)
    assert report["rejected_by_reason"] == {"not_finite": 2, "zero_norm": 1}
    rejected = read_table(out / "rejected").to_pylist()
    assert sorted((r["row_id"], r["shard"], r["shard_row"], r["reject_reason"]) for r in rejected) == [
        (103, "a_1.npy", 3, "not_finite"), (105, "a_1.npy", 5, "not_finite"), (109, "a_1.npy", 9, "zero_norm")]
    values[:120] = np.nan  # 120 of 300 rows: far over the default 10%
    _npy(root / "a_1.npy", values)
    again = tmp_path / "again"
    with pytest.raises(InputError, match=r"120 of 300 input rows were rejected .*max_rejected_fraction"):
        run_job(spark, root, again, bucketing__k=1)
    assert not (again / "_SUCCESS").exists() and not (again / "dedup").exists()
    assert run_job(spark, root, again, bucketing__k=1, input__max_rejected_fraction=0.5)["accounting"]["balanced"]


def _tables(out: Path) -> dict:
    """Every output as sorted, comparable values."""
    def rows(name: str) -> list:
        table = read_table(out / name).to_pylist()
        return sorted(tuple(sorted(row.items())) for row in table)

    dedup = {str(p.relative_to(out / "dedup")): (np.load(p) if p.suffix == ".npy" else pq.read_table(p).to_pylist())
             for p in sorted((out / "dedup").rglob("*.*"))}
    return {"duplicates": rows("duplicates"), "pairs": rows("pairs"), "rejected": rows("rejected"), "dedup": dedup}


def test_injected_task_failures_leave_the_outputs_identical(spark, tmp_path):
    sample, root = make_sample(tmp_path, rows=2000, dim=32, seed=61)
    settings = {"input__chunk_rows": 500, "bucketing__k": 8, "output__pairs": "all", "estimate__sample_rows": 50}
    clean = tmp_path / "clean"
    run_job(spark, root, clean, **settings)
    context = spark.sparkContext
    context.setJobGroup("injected-faults", "a run with failing first attempts")
    try:
        faulty = tmp_path / "faulty"
        report = run_job(spark, root, faulty, faults={"task_fraction": 0.4}, **settings)
    finally:
        context.setJobGroup("tests", "")
    tracker = context.statusTracker()
    failed = sum(tracker.getStageInfo(stage).numFailedTasks for job in tracker.getJobIdsForGroup("injected-faults")
                 for stage in tracker.getJobInfo(job).stageIds if tracker.getStageInfo(stage))
    assert failed >= 3, f"the switch should have failed some task attempts, saw {failed}"
    first, second = _tables(clean), _tables(faulty)
    assert first["duplicates"] == second["duplicates"] and first["pairs"] == second["pairs"]
    assert first["rejected"] == second["rejected"]
    assert first["dedup"].keys() == second["dedup"].keys()
    for name, value in first["dedup"].items():
        assert np.array_equal(value, second["dedup"][name]) if isinstance(value, np.ndarray) else value == second["dedup"][name]
    assert report["accounting"]["balanced"]
    def published(out: Path) -> list[str]:  # parts and index segments are named by run: compare the rest
        return sorted(re.sub(r"segment-\w+", "segment", re.sub(r"part-\d+-\w+-\d+", "part", name))
                      for name in json.loads((out / "_SUCCESS").read_text())["files"])

    assert sorted(set(published(faulty))) == sorted(set(published(clean)))


def test_a_silently_dropped_row_fails_the_accounting_and_publishes_nothing(spark, tmp_path):
    sample, root = make_sample(tmp_path, rows=2000, dim=16, seed=62)
    out = tmp_path / "out"
    with pytest.raises(AccountingError, match="accounting failed"):
        run_job(spark, root, out, faults={"drop_rows": 1}, estimate__sample_rows=0)
    assert not (out / "_SUCCESS").exists() and not (out / "dedup").exists()

"""Every input format and the edge cases of input data, each checked against the oracle."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_sample, output_groups, output_pairs, read_table, run_job
from oracle import brute_force_pairs, groups_of, normalize

from dedup_spark import config as config_module
from dedup_spark.read import InputError, build_manifest, metadata_of
from dedup_spark.sample import SampleSpec, generate, write

ROWS = 3000
EXHAUSTIVE = {"bucketing__k": 1, "output__pairs": "all"}


@pytest.fixture(scope="module")
def small_sample():
    return generate(SampleSpec(rows=ROWS, dim=32, seed=3))


@pytest.mark.parametrize("fmt,options", [
    ("npy", {}),
    ("parquet", {"dtype": "float16", "list_type": "list"}),
    ("parquet", {"dtype": "float32", "list_type": "fixed_size_list"}),
    ("parquet", {"dtype": "float32", "list_type": "list", "id_column": "item_id"}),
    ("parquet", {"dtype": "float16", "list_type": "fixed_size_list", "id_column": "item_id"}),
    ("parquet", {"dtype": "float16", "list_type": "binary"}),
])
def test_input_formats_match_oracle(spark, small_sample, tmp_path, fmt, options):
    root = tmp_path / "in"
    write(small_sample, root, fmt, shard_rows=1000, **options)
    out = tmp_path / "out"
    settings = dict(EXHAUSTIVE)
    if options.get("list_type") == "binary":
        settings["input__binary_dtype"] = options["dtype"]
    if options.get("id_column"):
        settings["input__id_column"] = options["id_column"]
    report = run_job(spark, root, out, **settings)
    truth = pq.read_table(tmp_path / "in_ground_truth.parquet")
    ids = truth.column("row_id").to_numpy()
    oracle = brute_force_pairs(normalize(small_sample.embeddings.astype(options.get("dtype", "float16"))), 0.95, ids)
    assert set(output_pairs(out)) == set(oracle)
    assert output_groups(out) == groups_of(oracle)
    assert report["input"]["format"] == fmt
    assert report["accounting"]["balanced"] and report["accounting"]["rejected_rows"] == 0
    # The deduplicated parquet keeps the input's schema.
    if fmt == "parquet":
        assert pq.read_schema(out / "dedup" / "part_0.parquet") == pq.read_schema(root / "part_0.parquet")
        kept_ids = pq.read_table(out / "dedup", columns=[options["id_column"]] if options.get("id_column") else ["key"])
        assert kept_ids.num_rows == report["accounting"]["kept_rows"]


@pytest.mark.parametrize("fmt,options", [
    ("laion", {}),
    ("parquet", {"dtype": "float16", "list_type": "list"}),
    ("parquet", {"dtype": "float16", "list_type": "list", "id_column": "item_id"}),
])
def test_metadata_of_a_few_rows_is_read_by_position(spark, small_sample, tmp_path, fmt, options):
    # The report's examples read only the row groups holding them (parquet shards of 1,000 rows hold
    # four row groups here); each asked row must get its own values, whichever group it sits in.
    root = tmp_path / "in"
    write(small_sample, root, fmt, shard_rows=1000, **options)
    settings = {"input.uri": str(root), "output.uri": str(tmp_path / "out")}
    if options.get("id_column"):
        settings["input.id_column"] = options["id_column"]
    config = config_module.load(None, settings)
    ids = pq.read_table(tmp_path / "in_ground_truth.parquet").column("row_id").to_numpy()
    positions = np.random.default_rng(1).choice(ROWS, 60, replace=False)
    asked = [int(ids[p]) for p in positions] + [int(ids.max()) + 10]  # and an id no row has
    found = metadata_of(spark, build_manifest(config), config, asked, ["key", "caption", "width", "no_such_column"])
    assert found == {int(ids[p]): {"key": f"{p:09d}", "caption": small_sample.captions[p],
                                   "width": str(small_sample.widths[p])} for p in positions}


def test_no_duplicates(spark, tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "in"
    root.mkdir()
    np.save(root / "a.npy", rng.standard_normal((800, 48)).astype(np.float16))
    np.save(root / "b.npy", rng.standard_normal((700, 48)).astype(np.float16))
    out = tmp_path / "out"
    report = run_job(spark, root, out)
    assert report["groups"]["count"] == 0
    assert report["accounting"]["kept_rows"] == 1500 and report["accounting"]["removed_rows"] == 0
    assert np.array_equal(np.load(out / "dedup" / "a.npy"), np.load(root / "a.npy"))
    assert read_table(out / "duplicates").num_rows == 0


def test_one_single_group(spark, tmp_path):
    rng = np.random.default_rng(6)
    base = rng.standard_normal(32)
    rows = base + 0.01 * rng.standard_normal((1200, 32))
    root = tmp_path / "in"
    root.mkdir()
    np.save(root / "only.npy", rows.astype(np.float32))
    out = tmp_path / "out"
    report = run_job(spark, root, out, bucketing__k=1, output__pairs="all")
    oracle = brute_force_pairs(normalize(rows.astype(np.float32)), 0.95)
    assert len(set(groups_of(oracle).values())) == 1
    assert set(output_pairs(out)) == set(oracle)
    assert report["groups"]["count"] == 1 and report["accounting"]["kept_rows"] == 1
    kept = np.load(out / "dedup" / "only.npy")
    assert np.array_equal(kept, rows.astype(np.float32)[:1])
    # Spread over several buckets, the spanning edges still close the one group.
    bucketed = tmp_path / "bucketed"
    report = run_job(spark, root, bucketed, bucketing__k=4, bucketing__m=2)
    assert report["groups"]["count"] == 1 and report["accounting"]["kept_rows"] == 1
    assert output_groups(bucketed) == groups_of(oracle)


def test_bad_rows_are_rejected_with_reasons_and_counted(spark, tmp_path):
    rng = np.random.default_rng(7)
    good = rng.standard_normal((500, 16)).astype(np.float32)
    good[10] = np.nan
    good[11] = 0.0
    good[12, 3] = np.inf
    good[20] = good[21]  # an exact duplicate
    root = tmp_path / "in"
    root.mkdir()
    np.save(root / "part_0.npy", good)
    out = tmp_path / "out"
    report = run_job(spark, root, out, bucketing__k=1)
    assert report["rejected_by_reason"] == {"not_finite": 2, "zero_norm": 1}
    rejected = read_table(out / "rejected")
    assert sorted(rejected.column("row_id").to_pylist()) == [10, 11, 12]
    counts = report["accounting"]
    assert counts == {**counts, "input_rows": 500, "rejected_rows": 3, "removed_rows": 1, "kept_rows": 496}
    assert np.load(out / "dedup" / "part_0.npy").shape == (496, 16)


def test_null_embeddings_and_ids_in_parquet_are_rejected(spark, tmp_path):
    rng = np.random.default_rng(8)
    values = rng.standard_normal((300, 64)).astype(np.float32)
    values[50] = values[51]  # one real duplicate pair
    embeddings = [list(map(float, v)) for v in values]
    embeddings[5] = None
    embeddings[6] = embeddings[6][:4]
    ids = list(range(100, 400))
    ids[7] = None
    ids[50] = 0  # the kept row's id is 0, what a null id would read as if its mask were dropped
    # Captions too: the row without an id still has one, which the caption readers must pass over.
    captions = [f"caption {i} of a row" for i in range(300)]
    captions[51] = captions[50]
    root = tmp_path / "in"
    root.mkdir()
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "embedding": pa.array(embeddings, pa.list_(pa.float32())),
                             "caption": captions}), root / "data.parquet")
    out = tmp_path / "out"
    report = run_job(spark, root, out, input__id_column="id", bucketing__k=1, captions__column="auto")
    assert report["rejected_by_reason"] == {"null_embedding": 1, "wrong_dim": 1, "null_id": 1}
    assert report["accounting"]["kept_rows"] == 296 and report["accounting"]["removed_rows"] == 1
    duplicates = read_table(out / "duplicates").to_pylist()
    assert sorted((row["row_id"], row["is_kept"], row["caption_similarity"]) for row in duplicates) == [
        (0, True, 1.0), (151, False, 1.0)]
    assert sorted(read_table(out / "rejected").column("shard_row").to_pylist()) == [5, 6, 7]
    assert pq.read_table(out / "dedup" / "data.parquet").num_rows == 296


def test_duplicate_ids_are_a_clear_error(spark, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    values = np.random.default_rng(9).standard_normal((50, 8)).astype(np.float32)
    pq.write_table(pa.table({"id": pa.array([1] * 2 + list(range(2, 50)), pa.int64()),
                             "embedding": pa.array([list(map(float, v)) for v in values], pa.list_(pa.float32()))}),
                   root / "data.parquet")
    with pytest.raises(ValueError, match="not unique"):
        run_job(spark, root, tmp_path / "out", input__id_column="id")


def test_missing_metadata_shard_is_a_clear_error(spark, tmp_path):
    sample, root = make_sample(tmp_path, rows=400, dim=16)
    (root / "metadata" / "metadata_0.parquet").unlink()
    with pytest.raises(InputError, match="metadata_0.parquet"):
        run_job(spark, root, tmp_path / "out")


def test_keep_policy_by_expression(spark, tmp_path):
    sample, root = make_sample(tmp_path, rows=3000, dim=32, seed=4)
    out = tmp_path / "out"
    run_job(spark, root, out, bucketing__k=1, keep__expression="width * height", keep__order="max")
    oracle_groups = groups_of(brute_force_pairs(normalize(sample.embeddings), 0.95))
    area = sample.widths.astype(np.int64) * sample.heights
    best: dict[int, int] = {}
    for row, group in oracle_groups.items():
        current = best.get(group)
        if current is None or (area[row], -row) > (area[current], -current):
            best[group] = row
    duplicates = read_table(out / "duplicates")
    kept = {r for r, k in zip(duplicates.column("row_id").to_pylist(), duplicates.column("is_kept").to_pylist()) if k}
    assert kept == set(best.values())
    assert min(duplicates.column("similarity_to_kept").to_pylist()) >= 0.5

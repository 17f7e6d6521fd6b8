"""The end-to-end job in a real local SparkSession, checked against brute force and union-find."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_sample, output_groups, output_pairs, random_caption, read_table, run_job, stored_embeddings
from oracle import brute_force_pairs, cosine, exact_jaccard, groups_of
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import config as config_module
from dedup_spark import session
from dedup_spark.group import choose_kept, duplicates_table, frame_reader
from dedup_spark.tables import packed_binary

THRESHOLD = 0.95


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """20,000 CLIP-like rows with planted groups, and the oracle's pairs on them."""
    directory = tmp_path_factory.mktemp("medium")
    sample, root = make_sample(directory, rows=20_000, dim=64, seed=1)
    oracle = brute_force_pairs(stored_embeddings(sample), THRESHOLD)
    return sample, root, oracle


def test_exhaustive_settings_give_exactly_the_brute_force_pairs_and_groups(spark, medium, tmp_path):
    sample, root, oracle = medium
    out = tmp_path / "out"
    report = run_job(spark, root, out, bucketing__k=1, output__pairs="all")
    found = output_pairs(out)
    assert set(found) == set(oracle)
    assert max(abs(found[p] - oracle[p]) for p in oracle) < 1e-4
    assert output_groups(out) == groups_of(oracle)
    assert report["accounting"]["balanced"]
    # Similarity to the kept row (the smallest row_id here), against numpy on the stored vectors.
    stored = stored_embeddings(sample)
    duplicates = read_table(out / "duplicates")
    rows, groups = duplicates.column("row_id").to_numpy(), duplicates.column("group_id").to_numpy()
    expected = cosine(stored[rows], stored[groups])
    assert np.abs(duplicates.column("similarity_to_kept").to_numpy() - expected).max() < 1e-6
    assert duplicates.column("is_kept").to_pylist() == (rows == groups).tolist()


def test_m_equal_k_is_exhaustive_too(spark, medium, tmp_path):
    sample, root, oracle = medium
    out = tmp_path / "out"
    run_job(spark, root, out, bucketing__k=6, bucketing__m=6, output__pairs="all")
    assert set(output_pairs(out)) == set(oracle)


def test_default_settings_recall_and_precision(spark, medium, tmp_path):
    sample, root, oracle = medium
    out = tmp_path / "out"
    report = run_job(spark, root, out, output__pairs="all")
    found = set(output_pairs(out))
    true = set(oracle)
    assert found <= true, f"{len(found - true)} pairs are not duplicates by brute force"
    recall = len(found & true) / len(true)
    assert recall >= 0.99, recall
    # Closure: rows of every true pair that ended in one group.
    groups = output_groups(out)
    closed = sum(1 for a, b in true if a in groups and groups.get(a) == groups.get(b))
    assert closed / len(true) >= recall
    assert report["bucketing"]["k"] > 1 and report["bucketing"]["m"] == 2
    assert report["bucketing"]["training_warning"] is None  # the sample holds points_per_centroid per centroid


def test_two_level_training_replaces_a_starved_flat_sample(spark, medium, tmp_path):
    sample, root, oracle = medium
    out = tmp_path / "out"
    # K=100 at 64 rows a centroid wants 6,400 sample rows; 1,000 would starve one flat k-means, so auto
    # trains 10 coarse cells on the driver's 1,000 and each cell's share of the K in a task.
    report = run_job(spark, root, out, bucketing__k=100, bucketing__max_train_rows=1000, bucketing__rounds=2,
                     output__pairs="all")
    bucketing = report["bucketing"]
    assert bucketing["training"] == "two_level" and bucketing["training_warning"] is None
    assert bucketing["train_rows"] == 1000 and 0.85 * 6400 <= bucketing["cell_train_rows"] <= 6400
    assert 95 <= bucketing["k"] <= 100
    found, true = set(output_pairs(out)), set(oracle)
    assert found <= true and len(found) / len(true) >= 0.99, len(found) / len(true)
    # Centroids that split the data: compared pairs far below one bucket's, and no bucket a tenth of the rows.
    rows = len(sample.embeddings)
    assert report["search"]["comparisons"] < 0.1 * rows * (rows - 1) / 2
    assert bucketing["bucket_sizes"]["max"] < rows / 10


def test_packed_buckets_find_the_pairs_of_a_task_per_bucket(spark, medium, tmp_path):
    """Packing neighbouring buckets into one search task changes what the shuffle carries, not what
    is found: the same pairs, counted once each, and the same groups, from fewer rows shuffled."""
    sample, root, oracle = medium
    reports, pairs, groups = {}, {}, {}
    for pack_rows in (0, None):
        out = tmp_path / f"out-{pack_rows}"
        reports[pack_rows] = run_job(spark, root, out, bucketing__k=100, output__pairs="all",
                                     search__pack_rows=pack_rows)
        pairs[pack_rows], groups[pack_rows] = set(output_pairs(out)), output_groups(out)
    unpacked, packed = reports[0], reports[None]
    assert pairs[None] == pairs[0] and pairs[0] <= set(oracle) and groups[None] == groups[0]
    assert packed["search"]["pairs_found"] == unpacked["search"]["pairs_found"] == len(pairs[0])
    # Every pair listed: the plain product computes each pair sharing a bucket once, attaching none.
    for counted in (packed["search"], unpacked["search"]):
        assert counted["comparisons_done"] == counted["comparisons_all_pairs"] == counted["comparisons"]
        assert counted["rows_attached"] == 0 and counted["pairs_found_is_lower_bound"] is False
    assert unpacked["bucketing"]["packed_buckets"] == 0
    assert unpacked["search"]["routed_rows"] == unpacked["bucketing"]["assigned_rows"]
    assert packed["bucketing"]["packed_buckets"] > 10
    assert packed["search"]["routed_rows"] < 0.95 * packed["bucketing"]["assigned_rows"]
    assert packed["bucketing"]["search_tasks"] < unpacked["bucketing"]["search_tasks"]


def test_dedup_keeps_one_row_per_group_and_every_unique_row(spark, medium, tmp_path):
    sample, root, oracle = medium
    out = tmp_path / "out"
    report = run_job(spark, root, out, bucketing__k=1)
    groups = groups_of(oracle)
    removed = {row for row, group in groups.items() if row != group}
    expected_kept = [i for i in range(len(sample.embeddings)) if i not in removed]
    # Shard names and columns are preserved; rows keep their input order.
    input_shards = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    output_shards = sorted(p.relative_to(out / "dedup") for p in (out / "dedup").rglob("*") if p.is_file())
    assert input_shards == output_shards
    keys, embeddings = [], []
    for shard in sorted((out / "dedup" / "img_emb").glob("*.npy"), key=lambda p: int(p.stem.split("_")[-1])):
        metadata = pq.read_table(out / "dedup" / "metadata" / shard.name.replace("img_emb", "metadata").replace(
            ".npy", ".parquet"))
        assert metadata.schema == pq.read_schema(root / "metadata" / "metadata_0.parquet")
        keys += metadata.column("key").to_pylist()
        embeddings.append(np.load(shard))
    assert [int(k) for k in keys] == expected_kept
    assert np.array_equal(np.concatenate(embeddings), sample.embeddings[expected_kept])
    counts = report["accounting"]
    assert counts["kept_rows"] == len(expected_kept) and counts["removed_rows"] == len(removed)
    assert counts["input_rows"] == counts["kept_rows"] + counts["removed_rows"] + counts["rejected_rows"]
    published = json.loads((out / "_SUCCESS").read_text())["files"]
    assert "report.json" in published and all((out / f).exists() for f in published)
    duplicates = read_table(out / "duplicates")
    kept_flags = dict(zip(duplicates.column("row_id").to_pylist(), duplicates.column("is_kept").to_pylist()))
    assert {row for row, flag in kept_flags.items() if not flag} == removed
    sizes = dict(zip(duplicates.column("row_id").to_pylist(), duplicates.column("group_size").to_pylist()))
    size_of: dict[int, int] = {}
    for group in groups.values():
        size_of[group] = size_of.get(group, 0) + 1
    assert all(sizes[row] == size_of[groups[row]] for row in groups)


def test_samples_drawn_while_reading_equal_a_scan_of_the_rows(spark, tmp_path):
    from dedup_spark import config as config_module
    from dedup_spark import kernels, read, tables
    from dedup_spark.read import build_manifest

    sample, root = make_sample(tmp_path, rows=6000, dim=16, seed=21)
    config = config_module.load(None, {"input.uri": str(root), "output.uri": str(tmp_path / "o")})
    manifest = build_manifest(config)
    stored = read.StoredSample(str(tmp_path / "sample"), ((0.2, 5), (0.05, 6)))
    rows_uri = str(tmp_path / "rows")
    info = read.write_rows(spark, manifest, config, rows_uri, [stored])
    # Both tables are committed from the same tasks: every row once, and exactly the drawn rows.
    assert info.rows == 6000 and tables.table_info(rows_uri).rows == 6000
    drawn = tables.read_table_on_driver(stored.uri)
    ids = np.arange(6000)
    expected = ids[kernels.sample_mask(ids, 0.2, 5) | kernels.sample_mask(ids, 0.05, 6)]
    assert sorted(drawn.column("row_id").to_pylist()) == expected.tolist()
    for fraction, seed, limit in ((0.2, 5, None), (0.1, 5, 300), (0.05, 6, 100), (0.3, 5, None), (0.05, 7, None)):
        from_store = read.sample_valid_rows(spark, rows_uri, fraction, seed, limit, stored)
        scanned = read.sample_valid_rows(spark, rows_uri, fraction, seed, limit)
        assert from_store.column("row_id").to_pylist() == scanned.column("row_id").to_pylist()
        assert from_store.column("embedding").to_pylist() == scanned.column("embedding").to_pylist()
        picked = ids[kernels.sample_mask(ids, fraction, seed)]
        assert sorted(scanned.column("row_id").to_pylist()) == sorted(picked[np.argsort(
            kernels.sample_hash(picked, seed), kind="stable")][:limit].tolist())
    assert stored.covers(0.1, 5) and not stored.covers(0.3, 5) and not stored.covers(0.05, 7)
    # The same draws left in Spark (two-level training's cells): from the stored table and by a scan.
    for fraction, seed in ((0.1, 5), (0.05, 7)):
        in_tasks = [read.sampled_rows(spark, rows_uri, fraction, seed, source).toArrow() for source in (stored, None)]
        assert sorted(in_tasks[0].column("row_id").to_pylist()) == sorted(in_tasks[1].column("row_id").to_pylist()) \
            == ids[kernels.sample_mask(ids, fraction, seed)].tolist()


def test_small_parts_are_read_several_to_a_task_and_every_row_once(spark, tmp_path):
    from dedup_spark import tables

    # 40 parts of ~2 KB: with a 10 KB task target they fit 8 tasks, never fewer than the cores.
    rows = spark.range(0, 4000, 1, 40).selectExpr("id as row_id", "id * 2 as value")
    info = tables.write_table(rows, str(tmp_path / "small"))
    assert len(info.parts) == 40 and len(info.part_bytes) == 40
    tasks = tables.read_tasks(info.parts, info.part_bytes, parallelism=2, task_bytes=10_000)
    assert [part for task in tasks for part in task] == info.parts
    assert len(tasks) == max(2, -(-sum(info.part_bytes) // 10_000))
    assert tables.read_tasks(info.parts, info.part_bytes, parallelism=64) == [[part] for part in info.parts]
    # Large parts are never merged; manifests without sizes read one part per task.
    assert tables.read_tasks(info.parts, [1 << 30] * 40, parallelism=2) == [[part] for part in info.parts]
    assert tables.read_tasks(info.parts, None, parallelism=2) == [[part] for part in info.parts]
    # One large part does not leave the next task empty: still as many tasks as cores.
    assert tables.read_tasks(["a", "b", "c", "d"], [10, 1, 1, 1], parallelism=3) == [["a"], ["b"], ["c", "d"]]
    table = tables.read_table(spark, str(tmp_path / "small"))
    assert table.rdd.getNumPartitions() == spark.sparkContext.defaultParallelism
    read_back = sorted((r["row_id"], r["value"]) for r in table.collect())
    assert read_back == [(i, 2 * i) for i in range(4000)]
    # A consumer holding whole partitions (the local union-find) caps the rows a task merges.
    capped = tables.read_table(spark, str(tmp_path / "small"), max_task_rows=500)
    sizes = capped.rdd.glom().map(len).collect()
    assert sum(sizes) == 4000 and len(sizes) == 8 and max(sizes) <= 500 + 100


def test_a_mapped_table_is_read_beside_its_source_row_for_row_and_a_stale_one_fails(spark, tmp_path):
    from dedup_spark import tables

    def rows_table(start: int) -> str:
        # Some rows filtered out by the prepare step, and parts small enough to be read several a task.
        frame = spark.range(start, start + 3000, 1, 30).selectExpr("id as row_id", "id * 3 as value")
        return tables.write_table(frame, str(tmp_path / "source")).uri

    def odd_rows(batches):
        for batch in batches:
            yield batch.filter(pa.array(batch.column("row_id").to_numpy() % 2 == 1))

    def halves(batches):
        for batch in batches:
            yield pa.RecordBatch.from_arrays([batch.column("row_id"), pa.array(batch.column("value").to_numpy() // 3)],
                                             names=["row_id", "half"])

    source = rows_table(0)
    aligned_uri = str(tmp_path / "aligned")
    outputs = {"aligned": (halves, T.StructType([T.StructField("row_id", T.LongType()),
                                                  T.StructField("half", T.LongType())]), aligned_uri)}
    info = tables.write_mapped_tables(spark, source, ["row_id", "value"], outputs, odd_rows)["aligned"]
    assert info.rows == 1500 and len(info.source_parts) == len(info.parts) < 30
    assert sorted(p for parts in info.source_parts for p in parts) == tables.table_info(source).parts

    def pair_up(rows, beside):
        yield pa.RecordBatch.from_arrays([rows.column("row_id"), rows.column("value"), beside.column("half")],
                                         names=["row_id", "value", "half"])

    schema = "row_id long, value long, half long"
    read_back = tables.map_aligned(spark, source, ["row_id", "value"], aligned_uri, pair_up, schema, odd_rows).collect()
    assert sorted((r["row_id"], r["value"], r["half"]) for r in read_back) == [(i, 3 * i, i) for i in range(1, 3000, 2)]
    # Read with another prepare step, the rows no longer line up: the task fails, naming the table.
    def even_rows(batches):
        for batch in batches:
            yield batch.filter(pa.array(batch.column("row_id").to_numpy() % 2 == 0))

    with pytest.raises(Exception, match="not aligned"):
        tables.map_aligned(spark, source, ["row_id", "value"], aligned_uri, pair_up, schema, even_rows).collect()
    # The source rewritten since: its parts are not the ones the aligned table was made from.
    source = rows_table(1)
    with pytest.raises(ValueError, match="was written from other parts"):
        tables.map_aligned(spark, source, ["row_id", "value"], aligned_uri, pair_up, schema, odd_rows)


@pytest.mark.parametrize("member_count", [None, "exact"])
def test_duplicates_table_with_and_without_broadcast_members(spark, member_count):
    """Both ways of meeting the embeddings and captions (the members broadcast to the tasks reading
    them when their count is known and small, else shuffle joins) give every member its group size,
    keep flag, similarity to the kept row (numpy) and caption similarity (exact Jaccard, within
    MinHash error)."""
    rng = np.random.default_rng(11)
    dim, rows = 16, 3_000
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    stored = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    # Groups of 2..40 members over a third of the rows; group_id is the smallest member.
    member_rows = rng.permutation(rows)[:1_000]
    cuts = np.sort(rng.choice(np.arange(2, len(member_rows) - 1), 40, replace=False))
    groups = [np.sort(part) for part in np.split(member_rows, cuts) if len(part) >= 2]
    group_of = {int(row): int(part[0]) for part in groups for row in part}
    captions = [None if row % 7 == 0 else random_caption(rng) for row in range(rows)]
    for part in groups:  # near-copies of the kept row's caption, so similarities span 0..1
        for row in part[1::2]:
            if captions[part[0]] is not None and row % 7:
                captions[row] = captions[part[0]] + " " + random_caption(rng, 1)
    members = spark.createDataFrame(pd.DataFrame({"row_id": list(group_of), "group_id": list(group_of.values())}))
    table = pa.table({"row_id": np.arange(rows, dtype=np.int64), "embedding": packed_binary(stored)})
    rows_df = spark.createDataFrame(table.to_pandas()).select("row_id", F.col("embedding").cast("binary"))
    captions_df = spark.createDataFrame(pd.DataFrame({"row_id": np.arange(rows), "caption": captions}))
    config = config_module.JobConfig()
    kept = choose_kept(members, None, config)
    # Spark would broadcast these small test tables by itself; the member count alone decides here.
    spark.conf.set("spark.sql.autoBroadcastJoinThreshold", "-1")
    # Batches of 7 rows: a member's embedding and caption rows, and a group, often span two batches.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "7")
    try:
        duplicates = duplicates_table(members, kept, frame_reader(rows_df), dim, frame_reader(captions_df),
                                      config.captions, None if member_count is None else len(group_of))
        plan = duplicates._jdf.queryExecution().executedPlan().toString()
        # Broadcast members are looked up in the reading tasks: no join is left in the plan.
        assert ("SortMergeJoin" in plan) == (member_count is None) and "BroadcastHashJoin" not in plan, plan
        result = duplicates.toPandas().sort_values("row_id")
    finally:
        spark.conf.unset("spark.sql.autoBroadcastJoinThreshold")
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert result["row_id"].tolist() == sorted(group_of)
    ids, group_ids = result["row_id"].to_numpy(), result["group_id"].to_numpy()
    assert group_ids.tolist() == [group_of[row] for row in ids]
    sizes = {int(part[0]): len(part) for part in groups}
    assert result["group_size"].tolist() == [sizes[g] for g in group_ids]
    assert result["is_kept"].tolist() == (ids == group_ids).tolist()
    expected = cosine(stored[ids], stored[group_ids])
    assert np.abs(result["similarity_to_kept"].to_numpy() - expected).max() < 1e-6
    for row, kept_row, estimate in zip(ids, group_ids, result["caption_similarity"]):
        exact = exact_jaccard(captions[row], captions[kept_row])
        if exact is None:
            assert pd.isna(estimate), (row, kept_row)
        else:
            assert abs(estimate - exact) < 0.18, (row, exact, estimate)


def test_independent_queries_run_side_by_side_with_the_callers_local_properties(spark):
    """session.run_concurrently (the group stage's totals, pairs/, views): the jobs overlap (a barrier
    only all three together pass), each runs its own Spark job, and each sees the Spark local
    properties the caller set (a scheduler pool, a job group), which a plain thread would not."""
    barrier = threading.Barrier(3, timeout=60)
    context = spark.sparkContext

    def job(rows: int):
        def run():
            barrier.wait()  # BrokenBarrierError if the jobs ran one after another
            return context.getLocalProperty("dedup.test.pool"), spark.range(rows).count()
        return run

    context.setLocalProperty("dedup.test.pool", "caller")
    try:
        done = session.run_concurrently("test", {f"rows {rows}": job(rows) for rows in (10, 20, 30)})
    finally:
        context.setLocalProperty("dedup.test.pool", None)
    assert done == {"rows 10": ("caller", 10), "rows 20": ("caller", 20), "rows 30": ("caller", 30)}


def test_a_failed_side_by_side_query_is_raised_after_the_others_end():
    finished = []

    def slow():
        time.sleep(0.5)
        finished.append("slow")

    def fails_first():
        raise ValueError("the first failure")

    def fails_later():
        raise KeyError("a later failure")

    with pytest.raises(ValueError, match="the first failure"):
        session.run_concurrently("test", {"fails first": fails_first, "slow": slow, "fails later": fails_later})
    assert finished == ["slow"]

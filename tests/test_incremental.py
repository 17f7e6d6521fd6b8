"""Incremental runs (--reference) against a brute-force oracle over the kept corpus plus the new rows.

The oracle: the >= threshold graph over (kept rows of the corpus) and the new rows. A component
holding corpus rows removes all of its new rows, which join the published group of smallest
group_id among its corpus rows; a component of new rows only keeps its smallest row_id (the
default keep policy) under group_id = that row_id. The corpus is built by full runs whose search is
exhaustive (m = k), so the oracle is exact and the incremental run must equal it."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import read_table, run_job
from oracle import brute_force_pairs, normalize

from dedup_spark.errors import InputError
from dedup_spark.sample import Sample, SampleSpec, generate, write

REPO = Path(__file__).resolve().parent.parent
# Every row in every bucket: exhaustive, so the oracle is exact. Small tasks split the buckets.
SETTINGS = {"bucketing__k": 3, "bucketing__m": 3, "search__max_task_rows": 400, "estimate__sample_rows": 40}


def _subset(sample: Sample, rows: np.ndarray, extra: np.ndarray | None = None) -> Sample:
    embeddings = sample.embeddings[rows]
    if extra is not None:
        embeddings = np.concatenate([embeddings, extra.astype(embeddings.dtype)])
    n = len(embeddings)
    pad = n - len(rows)
    take = lambda values: np.concatenate([values[rows], values[rows][:pad] if pad else values[rows][:0]])  # noqa: E731
    return Sample(embeddings, take(sample.planted_group), take(sample.topic),
                  [sample.captions[i] for i in rows] + ["planted"] * pad, take(sample.widths), take(sample.heights),
                  sample.spec)


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Corpus A, then B and C: planted groups spread over the three, two A rows that are not
    duplicates (cosine 0.88) and a B row between them (cosine 0.97 to each), and a B pair that
    duplicates nothing in A."""
    directory = tmp_path_factory.mktemp("incremental")
    sample = generate(SampleSpec(rows=2400, dim=24, seed=95))
    order = np.random.default_rng(96).permutation(len(sample.embeddings))
    a_rows, b_rows, c_rows = np.sort(order[:1400]), np.sort(order[1400:2000]), np.sort(order[2000:])
    rng = np.random.default_rng(97)
    left = _unit(rng.standard_normal(24))
    other = _unit(rng.standard_normal(24) - (rng.standard_normal(24) @ left) * left)
    other = _unit(other - (other @ left) * left)
    right = _unit(0.88 * left + np.sqrt(1 - 0.88**2) * other)
    bridge = _unit(left + right)
    lone = _unit(rng.standard_normal(24))
    pair = np.stack([lone, _unit(lone + 0.05 * _unit(rng.standard_normal(24)))])
    paths = {}
    for name, rows, extra in (("A", a_rows, np.stack([left, right])), ("B", b_rows, np.concatenate([[bridge], pair])),
                              ("C", c_rows, None)):
        paths[name] = directory / name
        write(_subset(sample, rows, extra), paths[name], "laion", shard_rows=300)
    return directory, paths


def _stored(path: Path) -> np.ndarray:
    return normalize(np.concatenate([np.load(f).astype(np.float32) for f in
                                     sorted((path / "img_emb").glob("*.npy"), key=lambda p: int(p.stem.split("_")[-1]))]))


def _published_groups(out: Path) -> dict[int, int]:
    """row_id -> published group_id of every kept row of a run's duplicates/ (others are singletons)."""
    table = read_table(out / "duplicates")
    return {r: g for r, g, k in zip(table.column("row_id").to_pylist(), table.column("group_id").to_pylist(),
                                    table.column("is_kept").to_pylist()) if k}


def _kept_ids(out: Path, first_id: int, rows: int) -> set[int]:
    table = read_table(out / "duplicates")
    removed = {r for r, k in zip(table.column("row_id").to_pylist(), table.column("is_kept").to_pylist()) if not k}
    rejected = set(read_table(out / "rejected").column("row_id").to_pylist())
    return set(range(first_id, first_id + rows)) - removed - rejected


def _oracle(corpus: dict[int, np.ndarray], groups: dict[int, int], new: dict[int, np.ndarray]) -> dict[int, tuple]:
    """new row_id -> (removed, group_id) over the kept corpus rows and the new rows."""
    ids = np.array(sorted(corpus) + sorted(new))
    vectors = np.stack([corpus[i] for i in sorted(corpus)] + [new[i] for i in sorted(new)])
    pairs = brute_force_pairs(vectors, 0.95, ids)
    parent = {i: i for i in ids.tolist()}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    members: dict[int, list[int]] = {}
    for i in ids.tolist():
        members.setdefault(find(i), []).append(i)
    result = {}
    for component in members.values():
        anchors = [i for i in component if i in corpus]
        fresh = sorted(i for i in component if i in new)
        if anchors:
            group = min(groups.get(i, i) for i in anchors)
            result.update({i: (True, group) for i in fresh})
        elif len(fresh) > 1:
            result.update({i: (i != fresh[0], fresh[0]) for i in fresh})
    return result


def _new_rows(out: Path) -> dict[int, tuple]:
    table = read_table(out / "duplicates")
    return {r: (not k, g) for r, g, k in zip(table.column("row_id").to_pylist(), table.column("group_id").to_pylist(),
                                             table.column("is_kept").to_pylist())}


def _checksums(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_chain_of_incremental_runs_equals_the_oracle_and_never_rewrites_an_earlier_output(spark, batches,
                                                                                           monkeypatch, capsys):
    directory, paths = batches
    out_a, out_b, out_c = directory / "out-A", directory / "out-B", directory / "out-C"
    stored = {name: _stored(path) for name, path in paths.items()}
    sizes = {name: len(vectors) for name, vectors in stored.items()}
    run_job(spark, paths["A"], out_a, **SETTINGS)
    before_a = _checksums(out_a)
    monkeypatch.chdir(directory)  # a relative reference: the chain still finds A's segment from C
    report_b = run_job(spark, paths["B"], out_b, input__reference="out-A", **SETTINGS)
    monkeypatch.undo()

    # B's ids continue after A's; A's kept rows and their published groups are the corpus.
    a_kept = _kept_ids(out_a, 0, sizes["A"])
    corpus = {i: stored["A"][i] for i in a_kept}
    b_first = sizes["A"]
    new_b = {b_first + i: v for i, v in enumerate(stored["B"])}
    expected = _oracle(corpus, _published_groups(out_a), new_b)
    assert _new_rows(out_b) == expected
    bridge = b_first + sizes["B"] - 3
    left, right = sizes["A"] - 2, sizes["A"] - 1
    assert expected[bridge] == (True, min(left, right)), "the bridge joins the smaller of the two groups"
    assert expected[bridge + 2] == (True, bridge + 1), "a pair of new rows is a new group"
    assert any(removed and group < b_first for removed, group in expected.values())
    assert report_b["accounting"]["balanced"] and report_b["accounting"]["input_rows"] == sizes["B"]
    assert report_b["reference"]["uri"] == str(out_a) and report_b["reference"]["drift"]["largest_bucket_before"] > 0
    assert report_b["stages_reused"] == [] and "train" in report_b["timings_seconds"]
    assert report_b["recall_estimate"]["closure_recall"] == 1.0
    # Each index file's new rows are split over tasks of at most max_task_rows / 2 of them.
    assert report_b["reference"]["tasks"] > report_b["reference"]["index_files"]
    dedup_b = sum(len(np.load(f)) for f in (out_b / "dedup" / "img_emb").glob("*.npy"))
    assert dedup_b == sizes["B"] - sum(removed for removed, _ in expected.values())

    # C against B's output: the corpus is A's kept rows and B's.
    report_c = run_job(spark, paths["C"], out_c, input__reference=str(out_b), **SETTINGS)
    b_kept = _kept_ids(out_b, b_first, sizes["B"])
    corpus_c = {**corpus, **{i: new_b[i] for i in b_kept}}
    groups_c = {**_published_groups(out_a), **_published_groups(out_b)}
    c_first = b_first + sizes["B"]
    expected_c = _oracle(corpus_c, groups_c, {c_first + i: v for i, v in enumerate(stored["C"])})
    assert _new_rows(out_c) == expected_c
    # A group's size counts its rows over the whole chain: its members in every run's duplicates/,
    # plus its kept corpus row where that row was alone until a later run joined it.
    tables = [read_table(out / "duplicates").to_pylist() for out in (out_a, out_b, out_c)]
    counts, has_kept = {}, set()
    for row in (row for table in tables for row in table):
        counts[row["group_id"]] = counts.get(row["group_id"], 0) + 1
        if row["is_kept"]:
            has_kept.add(row["group_id"])
    group_sizes = {row["group_id"]: row["group_size"] for row in tables[2]}
    assert group_sizes == {g: counts[g] + (g not in has_kept) for g in group_sizes}
    assert any(g < b_first and any(r["group_id"] == g for r in tables[1]) for g in group_sizes), \
        "some group of A grew in B and again in C"
    assert report_c["reference"]["segments"] == 2
    manifest = json.loads((out_c / "index" / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["segments"]] == [len(a_kept), len(b_kept),
                                                         sizes["C"] - sum(r for r, _ in expected_c.values())]
    assert manifest["segments"][0]["uri"].startswith(str(out_a))
    # Only a run's own segment lists its files: an earlier one's stay in the manifest that published them.
    assert ["files" in s for s in manifest["segments"]] == [False, False, True]
    assert _checksums(out_a) == before_a, "no run may rewrite an earlier output"
    # Publishing over any output of the chain would replace a segment later runs read.
    sys.path.insert(0, str(REPO / "jobs"))
    import dedup as cli

    capsys.readouterr()
    for arguments in (["--input", str(paths["C"]), "--output", str(out_a), "--overwrite"],
                      ["--table", "default.anything", "--output", str(directory / "out-T")]):
        assert cli.main([*arguments, "--reference", str(out_c)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and ("out-A" in lines[0] or "input.id_column" in lines[0]), lines
    assert _checksums(out_a) == before_a
    # A link published again after the chain was built on it no longer holds the segment the chain
    # deduplicated against: the next run on the chain refuses in one line.
    a_manifest = out_a / "index" / "manifest.json"
    a_manifest.write_text(json.dumps({**json.loads(a_manifest.read_text()), "model_id": "another model"}))
    assert cli.main(["--input", str(paths["C"]), "--output", str(directory / "out-D"), "--reference", str(out_c)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "published again" in lines[0] and str(out_a) in lines[0], lines


def test_new_ids_colliding_with_the_corpus_and_a_reference_that_is_not_published_are_one_line_errors(
        spark, tmp_path, capsys):
    sample = generate(SampleSpec(rows=600, dim=16, seed=98))
    first = Sample(sample.embeddings[:400], sample.planted_group[:400], sample.topic[:400], sample.captions[:400],
                   sample.widths[:400], sample.heights[:400], sample.spec)
    write(first, tmp_path / "A", "parquet", id_column="photo_id", shard_rows=200)
    run_job(spark, tmp_path / "A", tmp_path / "out-A", input__id_column="photo_id")
    ids = {i for f in (tmp_path / "A").glob("*.parquet") for i in pq.read_table(f).column("photo_id").to_pylist()}
    # The same rows again: every id collides.
    with pytest.raises(InputError, match=r"ids the corpus of .* already has, e.g. \[") as raised:
        run_job(spark, tmp_path / "A", tmp_path / "out-B", input__id_column="photo_id",
                input__reference=str(tmp_path / "out-A"))
    examples = json.loads(str(raised.value).split("e.g. ")[1].split(";")[0])
    assert len(examples) == 5 and set(examples) <= ids and "\n" not in str(raised.value)
    assert not (tmp_path / "out-B" / "dedup").exists()
    sys.path.insert(0, str(REPO / "jobs"))
    import dedup as cli

    (tmp_path / "half").mkdir()
    capsys.readouterr()
    code = cli.main(["--input", str(tmp_path / "A"), "--output", str(tmp_path / "out-C"), "--reference",
                     str(tmp_path / "half")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "not a published output" in lines[0], lines
    code = cli.main(["--input", str(tmp_path / "A"), "--output", str(tmp_path / "out-A"), "--reference",
                     str(tmp_path / "out-A"), "--overwrite", "--set", "input.id_column=photo_id"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "out-A" in lines[0], "the reference may not be the output"


def test_an_index_file_is_read_with_its_members_and_a_member_it_lacks_is_an_error(tmp_path):
    """Kept rows only, with their group and size (a row not listed is its own group of one); a
    members file naming a row its index file lacks is a damaged index, not a silent misplacement."""
    from dedup_spark.index import members_file, read_file
    from dedup_spark.search import index_file

    rows = pa.table({"row_id": pa.array([3, 5, 9, 12], pa.int64()), "buckets": [b"a", b"b", b"c", b"d"],
                     "embedding": [b"3", b"5", b"9", b"12"]})
    pq.write_table(rows, tmp_path / index_file(7))

    def members(row_ids, kept):
        pq.write_table(pa.table({"row_id": pa.array(row_ids, pa.int64()), "group_id": pa.array([5] * len(row_ids), pa.int64()),
                                 "group_size": pa.array([4] * len(row_ids), pa.int64()), "is_kept": kept}),
                       tmp_path / members_file(7))

    members([5, 9, 12], [True, False, False])
    table = read_file(str(tmp_path), {"task": 7, "members": True})
    assert table.select(["row_id", "group_id", "group_size", "embedding"]).to_pylist() == [
        {"row_id": 3, "group_id": 3, "group_size": 1, "embedding": b"3"},
        {"row_id": 5, "group_id": 5, "group_size": 4, "embedding": b"5"}]
    for lacking in ([5, 10], [5, 13]):  # between two rows, and past the last
        members(lacking, [True, False])
        with pytest.raises(InputError, match="does not hold every row its members file lists"):
            read_file(str(tmp_path), {"task": 7, "members": True})

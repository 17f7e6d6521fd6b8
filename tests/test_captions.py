"""Caption-aware groups: MinHash similarity against exact Jaccard, and the merge and
keep_distinct policies on a hand-built dataset whose caption variants are known."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import check_html_numbers, random_caption, read_table, run_job
from oracle import brute_force_pairs, exact_jaccard, groups_of, normalize

from dedup_spark import minhash
from dedup_spark.config import ConfigError

THRESHOLD = 0.95


def test_minhash_estimates_jaccard_within_its_error():
    rng = np.random.default_rng(3)
    base = [random_caption(rng, 8) for _ in range(60)]
    # Variants from identical to unrelated: drop, swap or replace some words.
    variants = []
    for caption in base:
        words = caption.split()
        cut = int(rng.integers(0, len(words)))
        variants.append(" ".join(words[:cut] + [random_caption(rng, 1)] + words[cut + 1:]))
    variants[:10] = base[:10]
    variants[10:20] = [random_caption(rng, 8) for _ in range(10)]
    values, present = minhash.signatures(base + variants)
    assert present.all()
    estimated = minhash.similarity(values[:60], values[60:])
    exact = np.array([exact_jaccard(a, b) for a, b in zip(base, variants)])
    assert np.all(estimated[:10] == 1.0)
    # 128 values: standard error <= 0.044; 4 of them.
    assert np.max(np.abs(estimated - exact)) < 0.18, np.max(np.abs(estimated - exact))
    assert abs(np.mean(estimated - exact)) < 0.02
    # Normalisation: case, punctuation and spacing do not matter; a missing caption has no signature.
    values, present = minhash.signatures(["A red  car!", "a red car", None, "  ..."])
    assert present.tolist() == [True, True, False, False]
    assert np.array_equal(values[0], values[1])


def test_batched_signatures_equal_datasketch_per_caption():
    import zlib

    from datasketch import MinHash

    rng = np.random.default_rng(8)
    # Many captions at once (several work chunks), with empty and one-shingle captions between them.
    captions = [random_caption(rng, int(rng.integers(1, 30))) for _ in range(3000)]
    captions[::500] = [None, "", "ab", "  !!  ", "x", "A b"]
    # Multi-byte characters (a shingle is characters, not bytes) and Unicode spaces between words.
    others = ["Café über naïve 日本語 ✓ ok", "日本", "ÄÖÜ straße", "a\u00a0b\u2003c d", "emoji 😀😀 x", "ß"]
    captions[1::500] = others
    for kind, size, num_perm, seed in [("chars", 4, 128, 1), ("words", 2, 64, 7), ("chars", 2, 32, 3)]:
        values, present = minhash.signatures(captions, num_perm, kind, size, seed)
        for row in list(range(0, len(captions), 37)) + list(range(0, len(captions), 500)) + list(range(1, 3000, 500)):
            grams = minhash.shingles(captions[row], kind, size)
            assert present[row] == bool(grams)
            if grams:
                sketch = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32, scheme="affine32")
                sketch.update_batch(grams)
                assert np.array_equal(values[row], sketch.hashvalues.astype(np.uint32)), row
            else:
                assert not values[row].any()


def test_band_layout_catches_same_captions_and_keys_equal_bands():
    for num_perm, same in [(128, 0.7), (64, 0.5), (256, 0.9)]:
        bands, rows = minhash.band_layout(num_perm, same)
        assert bands * rows <= num_perm
        assert 1 - (1 - same**rows) ** bands >= 0.99
        # One row wider would miss more than 1% of the pairs at the cut.
        wider = num_perm // (rows + 1)
        assert 1 - (1 - same ** (rows + 1)) ** wider < 0.99
    values, _ = minhash.signatures(["one caption here", "one caption here", "something else entirely"])
    keys = minhash.band_keys(values, 25, 5)
    assert np.array_equal(keys[0], keys[1]) and not np.any(keys[0] == keys[2])


# A hand-built dataset: groups of copies (embedding similarity > 0.99) with known caption variants.
CAR = "A red car parked on the street"
GROUPS = [
    # (captions of the copies in row order; which caption cluster each belongs to)
    ([CAR, "A red car parked on the street today", CAR, "a red car, parked on the street.",
      "Blueprint drawing of a wooden house"], [0, 0, 0, 0, 1]),
    (["Sunset over the mountains"] * 3, [0, 0, 0]),
    ([None, "cat", "A photo of a dog playing in the snow"], [None, 0, 1]),
]
UNIQUE = ["a bowl of fruit on a table", "city skyline at night", None, "portrait of an old man"]


def hand_built(root: Path, dim: int = 32) -> tuple[list[str | None], list[list[int]]]:
    """Rows: the groups' copies, then unrelated rows, shuffled by a fixed permutation; laion layout."""
    rng = np.random.default_rng(11)
    captions, embeddings, members = [], [], []
    for copies, _ in GROUPS:
        base = rng.standard_normal(dim)
        members.append(list(range(len(captions), len(captions) + len(copies))))
        captions += copies
        embeddings += [base + 0.01 * rng.standard_normal(dim) for _ in copies]
    captions += UNIQUE
    embeddings += [rng.standard_normal(dim) for _ in UNIQUE]
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    np.save(root / "img_emb" / "img_emb_0.npy", np.array(embeddings, dtype=np.float16))
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(len(captions))], "caption": captions,
                             "width": list(range(100, 100 + len(captions)))}),
                   root / "metadata" / "metadata_0.parquet")
    # Premises, checked: the copies are exactly the embedding groups, and the variants are
    # clearly near-identical (or clearly distinct) by exact Jaccard.
    stored = normalize(np.array(embeddings, dtype=np.float16))
    expected = {row: group[0] for group in members for row in group}
    assert groups_of(brute_force_pairs(stored, THRESHOLD)) == expected
    for copies, clusters in GROUPS:
        for (a, ca), (b, cb) in itertools.combinations(zip(copies, clusters), 2):
            similarity = exact_jaccard(a, b)
            if similarity is not None:
                assert (similarity >= 0.8) if ca == cb else (similarity <= 0.2), (a, b, similarity)
    return captions, members


def test_caption_policies_on_known_variants(spark, tmp_path):
    captions, members = hand_built(tmp_path / "in")
    reports = {}
    for policy in ("merge", "keep_distinct"):
        # One work prefix: the second run reuses read to search and redoes the group stage on.
        reports[policy] = run_job(spark, tmp_path / "in", tmp_path / policy, bucketing__k=1, run__keep_work=True,
                                  run__work_dir=str(tmp_path / "work"), captions__column="auto",
                                  captions__policy=policy)
    assert reports["keep_distinct"]["stages_reused"] == ["read", "train", "assign", "search"]
    car, house, sunset, dog_less, cat, dog = (members[0][0], members[0][4], members[1][0], members[2][0],
                                              members[2][1], members[2][2])
    in_groups = {row for group in members for row in group}

    # Caption similarity to the kept row (every policy, ignore too) is close to the exact Jaccard.
    duplicates = read_table(tmp_path / "merge" / "duplicates").to_pylist()
    kept_of = {d["group_id"]: d["row_id"] for d in duplicates if d["is_kept"]}
    assert sorted(kept_of.values()) == sorted(group[0] for group in members)
    for row in duplicates:
        exact = exact_jaccard(captions[row["row_id"]], captions[kept_of[row["group_id"]]])
        if exact is None:
            assert row["caption_similarity"] is None
        else:
            assert abs(row["caption_similarity"] - exact) < 0.18, (row, exact)
    # Group 3's kept row has no caption, so its members have no similarity.
    assert reports["merge"]["captions"]["members_with_similarity"] == 8

    # merge: the rows survive as without captions; kept rows list their group's distinct captions,
    # own caption first, near-identical captions once.
    merged = pq.read_table(tmp_path / "merge" / "dedup" / "metadata" / "metadata_0.parquet").to_pylist()
    assert [int(row["key"][1:]) for row in merged] == [
        row for row in range(len(captions)) if row not in in_groups or row in kept_of.values()]
    lists = {int(row["key"][1:]): row["captions"] for row in merged}
    assert lists[car] == [CAR, "Blueprint drawing of a wooden house"]
    assert lists[sunset] == ["Sunset over the mountains"]
    assert lists[dog_less] == ["cat", "A photo of a dog playing in the snow"]
    assert all(lists[row] is None for row in lists if row not in (car, sunset, dog_less))
    assert reports["merge"]["captions"]["merged_rows"] == 3
    assert reports["merge"]["accounting"]["balanced"] and reports["merge"]["accounting"]["removed_rows"] == 11 - 3

    # keep_distinct: one row per caption cluster survives; rows without a caption only as the group's kept row.
    distinct = read_table(tmp_path / "keep_distinct" / "duplicates").to_pylist()
    kept = sorted(row["row_id"] for row in distinct if row["is_kept"])
    assert kept == sorted([car, house, sunset, dog_less, cat, dog])
    clusters = {row["row_id"]: row["caption_group"] for row in distinct}
    assert len({clusters[row] for row in members[0][:4]}) == 1 and clusters[house] == house
    assert clusters[dog_less] is None
    written = pq.read_table(tmp_path / "keep_distinct" / "dedup" / "metadata" / "metadata_0.parquet")
    assert sorted(int(key[1:]) for key in written.column("key").to_pylist()) == sorted(
        kept + [row for row in range(len(captions)) if row not in in_groups])
    summary = reports["keep_distinct"]["captions"]
    assert summary["rows_kept_for_their_caption"] == 3 and summary["groups_with_several_captions"] == 2
    assert reports["keep_distinct"]["accounting"]["removed_rows"] == 11 - 6
    # The calibration table counts by embeddings alone, whatever the policy keeps.
    assert reports["keep_distinct"]["calibration"][0]["removed_rows"] == 11 - 3
    # report.html shows the captions section with report.json's numbers.
    keys = check_html_numbers((tmp_path / "keep_distinct" / "report.html").read_text(), reports["keep_distinct"])
    assert {"captions.rows_kept_for_their_caption", "captions.groups_with_several_captions"} <= keys


def test_caption_policies_need_a_caption_column(spark, tmp_path):
    root = tmp_path / "npy"
    root.mkdir()
    np.save(root / "emb_0.npy", np.random.default_rng(0).standard_normal((50, 8)).astype(np.float16))
    with pytest.raises(ConfigError, match="needs a caption column"):
        run_job(spark, root, tmp_path / "out", captions__column="auto", captions__policy="merge")
    hand_built(tmp_path / "in")
    with pytest.raises(ConfigError, match="captions.column 'title' is not an input column"):
        run_job(spark, tmp_path / "in", tmp_path / "out2", captions__column="title")

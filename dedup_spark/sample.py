"""A seeded generator of CLIP-like embedding datasets with planted near-duplicates.

What makes it look like CLIP output rather than isotropic noise:
- every vector shares a common direction and a topic direction, so unrelated
  rows have cosine similarities spread over roughly 0.1-0.8 (CLIP image
  embeddings of unrelated images are far from orthogonal);
- the noise is anisotropic (variance falls as 1/rank over the dimensions);
- topics have Zipf-like sizes;
- duplicate groups have power-law sizes (most 2-3 copies, a few thousands);
- copies sit at a similarity to their original drawn from a distribution that
  includes exact copies and straddles the usual thresholds, so pairs inside a
  planted group fall on both sides of 0.95;
- captions are equal inside a group about 60% of the time.

The ground truth is the planted group of every row; which pairs are above a
threshold is for a brute-force oracle to decide, not the generator.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SYLLABLES = ["ka", "lo", "mi", "ra", "te", "su", "no", "vi", "ba", "de", "po", "zu", "fe", "gi", "ha", "jo"]


@dataclass(frozen=True)
class SampleSpec:
    rows: int = 100_000
    dim: int = 512
    seed: int = 0
    duplicate_fraction: float = 0.3   # share of rows that are copies of another row
    exact_copy_fraction: float = 0.2  # share of copies that are bit-identical
    group_size_exponent: float = 2.2  # P(size = s) ~ s^-exponent, s >= 2
    max_group_size: int | None = None  # default: max(3, rows // 25)
    topics: int | None = None         # default: max(4, rows // 2000)


@dataclass
class Sample:
    embeddings: np.ndarray  # rows x dim float16, unit norm
    planted_group: np.ndarray  # int64, the group of each row (singletons have their own)
    topic: np.ndarray
    captions: list[str]
    widths: np.ndarray
    heights: np.ndarray
    spec: SampleSpec


def _group_sizes(rng: np.random.Generator, copy_rows: int, exponent: float, cap: int) -> list[int]:
    sizes: list[int] = []
    support = np.arange(2, cap + 1)
    weights = support.astype(np.float64) ** -exponent
    weights /= weights.sum()
    remaining = copy_rows
    while remaining > 0:
        draws = rng.choice(support, size=256, p=weights)
        for size in draws:
            extra = int(size) - 1  # rows beyond the original
            if extra > remaining:
                extra = remaining
            sizes.append(extra + 1)
            remaining -= extra
            if remaining <= 0:
                break
    return sizes


def _words(rng: np.random.Generator, count: int) -> list[str]:
    return ["".join(rng.choice(SYLLABLES, size=rng.integers(2, 4))) for _ in range(count)]


def generate(spec: SampleSpec) -> Sample:
    rng = np.random.default_rng(spec.seed)
    n, d = spec.rows, spec.dim
    cap = spec.max_group_size or max(3, n // 25)
    n_topics = spec.topics or max(4, n // 2000)

    copy_rows = int(round(n * spec.duplicate_fraction))
    sizes = _group_sizes(rng, copy_rows, spec.group_size_exponent, cap) if copy_rows else []
    n_items = n - sum(s - 1 for s in sizes)  # originals: singletons plus one per group

    spectrum = (1.0 / np.arange(1, d + 1)) ** 0.5
    spectrum = (spectrum / np.linalg.norm(spectrum)).astype(np.float32)
    common = rng.standard_normal(d).astype(np.float32)
    common /= np.linalg.norm(common)
    centers = rng.standard_normal((n_topics, d)).astype(np.float32) * spectrum * np.sqrt(d)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    topic_weights = 1.0 / np.arange(1, n_topics + 1) ** 1.1
    topic_weights /= topic_weights.sum()
    item_topic = rng.choice(n_topics, size=n_items, p=topic_weights)

    # Originals: common + topic + anisotropic noise, built in chunks to bound memory.
    items = np.empty((n_items, d), dtype=np.float16)
    for start in range(0, n_items, 65536):
        stop = min(start + 65536, n_items)
        noise = rng.standard_normal((stop - start, d)).astype(np.float32) * spectrum
        vectors = 0.62 * common + 0.55 * centers[item_topic[start:stop]] + 0.78 * noise
        items[start:stop] = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)

    # Every row: which item it copies and at what similarity to it.
    row_item = np.arange(n_items, dtype=np.int64)
    row_sim = np.ones(n_items, dtype=np.float32)
    group_item = rng.choice(n_items, size=len(sizes), replace=False) if sizes else np.zeros(0, np.int64)
    extra_items = [np.full(s - 1, item, dtype=np.int64) for s, item in zip(sizes, group_item)]
    if extra_items:
        copies_of = np.concatenate(extra_items)
        exact = rng.random(copies_of.size) < spec.exact_copy_fraction
        # Mostly very close, with a tail reaching below typical thresholds.
        sim = 1.0 - rng.gamma(shape=1.5, scale=0.012, size=copies_of.size)
        sim = np.where(exact, 1.0, np.clip(sim, 0.85, 1.0)).astype(np.float32)
        row_item = np.concatenate([row_item, copies_of])
        row_sim = np.concatenate([row_sim, sim])

    order = rng.permutation(n)
    row_item, row_sim = row_item[order], row_sim[order]

    embeddings = np.empty((n, d), dtype=np.float16)
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        base = items[row_item[start:stop]].astype(np.float32)
        sim = row_sim[start:stop, None]
        noise = rng.standard_normal((stop - start, d)).astype(np.float32) * spectrum
        noise -= np.einsum("ij,ij->i", noise, base)[:, None] * base
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        vectors = sim * base + np.sqrt(np.maximum(0.0, 1.0 - sim * sim)) * noise
        vectors = np.where(sim >= 1.0, base, vectors)
        embeddings[start:stop] = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
        embeddings[start:stop][row_sim[start:stop] >= 1.0] = items[row_item[start:stop][row_sim[start:stop] >= 1.0]]

    vocab = [_words(rng, 40) for _ in range(n_topics)]
    item_caption_seed = rng.integers(0, 2**31, size=n_items)
    reword = rng.random(n) < 0.4
    captions = []
    for row in range(n):
        item = row_item[row]
        words = vocab[item_topic[item]]
        local = np.random.default_rng(item_caption_seed[item] + (row if reword[row] else 0))
        captions.append(" ".join(words[i] for i in local.integers(0, len(words), size=local.integers(3, 9))))
    widths = rng.choice([256, 320, 512, 640, 768, 1024, 1280], size=n)
    heights = (widths * rng.choice([0.5625, 0.75, 1.0, 1.333], size=n)).astype(np.int64)
    return Sample(embeddings, row_item, item_topic[row_item], captions, widths, heights, spec)


def write(
    sample: Sample,
    out_dir: str | Path,
    fmt: str = "laion",
    shard_rows: int = 10_000,
    dtype: str = "float16",
    list_type: str = "list",
    id_column: str | None = None,
) -> dict:
    """Write the sample as shards plus ``ground_truth.parquet``; returns a summary.

    fmt: laion (img_emb/*.npy + metadata/*.parquet), parquet (an ``embedding``
    column of ``list_type`` list|fixed_size_list|binary of ``dtype``), npy.
    ``id_column``: write unique non-sequential int64 ids under this name
    (parquet only); the ground truth's row_id is then that id.
    """
    out = Path(out_dir)
    n = sample.embeddings.shape[0]
    values = sample.embeddings.astype(dtype)
    ids = np.arange(n, dtype=np.int64)
    if id_column:
        if fmt != "parquet":
            raise ValueError("id_column is only written for parquet samples")
        ids = np.random.default_rng(sample.spec.seed + 7).permutation(n).astype(np.int64) * 3 + 1000
    keys = [f"{i:09d}" for i in range(n)]
    shards = []
    for index, start in enumerate(range(0, n, shard_rows)):
        stop = min(start + shard_rows, n)
        metadata = {
            "key": keys[start:stop],
            "caption": sample.captions[start:stop],
            "url": [f"https://img.example.com/{sample.topic[i]}/{keys[i]}.jpg" for i in range(start, stop)],
            "width": sample.widths[start:stop],
            "height": sample.heights[start:stop],
        }
        if fmt == "laion":
            (out / "img_emb").mkdir(parents=True, exist_ok=True)
            (out / "metadata").mkdir(parents=True, exist_ok=True)
            np.save(out / "img_emb" / f"img_emb_{index}.npy", values[start:stop])
            pq.write_table(pa.table(metadata), out / "metadata" / f"metadata_{index}.parquet")
        elif fmt == "npy":
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / f"emb_{index}.npy", values[start:stop])
        elif fmt == "parquet":
            out.mkdir(parents=True, exist_ok=True)
            block = values[start:stop]
            flat = pa.array(block.reshape(-1), type=pa.from_numpy_dtype(block.dtype))
            if list_type == "list":
                column = pa.ListArray.from_arrays(pa.array(np.arange(0, block.size + 1, block.shape[1], dtype=np.int32)), flat)
            elif list_type == "fixed_size_list":
                column = pa.FixedSizeListArray.from_arrays(flat, block.shape[1])
            elif list_type == "binary":
                column = pa.array([row.tobytes() for row in block], type=pa.binary())
            else:
                raise ValueError(f"unknown list_type {list_type}")
            columns = {**({id_column: ids[start:stop]} if id_column else {}), "embedding": column, **metadata}
            pq.write_table(pa.table(columns), out / f"part_{index}.parquet", row_group_size=max(1, shard_rows // 3))
        else:
            raise ValueError(f"unknown format {fmt}")
        shards.append(index)
    truth = pa.table({
        "row_id": ids,
        "planted_group": sample.planted_group,
        "planted_group_size": np.bincount(sample.planted_group)[sample.planted_group],
    })
    pq.write_table(truth, out.parent / f"{out.name}_ground_truth.parquet")
    summary = {"rows": n, "dim": int(values.shape[1]), "format": fmt, "shards": len(shards),
               "planted_groups": int(np.sum(np.bincount(sample.planted_group) > 1)),
               "largest_group": int(np.bincount(sample.planted_group).max()), "spec": asdict(sample.spec)}
    (out.parent / f"{out.name}_ground_truth.json").write_text(json.dumps(summary, indent=2))
    return summary

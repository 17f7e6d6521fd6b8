"""Caption similarity kernels: shingles, MinHash signatures (datasketch's, batched), band keys.

Pure numpy / datasketch, no Spark, so they are unit-tested directly; the Spark
plumbing that applies them per duplicate group is ``dedup_spark.captions``.

A caption is normalised (lowercased, punctuation dropped, whitespace collapsed)
and cut into shingles: character n-grams (``chars``, default n = 4; robust to
small edits and word order) or word n-grams (``words``). Two captions'
similarity is the Jaccard similarity of their shingle sets, estimated from
``num_perm`` MinHash values: the share of equal values, with standard error
sqrt(J(1-J)/num_perm) (at most 0.044 for 128 values). Shingles are hashed with
CRC-32 (datasketch mixes it before its permutations): a third of the cost of its
default SHA-1, and deterministic across processes, unlike Python's ``hash``.
The signatures are datasketch's affine32 MinHash values, computed for a whole
batch of captions in numpy (20 us a caption against 86 us through datasketch's
per-caption calls); a test holds them equal to datasketch's own.
"""

from __future__ import annotations

import itertools
import re
import zlib

import numpy as np

_PUNCTUATION = re.compile(r"[^\w\s]+")
# Band hashing: a fixed random odd 64-bit multiplier per signature position.
_BAND_MULTIPLIERS = np.random.default_rng(20261123).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def normalise(caption: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", caption.lower()).split())


def shingles(caption: str | None, kind: str = "chars", size: int = 4) -> list[bytes]:
    """The caption's distinct shingles as bytes; empty for a missing or blank caption."""
    if caption is None:
        return []
    text = normalise(caption)
    if not text:
        return []
    if kind == "words":
        words = text.split()
        grams = {" ".join(words[i:i + size]) for i in range(max(1, len(words) - size + 1))}
    else:
        grams = {text[i:i + size] for i in range(max(1, len(text) - size + 1))}
    return [gram.encode() for gram in grams]


def signatures(captions: list[str | None], num_perm: int = 128, kind: str = "chars", size: int = 4,
               seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """MinHash values (rows x num_perm, uint32) and a mask of rows that have a caption.

    Row i equals datasketch's ``MinHash(num_perm, seed, hashfunc=zlib.crc32,
    scheme="affine32")`` updated with caption i's shingles (its permutations, its
    MurmurHash3 pre-mix and its uint32 affine maps), computed for many captions in
    one numpy pass instead of datasketch's per-caption calls. Rows without a caption
    (null, or nothing left after normalising) get zeros and False in the mask; they
    have no caption similarity.
    """
    multipliers, offsets = _permutations(num_perm, seed)
    values = np.zeros((len(captions), num_perm), dtype=np.uint32)
    hashed = [[zlib.crc32(gram) for gram in shingles(caption, kind, size)] for caption in captions]
    counts = np.fromiter((len(h) for h in hashed), dtype=np.int64, count=len(hashed))
    present = counts > 0
    rows = np.flatnonzero(present)
    ends = np.cumsum(counts[rows])
    start = 0
    while start < rows.size:
        # Captions up to _CHUNK_SHINGLES shingles (at least one caption) bound the work matrix.
        done = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + _CHUNK_SHINGLES, side="right")))
        chunk = rows[start:stop]
        flat = _fmix32(np.fromiter(itertools.chain.from_iterable(hashed[row] for row in chunk), dtype=np.uint32,
                                   count=int(counts[chunk].sum())))
        with np.errstate(over="ignore"):
            # num_perm x shingles: each caption's shingles are a contiguous run of every row.
            permuted = multipliers[:, None] * flat + offsets[:, None]
        starts = np.concatenate([[0], np.cumsum(counts[chunk])[:-1]])
        values[chunk] = np.minimum.reduceat(permuted, starts, axis=1).T
        start = stop
    return values, present


_CHUNK_SHINGLES = 1 << 15
_PERMUTATIONS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 (a, b) parameters for (num_perm, seed), taken from datasketch itself."""
    if (num_perm, seed) not in _PERMUTATIONS:
        from datasketch import MinHash

        a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        _PERMUTATIONS[(num_perm, seed)] = (a.astype(np.uint32), b.astype(np.uint32))
    return _PERMUTATIONS[(num_perm, seed)]


def _fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's pre-mix for affine32), element-wise."""
    with np.errstate(over="ignore"):
        values = values ^ (values >> np.uint32(16))
        values = values * np.uint32(0x85EBCA6B)
        values = values ^ (values >> np.uint32(13))
        values = values * np.uint32(0xC2B2AE35)
        return values ^ (values >> np.uint32(16))


def similarity(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of paired signatures (rows x num_perm each)."""
    if len(left) == 0:
        return np.zeros(0, dtype=np.float32)
    return (left == right).mean(axis=1).astype(np.float32)


def band_layout(num_perm: int, same_caption: float, candidate_probability: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band) for LSH candidates among captions of one group.

    Two captions with similarity s share at least one band with probability
    1 - (1 - s^r)^b. The widest band (fewest chance candidates) that still makes
    pairs at ``same_caption`` candidates with ``candidate_probability`` is
    chosen; candidates are then verified on their estimated similarity.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1.0 - (1.0 - same_caption**rows) ** bands >= candidate_probability:
            best = (bands, rows)
    return best


def band_keys(values: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """A 64-bit key per (row, band): equal bands give equal keys (rows x bands, int64)."""
    keys = np.empty((len(values), bands), dtype=np.uint64)
    wide = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            block = wide[:, band * rows:(band + 1) * rows]
            keys[:, band] = (block * _BAND_MULTIPLIERS[band * rows:(band + 1) * rows]).sum(axis=1, dtype=np.uint64)
    return keys.view(np.int64)

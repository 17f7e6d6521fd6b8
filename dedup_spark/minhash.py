"""Caption similarity kernels: shingles, MinHash signatures (datasketch's, batched), band keys.

Pure numpy / datasketch, no Spark, so they are unit-tested directly; the Spark
plumbing that applies them per duplicate group is ``dedup_spark.captions``.

A caption is normalised (lowercased, punctuation dropped, whitespace collapsed)
and cut into shingles: character n-grams (``chars``, default n = 4; robust to
small edits and word order) or word n-grams (``words``). Two captions'
similarity is the Jaccard similarity of their shingle sets, estimated from
``num_perm`` MinHash values: the share of equal values, with standard error
sqrt(J(1-J)/num_perm) (at most 0.044 for 128 values). Shingles are hashed with
CRC-32 (datasketch mixes it before its permutations): deterministic across
processes, unlike Python's ``hash``, and computable for every shingle of a batch
at once in numpy, unlike its default SHA-1. The signatures are datasketch's
affine32 MinHash values, computed for a whole batch of captions in numpy, with
only the normalising done caption by caption in Python: 4.5 us a caption of 29
shingles, against 18 us when each shingle was a Python string hashed by zlib and
86 us through datasketch's per-caption calls; a test holds them equal to
datasketch's own, for ASCII and other text.
"""

from __future__ import annotations

import re

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
    scheme="affine32")`` updated with ``shingles(caption i)`` (its permutations, its
    MurmurHash3 pre-mix and its uint32 affine maps), computed for many captions in
    numpy: the normalised captions are joined into one UTF-8 buffer, every shingle is a
    byte range of it (``_shingle_ranges``) and all ranges are CRC-32 hashed at once
    (``_crc32_ranges``), so only normalising is a per-caption Python call. A shingle
    repeated in a caption is hashed twice, which leaves the minimum unchanged. Rows
    without a caption (null, or nothing left after normalising) get zeros and False
    in the mask; they have no caption similarity.
    """
    multipliers, offsets = _permutations(num_perm, seed)
    encoded = [b"" if caption is None else normalise(caption).encode() for caption in captions]
    buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    byte_lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    starts, lengths, counts = _shingle_ranges(buffer, byte_lengths, kind, size)
    hashed = _fmix32(_crc32_ranges(buffer, starts, lengths))
    values = np.zeros((len(captions), num_perm), dtype=np.uint32)
    present = counts > 0
    rows = np.flatnonzero(present)
    ends = np.cumsum(counts[rows])
    start = 0
    while start < rows.size:
        # Captions up to _CHUNK_SHINGLES shingles (at least one caption): the work matrix stays in cache.
        done = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + _CHUNK_SHINGLES, side="right")))
        with np.errstate(over="ignore"):
            # num_perm x shingles: each caption's shingles are a contiguous run of every row.
            permuted = multipliers[:, None] * hashed[done:ends[stop - 1]]
            permuted += offsets[:, None]
        firsts = np.concatenate([[0], ends[start:stop - 1] - done])
        values[rows[start:stop]] = np.minimum.reduceat(permuted, firsts, axis=1).T
        start = stop
    return values, present


def _shingle_ranges(buffer: np.ndarray, byte_lengths: np.ndarray, kind: str,
                    size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every shingle of every caption as a byte range of ``buffer`` (the normalised captions, UTF-8,
    back to back; ``byte_lengths`` each): (starts, lengths) in caption order, and shingles per caption.

    The units are characters (a byte that is not a UTF-8 continuation byte starts one) or words
    (normalised text holds single spaces between words). A caption of n >= size units has
    n - size + 1 shingles of ``size`` units; a shorter non-empty one is one shingle, itself,
    as in ``shingles``.
    """
    bounds = np.concatenate([[0], np.cumsum(byte_lengths)])
    if kind == "words":
        letter = buffer != ord(" ")
        caption_first = np.zeros(buffer.size, dtype=bool)
        caption_first[bounds[:-1][byte_lengths > 0]] = True
        caption_last = np.zeros(buffer.size, dtype=bool)
        caption_last[bounds[1:][byte_lengths > 0] - 1] = True
        after_space = np.concatenate([[True], ~letter[:-1]])
        before_space = np.concatenate([~letter[1:], [True]])
        unit_starts = np.flatnonzero(letter & (caption_first | after_space))
        unit_ends = np.flatnonzero(letter & (caption_last | before_space)) + 1
    else:
        unit_starts = np.flatnonzero((buffer & 0xC0) != 0x80)
        # A character ends where the next one starts; the last caption's last one at the buffer's end.
        unit_ends = np.append(unit_starts[1:], buffer.size)
    first_unit = np.searchsorted(unit_starts, bounds)
    units = np.diff(first_unit)
    counts = np.where(units >= size, units - size + 1, np.minimum(units, 1))
    owner = np.repeat(np.arange(units.size), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    first = first_unit[:-1][owner] + within
    last = first + np.minimum(size, units[owner]) - 1
    starts = unit_starts[first]
    return starts, unit_ends[last] - starts, counts


def _crc_table() -> np.ndarray:
    """The byte-wise table of the reflected CRC-32 (polynomial 0xEDB88320) that zlib.crc32 computes."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> np.uint32(1)) ^ np.uint32(0xEDB88320), table >> np.uint32(1))
    return table.astype(np.uint32)


_CRC_TABLE = _crc_table()


def _crc32_ranges(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``zlib.crc32(bytes(buffer[start:start + length]))`` for every range, one byte position at a time
    over all ranges still that long (longest first, so the active ranges are a prefix)."""
    order = np.argsort(-lengths, kind="stable")
    ordered_starts, ordered_lengths = starts[order], lengths[order]
    state = np.full(order.size, 0xFFFFFFFF, dtype=np.uint32)
    longest = int(ordered_lengths[0]) if order.size else 0
    # Ranges longer than k: a prefix of the descending lengths.
    active = np.searchsorted(-ordered_lengths, -np.arange(longest), side="left")
    for position in range(longest):
        count = active[position]
        current = state[:count]
        state[:count] = _CRC_TABLE[(current ^ buffer[ordered_starts[:count] + position]) & 0xFF] ^ (current >> np.uint32(8))
    hashed = np.empty_like(state)
    hashed[order] = state ^ np.uint32(0xFFFFFFFF)
    return hashed


_CHUNK_SHINGLES = 1 << 13
_PERMUTATIONS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 (a, b) parameters for (num_perm, seed), drawn as datasketch draws them
    (MinHash._init_permutations: odd a, then b, from one RandomState(seed)); a test holds them equal
    to datasketch's own. Not taken from datasketch itself: importing it (scipy with it) took 0.35 s
    in every Python worker, 2.3 s of CPU at the 1M bench."""
    if (num_perm, seed) not in _PERMUTATIONS:
        generator = np.random.RandomState(seed)
        a = generator.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = generator.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        _PERMUTATIONS[(num_perm, seed)] = (a, b)
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

"""``npy``: ``*.npy`` shards of rows x d floats, nothing else. Also the kind of LAION's embedding files."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from dedup_spark import storage
from dedup_spark.errors import InputError

# Rows copied per write, and bytes decoded per read.
_COPY_ROWS = 65536
_DECODE_BYTES = 64 << 20


def detects(relatives: list[str]) -> bool:
    return any(relative.endswith(".npy") for relative in relatives)


def header(uri: str) -> tuple[int, int, str, int]:
    """rows, dim, dtype, data offset of a .npy file, from its header (and size) only."""
    with storage.open_input(uri) as handle:
        try:
            version = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(handle)
        except (ValueError, EOFError, SyntaxError) as error:
            raise InputError(f"{uri}: not a readable .npy file ({error})") from None
        offset = handle.tell()
        size = handle.size()
    if fortran:
        raise InputError(f"{uri}: Fortran-ordered arrays are not supported; save with np.ascontiguousarray")
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise InputError(f"{uri}: embeddings must be float16/32/64, found {dtype}")
    if len(shape) != 2:
        raise InputError(f"{uri}: expected a 2-D array (rows x dim), found shape {shape}")
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    if size < expected:
        raise InputError(f"{uri}: truncated: its header promises {shape[0]} x {shape[1]} {dtype} "
                         f"({expected} bytes) but the file has {size}")
    return int(shape[0]), int(shape[1]), dtype.newbyteorder("<").str if dtype.byteorder == ">" else dtype.str, offset


def candidate(uri: str, root: str, relative: Callable[[str, str], str]) -> dict:
    """A shard candidate of one .npy embedding file."""
    rows, dim, dtype, data_offset = storage.retrying(header, uri, uri=uri)
    return {"kind": "npy", "embedding_uri": uri, "metadata_uri": None, "relative": [relative(uri, root)],
            "rows": rows, "dim": dim, "dtype": dtype, "data_offset": data_offset, "row_groups": [], "columns": None}


def find_shards(root: str, files: list[str], config, bad_shard: Callable[[str, str, int | None], None],
                relative: Callable[[str, str], str], order: Callable[[str], list]) -> list[dict]:
    candidates = []
    for uri in sorted((f for f in files if f.endswith(".npy")), key=order):
        try:
            candidates.append(candidate(uri, root, relative))
        except InputError as error:
            bad_shard(uri, str(error), None)
    return candidates


def decode(shard, dim: int, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows x dim matrix) blocks of rows [start, stop) of the shard's npy file."""
    itemsize = np.dtype(shard.dtype).itemsize
    step = max(1, _DECODE_BYTES // (dim * itemsize))
    with storage.open_input(shard.embedding_uri) as handle:
        for block in range(start, stop, step):
            block_stop = min(block + step, stop)
            raw = handle.read_at((block_stop - block) * dim * itemsize, shard.data_offset + block * dim * itemsize)
            yield block, np.frombuffer(raw, dtype=shard.dtype).reshape(block_stop - block, dim)


def rewrite(shard, keep: np.ndarray, target: str) -> None:
    """The shard's npy file with only the ``keep`` rows, streamed in bounded blocks."""
    dtype = np.dtype(shard.dtype)
    width = shard.dim * dtype.itemsize
    with storage.open_input(shard.embedding_uri) as source, storage.open_output(target) as sink:
        np.lib.format.write_array_header_1_0(
            sink, {"descr": dtype.str, "fortran_order": False, "shape": (int(keep.sum()), shard.dim)})
        for start in range(0, shard.rows, _COPY_ROWS):
            stop = min(start + _COPY_ROWS, shard.rows)
            raw = source.read_at((stop - start) * width, shard.data_offset + start * width)
            block = np.frombuffer(raw, dtype=dtype).reshape(stop - start, shard.dim)
            sink.write(np.ascontiguousarray(block[keep[start:stop]]).tobytes())


def rows_in(uri: str) -> int:
    """Rows of a written npy file, from its header."""
    return storage.retrying(header, uri, uri=uri)[0]

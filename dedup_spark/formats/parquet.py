"""``parquet``: ``*.parquet`` files (any depth) with an embedding column and any other columns.
Also the kind of LAION's metadata files."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup_spark import kernels, storage, tables
from dedup_spark.errors import InputError

CAPTIONS_COLUMN = "captions"


def detects(relatives: list[str]) -> bool:
    return any(relative.endswith(".parquet") for relative in relatives)


def footer(uri: str, embedding_column: str | None,
                    binary_dtype: str) -> tuple[int, list[int], int | None, str, list[str]]:
    """rows, row-group sizes, dim (None when unknown), value dtype and column names of a parquet file."""
    with storage.open_input(uri) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"{uri}: not a readable parquet file ({error})") from None
        metadata = parquet.metadata
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        schema = parquet.schema_arrow
        names = list(schema.names)
        if embedding_column is None:
            return metadata.num_rows, groups, None, "", names
        if embedding_column not in schema.names:
            raise InputError(f"{uri}: no embedding column {embedding_column!r}; columns are {schema.names}")
        column_type = schema.field(embedding_column).type
        if pa.types.is_fixed_size_list(column_type):
            return (metadata.num_rows, groups, column_type.list_size, str(column_type.value_type.to_pandas_dtype()().dtype),
                    names)
        if pa.types.is_list(column_type) or pa.types.is_large_list(column_type):
            value_type = column_type.value_type
            if not pa.types.is_floating(value_type):
                raise InputError(f"{uri}: {embedding_column} must hold floats, found {column_type}")
            dim = None
            if metadata.num_rows:
                # The footer does not record list lengths: look at the first rows only.
                first = parquet.read_row_group(0, columns=[embedding_column]).column(0).slice(0, 64)
                lengths = [len(v) for v in first.to_pylist() if v is not None]
                dim = Counter(lengths).most_common(1)[0][0] if lengths else None
            return metadata.num_rows, groups, dim, np.dtype(value_type.to_pandas_dtype()).name, names
        if pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type):
            dim = None
            if metadata.num_rows:
                first = parquet.read_row_group(0, columns=[embedding_column]).column(0).slice(0, 64)
                lengths = [len(v) for v in first.to_pylist() if v is not None]
                itemsize = np.dtype(binary_dtype).itemsize
                dim = Counter(lengths).most_common(1)[0][0] // itemsize if lengths else None
            return metadata.num_rows, groups, dim, binary_dtype, names
        raise InputError(f"{uri}: {embedding_column} has unsupported type {column_type}")


def find_shards(root: str, files: list[str], config, bad_shard: Callable[[str, str, int | None], None],
                relative: Callable[[str, str], str], order: Callable[[str], list]) -> list[dict]:
    candidates = []
    for uri in sorted((f for f in files if f.endswith(".parquet")), key=order):
        try:
            rows, groups, dim, dtype, columns = storage.retrying(
                footer, uri, config.input.embedding_column, config.input.binary_dtype, uri=uri)
        except InputError as error:
            bad_shard(uri, str(error), None)
            continue
        candidates.append({"kind": "parquet", "embedding_uri": uri, "metadata_uri": uri,
                           "relative": [relative(uri, root)], "rows": rows, "dim": dim, "dtype": dtype,
                           "data_offset": 0, "row_groups": groups, "columns": columns})
    return candidates


def decode(shard, dim: int, start: int, stop: int, embedding_column: str, binary_dtype: str,
           id_column: str | None) -> Iterator[tuple[int, np.ndarray, np.ndarray, pa.Array | None]]:
    """(first row, rows x dim matrix, reject reason per row, id column or None) per row group of
    rows [start, stop) (a chunk always spans whole row groups)."""
    columns = [embedding_column] + ([id_column] if id_column else [])
    bounds = np.cumsum([0] + shard.row_groups)
    groups = [g for g in range(len(shard.row_groups)) if bounds[g] >= start and bounds[g + 1] <= stop]
    with storage.open_input(shard.embedding_uri) as handle:
        parquet = pq.ParquetFile(handle)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise InputError(f"{shard.embedding_uri}: missing column(s) {missing}")
        for group in groups:
            table = parquet.read_row_group(group, columns=columns)
            column = table.column(embedding_column).combine_chunks()
            if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
                matrix, reasons = _binary_values(column, dim, binary_dtype)
            else:
                matrix, reasons = _list_matrix(column, dim)
            ids = table.column(id_column).combine_chunks() if id_column else None
            yield int(bounds[group]), matrix, reasons, ids


def chunks(shard, chunk_rows: int) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk_rows`` rows along row-group boundaries."""
    ranges = []
    start = stop = 0
    for size in shard.row_groups:
        stop += size
        if stop - start >= chunk_rows:
            ranges.append((start, stop))
            start = stop
    if stop > start:
        ranges.append((start, stop))
    return ranges


def _list_matrix(column: pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Matrix (rows x dim, float) and per-row reason for a list/fixed-size/binary column."""
    n = len(column)
    reasons = np.full(n, None, dtype=object)
    null = column.is_null().to_numpy(zero_copy_only=False)
    reasons[null] = kernels.REJECT_NULL_EMBEDDING
    if pa.types.is_fixed_size_list(column.type):
        size = column.type.list_size
        values = column.values.slice(column.offset * size, n * size)
        flat = values.to_numpy(zero_copy_only=False)
        if size != dim:
            reasons[~null] = kernels.REJECT_WRONG_DIM
            return np.zeros((n, dim), np.float32), reasons
        return flat.reshape(n, dim), reasons
    offsets = column.offsets.to_numpy()
    lengths = np.diff(offsets)
    wrong = ~null & (lengths != dim)
    reasons[wrong] = kernels.REJECT_WRONG_DIM
    good = ~null & ~wrong
    flat = column.values.to_numpy(zero_copy_only=False)
    matrix = np.zeros((n, dim), dtype=flat.dtype)
    if good.any():
        index = offsets[:-1][good][:, None] + np.arange(dim)
        matrix[good] = flat[index]
    return matrix, reasons


def _binary_values(column: pa.Array, dim: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(column)
    reasons = np.full(n, None, dtype=object)
    null = column.is_null().to_numpy(zero_copy_only=False)
    reasons[null] = kernels.REJECT_NULL_EMBEDDING
    width = dim * np.dtype(dtype).itemsize
    lengths = pc.binary_length(column).to_numpy(zero_copy_only=False)
    wrong = ~null & (np.nan_to_num(lengths, nan=-1) != width)
    reasons[wrong] = kernels.REJECT_WRONG_DIM
    matrix = np.zeros((n, dim), dtype=dtype)
    good = np.flatnonzero(~null & ~wrong)
    if good.size:
        # Each good row's bytes start at its offset: one gather, not a Python call per row.
        offsets, data = tables.binary_buffers(column)
        matrix[good] = data[offsets[good][:, None] + np.arange(width)].view(dtype)
    return matrix, reasons


def rewrite(source_uri: str, keep: np.ndarray, target: str, captions: pa.Array | None = None) -> None:
    """Copy the kept rows, row group by row group; ``captions`` (one list per input row) is appended
    as the ``captions`` column."""
    with storage.open_input(source_uri) as source, storage.open_output(target) as sink:
        parquet = pq.ParquetFile(source)
        schema = parquet.schema_arrow if captions is None else parquet.schema_arrow.append(
            pa.field(CAPTIONS_COLUMN, captions.type))
        with pq.ParquetWriter(sink, schema) as writer:
            start = 0
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                stop = start + table.num_rows
                if captions is not None:
                    table = table.append_column(CAPTIONS_COLUMN, captions.slice(start, stop - start))
                writer.write_table(table.filter(pa.array(keep[start:stop])))
                start = stop


def rows_in(uri: str) -> int:
    """Rows of a written parquet file, from its footer."""
    return storage.retrying(footer, uri, None, "float16", uri=uri)[0]

"""Read stage: shard manifest on the driver, embedding rows decoded in tasks.

Stage ``read``: in, the input's shards (``Manifest``); out, the rows table
(``Work.rows``), the training and recall-probe samples drawn in the same pass
(``Work.sample``, ``Work.cell_sample``) and ``rejected/``; its result counts the
valid and rejected rows by reason.

The manifest is built from file headers (npy) and footers (parquet) only. Rows
come out as ``row_id, shard_id, shard_row, embedding, reject_reason``: the
embedding is the L2-normalised float16 vector as bytes, or null when the row is
rejected (NaN/inf, zero norm, wrong dimension, null embedding, null id) with
the reason saying why. ``row_id`` is the id column when one is named, else the
global row index in sorted shard order.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import faults, formats, kernels, storage, tables
from dedup_spark.config import JobConfig
from dedup_spark.errors import InputError
from dedup_spark.report import AccountingError
from dedup_spark.stage import RunContext, Stage

log = logging.getLogger(__name__)

ROWS_SCHEMA = T.StructType([
    T.StructField("row_id", T.LongType(), True),
    T.StructField("shard_id", T.IntegerType(), False),
    T.StructField("shard_row", T.LongType(), False),
    T.StructField("embedding", T.BinaryType(), True),
    T.StructField("reject_reason", T.StringType(), True),
])
_CHUNK_SCHEMA = "shard_id int, start long, stop long"


@dataclass(frozen=True)
class Shard:
    shard_id: int
    kind: str                      # npy | parquet
    embedding_uri: str
    metadata_uri: str | None       # parquet holding the other columns (laion metadata, or the parquet itself)
    relative: list[str]            # paths under the input root, mirrored under dedup/
    rows: int
    row_offset: int
    dim: int | None
    dtype: str
    data_offset: int = 0           # npy: bytes before the data
    row_groups: list[int] = field(default_factory=list)  # parquet: rows per row group
    # Columns of the first shard's metadata that this shard's lacks: read as nulls.
    missing_columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Manifest:
    input_uri: str
    format: str
    dim: int
    shards: list[Shard]
    files: list[tuple[str, int, int]] = field(default_factory=list)  # (uri, size, mtime_ns): the input's identity
    # Shards left out by input.on_bad_shard: skip, each {"file", "reason", "rows"} (rows None when unreadable).
    skipped: list[dict] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_dict(self) -> dict:
        return {"input_uri": self.input_uri, "format": self.format, "dim": self.dim, "rows": self.rows,
                "shards": [s.to_dict() for s in self.shards], "files": [list(f) for f in self.files],
                "skipped": self.skipped}

    @staticmethod
    def from_dict(payload: dict) -> Manifest:
        return Manifest(payload["input_uri"], payload["format"], payload["dim"],
                        [Shard(**s) for s in payload["shards"]], [tuple(f) for f in payload.get("files", [])],
                        payload.get("skipped", []))

    @property
    def skipped_rows(self) -> int:
        return sum(entry["rows"] or 0 for entry in self.skipped)


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _relative(uri: str, root: str) -> str:
    return uri[len(root.rstrip("/")) + 1:]


def _visible(relative: str) -> bool:
    return not any(part.startswith(("_", ".")) for part in relative.split("/"))


def detect_format(input_uri: str, files: list[str]) -> str:
    found = formats.detect([_relative(f, input_uri) for f in files])
    if found is None:
        raise InputError(f"no .npy or .parquet files under {input_uri}")
    return found


def build_manifest(config: JobConfig, first_row_id: int = 0) -> Manifest:
    """Shards, rows, offsets and dims from headers and footers only, every shard validated.

    A bad shard (unreadable or truncated file, missing or mismatched metadata,
    a dimension other than the input's) stops the job with its file and reason,
    or with ``input.on_bad_shard: skip`` is left out and listed in ``skipped``.
    """
    root = config.input.uri.rstrip("/")
    infos = [info for info in storage.file_infos(root) if _visible(_relative(info[0], root))]
    files = [info[0] for info in infos]
    if not files:
        raise InputError(f"input {root} does not exist or holds no files")
    fmt = config.input.format if config.input.format != "auto" else detect_format(root, files)
    if fmt != "parquet" and config.input.id_column:
        raise InputError("input.id_column needs parquet input (laion and npy rows are identified by position)")
    skipped: list[dict] = []

    def bad_shard(uri: str, reason: str, rows: int | None) -> None:
        if config.input.on_bad_shard == "fail":
            raise InputError(reason)
        log.warning("skipping bad shard %s: %s", uri, reason)
        skipped.append({"file": _relative(uri, root), "reason": reason, "rows": rows})

    if fmt not in formats.FORMATS:
        raise InputError(f"unknown input format {fmt}")
    candidates = formats.FORMATS[fmt].find_shards(root, files, config, bad_shard, _relative, _natural_key)
    dims = Counter()
    for candidate in candidates:
        if candidate["dim"] is not None:
            dims[candidate["dim"]] += candidate["rows"]
    dim = config.input.dim or (dims.most_common(1)[0][0] if dims else None)
    shards: list[Shard] = []
    offset = first_row_id  # without an id column a row's id is its position after this
    reference: list[str] | None = None
    for candidate in candidates:
        if candidate["dim"] is not None and candidate["dim"] != dim:
            bad_shard(candidate["embedding_uri"],
                      f"{candidate['embedding_uri']}: dimension {candidate['dim']}, but the input's is {dim} "
                      f"(mixed dimensions across shards; set input.dim, or input.on_bad_shard: skip)", candidate["rows"])
            continue
        columns = candidate.pop("columns")
        reference = columns if reference is None else reference
        missing = [name for name in reference if name not in (columns or [])] if columns is not None else []
        shards.append(Shard(len(shards), row_offset=offset, missing_columns=missing, **candidate))
        offset += candidate["rows"]
    if not shards:
        detail = f"; skipped: {[entry['reason'] for entry in skipped]}" if skipped else ""
        raise InputError(f"{root}: no usable {fmt} shards found{detail}")
    if dim is None:
        raise InputError(f"{root}: cannot tell the embedding dimension (no rows?); set input.dim")
    _check_required_columns(shards, reference or [], config)
    used = {uri for shard in shards for uri in (shard.embedding_uri, shard.metadata_uri) if uri}
    return Manifest(root, fmt, dim, shards, [info for info in infos if info[0] in used], skipped)


def _check_required_columns(shards: list[Shard], reference: list[str], config: JobConfig) -> None:
    """Columns the run cannot do without must be in every shard: the id column and those
    keep.expression reads. (Others a shard lacks, such as a caption or url column, are read as
    nulls.) Checked from the footers, before any task runs."""
    required = {config.input.id_column: "input.id_column"} if config.input.id_column else {}
    if shards and config.input.id_column and config.input.id_column not in reference:
        raise InputError(f"{shards[0].metadata_uri}: no column {config.input.id_column!r} (input.id_column)")
    if config.keep.expression:
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", config.keep.expression))
        required.update({name: "keep.expression" for name in reference if name in words})
    for shard in shards:
        lacking = [name for name in required if name in shard.missing_columns]
        if lacking:
            raise InputError(f"{shard.metadata_uri}: no column {lacking[0]!r}, which {required[lacking[0]]} needs "
                             f"(the first shard has it); every shard must have it")


def read_chunks(manifest: Manifest, chunk_rows: int) -> list[tuple[int, int, int]]:
    """(shard_id, start, stop) row ranges; parquet ranges follow row-group boundaries."""
    chunks = []
    for shard in manifest.shards:
        if shard.kind == "npy":
            ranges = [(s, min(s + chunk_rows, shard.rows)) for s in range(0, shard.rows, chunk_rows)]
        else:
            ranges = formats.parquet.chunks(shard, chunk_rows)
        chunks += [(shard.shard_id, start, stop) for start, stop in ranges]
    return chunks


def _ids(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids and a null mask from an integer or digit-string column."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column = pc.cast(column, pa.int64())
        except pa.ArrowInvalid as error:
            raise InputError(f"id column holds values that are not integers ({error})") from None
    elif not pa.types.is_integer(column.type):
        raise InputError(f"id column must be integers or digit strings, found {column.type}")
    null = column.is_null().to_numpy(zero_copy_only=False)
    return pc.fill_null(pc.cast(column, pa.int64()), 0).to_numpy(), null


def _rows_batch(shard: Shard, start: int, matrix: np.ndarray, reasons: np.ndarray,
                ids: np.ndarray | None, null_ids: np.ndarray | None) -> pa.RecordBatch:
    n = len(reasons)
    if ids is None:
        ids = np.arange(shard.row_offset + start, shard.row_offset + start + n, dtype=np.int64)
    normalized, norm_reasons = kernels.normalize_rows(matrix)
    reasons = np.where(reasons == None, norm_reasons, reasons)  # noqa: E711 (elementwise)
    if null_ids is not None:
        reasons = np.where(null_ids & (reasons == None), kernels.REJECT_NULL_ID, reasons)  # noqa: E711
    good = reasons == None  # noqa: E711
    embedding = tables.packed_binary(normalized, good.astype(bool))
    row_ids = pa.array(ids, mask=null_ids) if null_ids is not None else pa.array(ids)
    return pa.RecordBatch.from_arrays(
        [row_ids, pa.array(np.full(n, shard.shard_id, np.int32)), pa.array(np.arange(start, start + n, dtype=np.int64)),
         embedding, pa.array(reasons.tolist(), type=pa.string())],
        names=ROWS_SCHEMA.names,
    )


def read_chunk(manifest: Manifest, config: JobConfig, shard_id: int, start: int, stop: int) -> Iterator[pa.RecordBatch]:
    """Decode one chunk of one shard into rows batches (runs in a Spark task)."""
    shard = manifest.shards[shard_id]
    if shard.kind == "npy":
        for first, matrix in formats.npy.decode(shard, manifest.dim, start, stop):
            yield _rows_batch(shard, first, matrix, np.full(len(matrix), None, dtype=object), None, None)
        return
    id_column = config.input.id_column
    for first, matrix, reasons, ids in formats.parquet.decode(shard, manifest.dim, start, stop,
                                                              config.input.embedding_column,
                                                              config.input.binary_dtype, id_column):
        row_ids, null_ids = _ids(ids) if id_column else (None, None)
        yield _rows_batch(shard, first, matrix, reasons, row_ids, null_ids)


def read_rows(spark: SparkSession, manifest: Manifest, config: JobConfig) -> DataFrame:
    """The rows DataFrame (ROWS_SCHEMA), decoded by Spark tasks, one task per chunk."""
    tasks, decode = _decoding(spark, manifest, config)
    return tasks.mapInArrow(decode, ROWS_SCHEMA)


@dataclass(frozen=True)
class StoredSample:
    """Accepted rows the read stage drew while writing the rows table (VALID_SCHEMA, a small
    table at ``uri``): every row whose ``kernels.sample_hash`` for seed s is below f, for each
    (f, s) of ``draws``. Samples are nested in f, so any draw at a fraction <= f with seed s is
    read from it instead of scanning the rows table again."""

    uri: str
    draws: tuple[tuple[float, int], ...]

    def covers(self, fraction: float, seed: int) -> bool:
        return any(seed == drawn_seed and fraction <= drawn for drawn, drawn_seed in self.draws)

    def to_dict(self) -> dict:
        return {"uri": self.uri, "draws": [list(draw) for draw in self.draws]}

    @classmethod
    def from_dict(cls, payload: dict) -> StoredSample:
        return cls(payload["uri"], tuple((float(f), int(s)) for f, s in payload["draws"]))


def write_rows(spark: SparkSession, manifest: Manifest, config: JobConfig, uri: str,
               samples: list[StoredSample]) -> tables.TableInfo:
    """The rows table (ROWS_SCHEMA), decoded and written by the same Python task, one per chunk;
    the same tasks also write each of ``samples`` (its draws of the accepted rows, a table of its own)."""
    tasks, decode = _decoding(spark, manifest, config)

    def decode_and_draw(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[str, pa.RecordBatch]]:
        for batch in decode(batches):
            yield "rows", batch
            for accepted in _valid_batches([batch]):
                row_ids = accepted.column("row_id").to_numpy()
                for number, sample in enumerate(samples):
                    drawn = np.zeros(len(row_ids), dtype=bool)
                    for fraction, seed in sample.draws:
                        drawn |= kernels.sample_mask(row_ids, fraction, seed)
                    if drawn.any():
                        yield f"sample{number}", accepted.filter(pa.array(drawn))

    outputs = {"rows": (ROWS_SCHEMA, uri)} | {f"sample{number}": (VALID_SCHEMA, sample.uri)
                                              for number, sample in enumerate(samples)}
    return tables.write_produced_tables(tasks, decode_and_draw, outputs)["rows"]


def _decoding(spark: SparkSession, manifest: Manifest, config: JobConfig) -> tuple[DataFrame, tables.BatchTransform]:
    """One task per chunk, and the function decoding a task's chunks into rows batches."""
    chunks = read_chunks(manifest, config.input.chunk_rows)
    manifest_payload = manifest.to_dict()
    fault_fraction = faults.active().task_fraction

    def decode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        local_manifest = Manifest.from_dict(manifest_payload)
        for batch in batches:
            for shard_id, start, stop in zip(*(batch.column(i).to_pylist() for i in range(3))):
                faults.maybe_fail("read", fault_fraction, (shard_id, start))
                yield from read_chunk(local_manifest, config, shard_id, start, stop)

    return spark.createDataFrame(chunks, _CHUNK_SCHEMA).repartition(max(1, len(chunks))), decode


VALID_SCHEMA = T.StructType([
    T.StructField("row_id", T.LongType(), False),
    T.StructField("embedding", T.BinaryType(), False),
])
# read_captions' rows: a row_id is null where the input's id column is.
CAPTION_SCHEMA = T.StructType([T.StructField("row_id", T.LongType()), T.StructField("caption", T.StringType())])
# The rows table's columns the accepted rows are read from.
_VALID_SOURCE = ["row_id", "embedding", "reject_reason"]


def _valid_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        accepted = batch.filter(pc.is_null(batch.column("reject_reason")))
        if accepted.num_rows:
            yield pa.RecordBatch.from_arrays([accepted.column("row_id"), accepted.column("embedding")],
                                             names=VALID_SCHEMA.names)


def valid_rows(spark: SparkSession, rows_uri: str, transform: tables.BatchTransform | None = None,
               schema: T.StructType = VALID_SCHEMA) -> DataFrame:
    """The accepted rows of the stored rows table (VALID_SCHEMA), or ``transform`` of them (``schema``)
    applied in the Python task that reads them: the rows reach the JVM only as its output."""
    def accepted(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        return _valid_batches(batches) if transform is None else transform(_valid_batches(batches))

    return tables.map_table(spark, rows_uri, _VALID_SOURCE, accepted, schema)


def write_valid_tables(spark: SparkSession, rows_uri: str,
                       outputs: dict[str, tuple[tables.BatchTransform, T.StructType, str]]) -> dict[str, tables.TableInfo]:
    """Each output's ``(transform, schema, uri)``: the transform of the accepted rows, written as a table;
    one scan, in one Python task per part, for all of them (``tables.write_mapped_tables``)."""
    return tables.write_mapped_tables(spark, rows_uri, _VALID_SOURCE, outputs, _valid_batches)


def map_valid_rows_beside(spark: SparkSession, rows_uri: str, aligned_uri: str,
                          transform: Callable[[pa.RecordBatch, pa.RecordBatch], Iterator[pa.RecordBatch]],
                          schema: T.StructType) -> DataFrame:
    """``transform(accepted rows, their rows of aligned_uri)`` per batch, for a table written by
    ``write_valid_tables`` with one row per accepted row (``tables.map_aligned``: no join)."""
    return tables.map_aligned(spark, rows_uri, _VALID_SOURCE, aligned_uri, transform, schema, _valid_batches)


def sample_valid_rows(spark: SparkSession, rows_uri: str, fraction: float, seed: int, limit: int | None = None,
                      stored: StoredSample | None = None) -> pa.Table:
    """A seeded Bernoulli sample of the accepted rows (row_id, embedding), collected to the driver:
    the ``limit`` rows of smallest ``sample_hash``, a uniform subset, in that order.

    Read from ``stored`` when it holds this draw; otherwise decided per row in the tasks reading
    the rows table, so only the sampled rows leave Python. Either way the same rows.
    """
    if stored is not None and stored.covers(fraction, seed):
        table = tables.read_table_on_driver(stored.uri)
        table = table.filter(pa.array(kernels.sample_mask(table.column("row_id").to_numpy(), fraction, seed)))
    else:
        table = sampled_rows(spark, rows_uri, fraction, seed).toArrow()
    order = np.argsort(kernels.sample_hash(table.column("row_id").to_numpy(), seed), kind="stable")
    return table.take(pa.array(order[:limit]))


def sampled_rows(spark: SparkSession, rows_uri: str, fraction: float, seed: int,
                 stored: StoredSample | None = None) -> DataFrame:
    """The same draw as ``sample_valid_rows`` as a DataFrame (row_id, embedding), left in the
    tasks: for samples too large for the driver. Read from ``stored`` when it holds the draw."""
    def sampled(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            keep = kernels.sample_mask(batch.column("row_id").to_numpy(), fraction, seed)
            if keep.any():
                yield batch.filter(pa.array(keep))

    if stored is not None and stored.covers(fraction, seed):
        return tables.map_table(spark, stored.uri, VALID_SCHEMA.names, sampled, VALID_SCHEMA)
    return valid_rows(spark, rows_uri, sampled)


def metadata_schema(manifest: Manifest, config: JobConfig) -> pa.Schema | None:
    """Arrow schema of the non-embedding columns, or None when there are none (npy)."""
    uri = manifest.shards[0].metadata_uri
    if uri is None:
        return None
    with storage.open_input(uri) as handle:
        schema = pq.ParquetFile(handle).schema_arrow
    drop = {config.input.embedding_column} if manifest.format == "parquet" else set()
    return pa.schema([f for f in schema if f.name not in drop])


def read_metadata(spark: SparkSession, manifest: Manifest, config: JobConfig,
                  columns: list[str] | None = None, transform: tables.BatchTransform | None = None,
                  schema: T.StructType | None = None) -> DataFrame | None:
    """``row_id`` plus every non-embedding input column (or those of ``columns`` that exist),
    read in tasks, or ``transform`` of them (``schema``) applied in the task that reads them;
    None for npy input."""
    from pyspark.sql.pandas.types import from_arrow_schema

    input_schema = metadata_schema(manifest, config)
    if input_schema is None:
        return None
    if columns is not None:
        wanted = set(columns) | ({config.input.id_column} if config.input.id_column else set())
        input_schema = pa.schema([f for f in input_schema if f.name in wanted])
    keep_names = [f.name for f in input_schema]
    spark_schema = T.StructType([T.StructField("row_id", T.LongType(), True),
                                 *[f for f in from_arrow_schema(input_schema) if f.name != "row_id"]])
    output_names = spark_schema.names
    manifest_payload = manifest.to_dict()
    id_column = config.input.id_column

    def decode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        local = Manifest.from_dict(manifest_payload)
        for batch in batches:
            for shard_id in batch.column(0).to_pylist():
                shard = local.shards[shard_id]
                position = shard.row_offset
                for chunk in _metadata_batches(shard, keep_names, input_schema):
                    if id_column:
                        ids, null_ids = _ids(chunk.column(id_column))
                        row_ids = pa.array(ids, mask=null_ids)
                    else:
                        row_ids = pa.array(np.arange(position, position + chunk.num_rows, dtype=np.int64))
                    position += chunk.num_rows
                    arrays = [row_ids] + [chunk.column(n) for n in output_names[1:]]
                    yield pa.RecordBatch.from_arrays(arrays, names=output_names)

    shard_ids = [(s.shard_id,) for s in manifest.shards]
    tasks = spark.createDataFrame(shard_ids, "shard_id int").repartition(max(1, len(shard_ids)))
    if transform is None:
        return tasks.mapInArrow(decode, spark_schema)
    return tasks.mapInArrow(lambda batches: transform(decode(batches)), schema)


def _metadata_batches(shard: Shard, names: list[str], schema: pa.Schema,
                      batch_rows: int = 16384) -> Iterator[pa.RecordBatch]:
    """The shard's metadata ``names`` in batches; a column this shard lacks (``missing_columns``)
    comes as nulls of the type ``schema`` gives it."""
    present = [name for name in names if name not in shard.missing_columns]
    with storage.open_input(shard.metadata_uri) as handle:
        parquet = pq.ParquetFile(handle)
        if not present:  # nothing to read but the row count
            for start in range(0, parquet.metadata.num_rows, batch_rows):
                count = min(batch_rows, parquet.metadata.num_rows - start)
                yield pa.RecordBatch.from_arrays([pa.nulls(count, schema.field(n).type) for n in names], names=names)
            return
        for chunk in parquet.iter_batches(batch_size=batch_rows, columns=present):
            yield pa.RecordBatch.from_arrays(
                [chunk.column(n) if n in present else pa.nulls(chunk.num_rows, schema.field(n).type) for n in names],
                names=names)


def metadata_of(spark: SparkSession, manifest: Manifest, config: JobConfig, row_ids: list[int],
                columns: list[str]) -> dict[int, dict[str, str | None]]:
    """Input ``columns`` (those the input has) of a handful of rows, as strings: row_id -> {column: value}.

    Read in tasks from only the parquet row groups that hold the rows: a row's shard and position follow
    from its row_id, or with an id column from a scan of that column alone. A report's examples need a
    hundred rows; a scan of every row's text columns would read hundreds of GB at LAION scale.
    """
    input_schema = metadata_schema(manifest, config)
    names = [] if input_schema is None else [f.name for f in input_schema if f.name in columns and f.name != "row_id"]
    if not names or not row_ids:
        return {}
    wanted = np.unique(np.asarray(row_ids, dtype=np.int64))
    id_column = config.input.id_column
    requests = []
    for shard in manifest.shards:
        if shard.metadata_uri is None:
            continue
        if id_column:
            requests.append((shard.shard_id, []))  # positions found in the task, from the id column
            continue
        inside = wanted[(wanted >= shard.row_offset) & (wanted < shard.row_offset + shard.rows)]
        if inside.size:
            requests.append((shard.shard_id, (inside - shard.row_offset).tolist()))
    if not requests:
        return {}
    schema = T.StructType([T.StructField("row_id", T.LongType(), False),
                           *[T.StructField(name, T.StringType(), True) for name in names]])
    manifest_payload = manifest.to_dict()

    def read_rows(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        local = Manifest.from_dict(manifest_payload)
        for batch in batches:
            for shard_id, listed in zip(batch.column("shard_id").to_pylist(), batch.column("positions").to_pylist()):
                shard = local.shards[shard_id]
                with storage.open_input(shard.metadata_uri) as handle:
                    parquet = pq.ParquetFile(handle)
                    if id_column:
                        ids, null_ids = _ids(parquet.read(columns=[id_column]).column(id_column).combine_chunks())
                        positions = np.flatnonzero(np.isin(ids, wanted) & ~null_ids)
                        found = ids[positions]
                    else:
                        positions = np.asarray(listed, dtype=np.int64)
                        found = shard.row_offset + positions
                    if not positions.size:
                        continue
                    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
                    starts = np.concatenate([[0], np.cumsum(sizes)])
                    group_of = np.searchsorted(starts, positions, side="right") - 1
                    needed = np.unique(group_of)
                    read_starts = np.concatenate([[0], np.cumsum([sizes[g] for g in needed])])
                    at = read_starts[np.searchsorted(needed, group_of)] + positions - starts[group_of]
                    present = [name for name in names if name not in shard.missing_columns]
                    rows = parquet.read_row_groups(needed.tolist(), columns=present).take(pa.array(at))
                    yield pa.RecordBatch.from_arrays(
                        [pa.array(found, pa.int64())] + [_as_strings(rows.column(name)) if name in present
                                                         else pa.nulls(len(at), pa.string()) for name in names],
                        names=schema.names)

    tasks = spark.createDataFrame(requests, "shard_id int, positions array<long>").repartition(len(requests))
    shown = tasks.mapInArrow(read_rows, schema).collect()
    return {int(row["row_id"]): {name: row[name] for name in names} for row in shown}


def _as_strings(column: pa.ChunkedArray) -> pa.Array:
    """A metadata column as strings for display (Arrow's cast, or Python's str for types it cannot cast)."""
    column = column.combine_chunks()
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return pa.array([None if value is None else str(value) for value in column.to_pylist()], pa.string())


def read_captions(spark: SparkSession, manifest: Manifest, config: JobConfig, column: str,
                  transform: tables.BatchTransform | None = None, schema: T.StructType | None = None) -> DataFrame:
    """``row_id, caption`` (input ``column`` as a string) of every input row, read in tasks, or
    ``transform`` of them (``schema``) applied in the task that reads them."""
    def as_captions(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        captions = (pa.RecordBatch.from_arrays([batch.column("row_id"), batch.column(column).cast(pa.string())],
                                               names=CAPTION_SCHEMA.names) for batch in batches)
        return captions if transform is None else transform(captions)

    return read_metadata(spark, manifest, config, [column], as_captions, CAPTION_SCHEMA if schema is None else schema)


def with_keys(ctx: RunContext, frame: DataFrame) -> DataFrame:
    """``frame`` (with row_id) plus the input's key column (``RunContext.key_column``) under its own
    name, so a result can be joined back to any copy of the data; null where a row has none."""
    name = ctx.key_column
    if name is None or name in frame.columns:
        return frame
    if name == ctx.config.input.id_column:  # the id is the row_id
        return frame.withColumn(name, F.col("row_id"))
    keys = read_metadata(ctx.spark, ctx.manifest, ctx.config, [name])
    return frame.join(keys.select("row_id", name), "row_id", "left")


def _settings(ctx: RunContext) -> dict:
    return {"manifest": ctx.manifest.to_dict(), "input": ctx.config.to_dict()["input"]}


def _samples(ctx: RunContext) -> list[StoredSample]:
    """What the read tasks draw while they write the rows: the training sample and the recall
    probes, at fractions enough for any accepted count the job goes on with (at least
    1 - max_rejected_fraction of the rows), and two-level k-means's larger draw for its cells."""
    from dedup_spark import bucket, estimate

    config, rows = ctx.config, ctx.manifest.rows
    least_valid = max(1, math.floor((1.0 - config.input.max_rejected_fraction) * rows))
    draws = ((bucket.training_fraction(rows, config, least_valid), config.bucketing.seed),
             (estimate.probe_fraction(config.estimate.sample_rows, least_valid), config.bucketing.seed + 1))
    samples = [StoredSample(ctx.work.sample, draws)]
    cell_draw = bucket.cell_fraction(rows, config, least_valid)
    if cell_draw > 0:
        samples.append(StoredSample(ctx.work.cell_sample, ((cell_draw, config.bucketing.seed + 3),)))
    return samples


def _run(ctx: RunContext) -> dict:
    spark, manifest, config, work = ctx.spark, ctx.manifest, ctx.config, ctx.work
    samples = _samples(ctx)
    info = write_rows(spark, manifest, config, work.rows, samples)
    if info.rows != manifest.rows:
        raise AccountingError(f"read {info.rows} rows but the manifest lists {manifest.rows}")
    rejected_cols = tables.read_table(spark, work.rows, ["row_id", "shard_id", "shard_row", "reject_reason"])
    shard_names = spark.createDataFrame([(s.shard_id, s.relative[0]) for s in manifest.shards],
                                        "shard_id int, shard string")
    rejected = (rejected_cols.where(F.col("reject_reason").isNotNull()).join(F.broadcast(shard_names), "shard_id")
                .select("row_id", "shard_id", "shard", "shard_row", "reject_reason"))
    tables.write_table(with_keys(ctx, rejected), work.rejected)
    # Counted from the rejected table just written: it holds only the rejected rows.
    by_reason = tables.read_table(spark, work.rejected, ["reject_reason"]).groupBy("reject_reason").count()
    reasons = {r["reject_reason"]: r["count"] for r in by_reason.collect()}
    if config.input.id_column:
        ids = tables.read_table(spark, work.rows, ["row_id"]).where(F.col("row_id").isNotNull())
        clash = ids.groupBy("row_id").count().where(F.col("count") > 1).limit(5).collect()
        if clash:
            raise InputError(f"id column {config.input.id_column!r} is not unique, e.g. {[r['row_id'] for r in clash]}")
    rejected_rows = sum(reasons.values())
    # Ids of a later run against this one's output (--reference) continue after the largest.
    row_id_max = tables.read_table(spark, work.rows, ["row_id"]).agg(F.max("row_id")).first()[0]
    limit = config.input.max_rejected_fraction
    if rejected_rows > limit * manifest.rows:
        raise InputError(f"{rejected_rows} of {manifest.rows} input rows were rejected "
                         f"({rejected_rows / manifest.rows:.1%} > input.max_rejected_fraction {limit:g}): "
                         f"{reasons}; see {work.rejected}")
    return {"rows": info.rows, "valid_rows": info.rows - rejected_rows, "rejected_rows": rejected_rows,
            "row_id_max": None if row_id_max is None else int(row_id_max), "reasons": reasons,
            "sample": samples[0].to_dict(),
            "cell_sample": samples[1].to_dict() if len(samples) > 1 else None,
            "note": f"{len(manifest.shards)} shards, {manifest.format}, d={manifest.dim}, {rejected_rows} rejected"}


STAGE = Stage("read", _settings, _run)

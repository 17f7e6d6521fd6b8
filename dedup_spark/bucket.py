"""Bucket stage: train centroids on a driver sample, assign rows to their top-m
buckets in tasks, and plan search tasks so none holds more than a bounded
number of rows.

A bucket larger than ``max_task_rows`` is split into B blocks (by a hash of
row_id) and searched as B diagonal tasks (a block against itself) plus
B(B-1)/2 block-pair tasks, so the search stays exact inside the bucket. The
other buckets are packed: neighbours that share border rows go to one task of
up to ``search.pack_rows`` rows (``pack_buckets``), which receives a shared row
once instead of once per bucket.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import kernels, read, storage
from dedup_spark.blas import import_faiss
from dedup_spark.config import ConfigError, JobConfig
from dedup_spark.tables import BatchTransform, binary_matrix, packed_binary, stream_groups

log = logging.getLogger(__name__)

# The assign table: one row per accepted row, in the rows table's order (see tables.map_aligned),
# holding only its bucket slots, so the embeddings are not copied m times on their way to search.
ASSIGNED_SCHEMA = T.StructType([
    T.StructField("row_id", T.LongType(), False),
    # All the row's bucket slots over all rounds (sorted int32; a slot the margin dropped repeats
    # one the row joined): the buckets it joins, and the search's ownership rule.
    T.StructField("buckets", T.BinaryType(), False),
])
# What the search stage shuffles: a row once per search task it feeds (a task searches one bucket,
# a pack of buckets, or a pair of blocks of a split bucket; SearchPlan.task_buckets says which).
ROUTED_SCHEMA = T.StructType([
    T.StructField("task_id", T.IntegerType(), False),
    T.StructField("side", T.IntegerType(), False),
    T.StructField("row_id", T.LongType(), False),
    T.StructField("embedding", T.BinaryType(), False),
    T.StructField("buckets", T.BinaryType(), False),
])
# Fraction of max_task_rows one block aims at; hashing makes block sizes vary a little.
_BLOCK_FILL = 0.45
# A task's estimated cost: its pairs compared plus this many per row it receives. A row brought
# to a task through the shuffle, the sort and Arrow costs about as much as a thousand pairs in the
# kernel (the measured rates are in docs/performance.md, "What limits each stage").
_ROW_COST = 1000

# Links per bucket that packing considers: a bucket's border rows go mostly to a few neighbours.
_PACK_NEIGHBOURS = 16
# Up to this many buckets a row, every pair of them is counted for packing (pair_width).
_ALL_PAIRS_WIDTH = 4


def _task_cost(pairs: int, rows: int) -> int:
    """A search task's estimated cost, in the units of one pair compared."""
    return pairs + _ROW_COST * rows


def choose_k(rows: int, config: JobConfig) -> int:
    """Buckets: the configured k, or the cost model's optimum.

    Per row, a flat assignment costs K*d multiply-adds and the in-bucket search
    m^2 * N * d / (2K); their sum is smallest at K = m * sqrt(N / 2). A flat
    k-means on the driver adds T * K^2 * d in all (T = kmeans_iterations x
    points_per_centroid, 640 at the defaults), as much as the assignment at 1M
    rows; with it the sum is smallest where N + 2TK = m^2 N^2 / (2K^2), a smaller
    K (m=2: 950 against 1,414 at 1M rows, 226 against 447 at 100k). That K is taken
    while its sample (K x points_per_centroid rows) fits max_train_rows
    (``_flat_sample``, the rule ``training_method`` applies), so the k-means
    trains flat; beyond, training is two-level (~K^1.5, ``training_method``)
    and m * sqrt(N / 2) holds. LSH trains nothing. At least one bucket, at most
    N / 8 (buckets of a handful of rows waste the per-task overhead).
    """
    if config.bucketing.k is not None:
        return max(1, min(config.bucketing.k, rows))
    bucketing = config.bucketing
    k = round(bucketing.m * math.sqrt(rows / 2.0))
    if bucketing.method == "kmeans" and bucketing.training != "two_level":
        flat_k = round(_flat_optimum(rows, bucketing.m, bucketing.kmeans_iterations * bucketing.points_per_centroid))
        target, wanted = _flat_sample(rows, flat_k, config)
        if bucketing.training == "flat" or target >= wanted:
            k = flat_k
    return int(max(1, min(k, rows // 8)))


def _flat_optimum(rows: int, m: int, training: int) -> float:
    """The K > 0 where N*K + T*K^2 + m^2 N^2 / (2K) is smallest (T = ``training``, iterations x points
    per centroid): the root of N + 2TK - m^2 N^2 / (2K^2), which rises with K, found by bisection
    below m * sqrt(N / 2)."""
    low, high = 0.0, m * math.sqrt(rows / 2.0)
    for _ in range(100):
        middle = (low + high) / 2
        if rows + 2 * training * middle - (m * rows) ** 2 / (2 * middle * middle) < 0:
            low = middle
        else:
            high = middle
    return high


def task_memory_bytes(spark: SparkSession) -> int:
    """Memory one search task may use: half of an executor's memory over its cores.

    The other half is left to the JVM side (shuffle buffers, Arrow batches).
    """
    conf = spark.sparkContext.getConf()
    memory = conf.get("spark.executor.memory", None) or conf.get("spark.driver.memory", "1g")
    cores = int(conf.get("spark.executor.cores", "0") or 0) or spark.sparkContext.defaultParallelism
    return int(_parse_bytes(memory) / max(1, cores) / 2)


def max_task_rows(task_memory: int, dim: int, config: JobConfig) -> int:
    """Rows one search task may hold: the configured cap, or derived from task memory and d.

    Half of the task's memory holds its rows (the float16 vectors, their float32
    copy, Arrow buffers: about 8d + 128 bytes a row); the other half holds the
    similarity block, whose height the search sizes to fit.
    """
    if config.search.max_task_rows is not None:
        return config.search.max_task_rows
    return int(max(1000, min(1_000_000, (task_memory // 2) // (8 * dim + 128))))


def _parse_bytes(text: str) -> float:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().rstrip("b")
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


MODEL_FILE = "bucketing.json"


@dataclass(frozen=True)
class BucketModel:
    """How rows are bucketed: ``rounds`` independent bucketings of ``buckets_per_round``
    buckets each; a row joins ``m`` buckets per round. Global bucket id =
    round * buckets_per_round + bucket within the round (for k-means, the row of
    ``model/centroids.npy``)."""

    method: str  # kmeans | lsh
    buckets_per_round: int
    m: int
    rounds: int
    assign: str  # flat | hnsw (k-means) or lsh
    train_rows: int = 0
    # k-means: bucketing.margin, the fraction of the distance of a pair at the threshold from
    # a border within which a row also joins its 2nd..m-th nearest buckets; None: always.
    margin: float | None = None
    # k-means: flat or two_level (training_method); for two_level, train_rows counts the coarse
    # sample on the driver and cell_train_rows the rows the cells' tasks trained on.
    training: str = "flat"
    cell_train_rows: int = 0
    # Trained centroids dropped as near copies of another (bucketing.merge_centroids), over all rounds.
    merged_centroids: int = 0
    # Unique per training: Python workers cache the loaded model by (URI, model_id), so a new
    # model written to the same URI (a rerun into the same output) is never mistaken for the old.
    model_id: str = ""

    @property
    def width(self) -> int:
        """Bucket slots per row over all rounds (a row joins at most this many buckets)."""
        return self.rounds * self.m

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rounds_for(config: JobConfig) -> int:
    """bucketing.rounds, or its default: 1 k-means bucketing, 8 LSH tables."""
    if config.bucketing.rounds is not None:
        return config.bucketing.rounds
    return 8 if config.bucketing.method == "lsh" else 1


def train(spark: SparkSession, rows_uri: str, valid_rows: int, dim: int, config: JobConfig, model_uri: str,
          stored: read.StoredSample | None = None, stored_cells: read.StoredSample | None = None,
          threshold: float = 1.0) -> BucketModel:
    """Learn the bucketing on a bounded sample collected to the driver and store it under ``model_uri``.

    k-means: ``rounds`` spherical k-means runs (seeds seed, seed+1, ...) on one
    sample, flat or two-level (``training_method``). LSH: ``rounds`` tables of
    log2(K) random hyperplanes through the sample's mean. The samples are read
    from ``stored`` / ``stored_cells`` (drawn by the read stage) when they hold them. Trained
    centroids closer than bucketing.merge_centroids x the distance of a pair at ``threshold``
    are merged (``kernels.merge_close_centroids``).
    """
    faiss = import_faiss()

    rounds = rounds_for(config)
    k = choose_k(max(1, valid_rows), config)
    if config.bucketing.k is not None and config.bucketing.k > max(1, valid_rows // 8):
        log.warning("bucketing.k=%d is far above what %d valid rows support (%d buckets of 8 rows): most "
                    "buckets hold a row or two, so pairs across their borders are missed and recall drops%s; "
                    "leave bucketing.k unset for the cost model's choice", config.bucketing.k, valid_rows,
                    max(1, valid_rows // 8), f" (K clamped to {k})" if k < config.bucketing.k else "")
    sample = np.zeros((0, dim), dtype=np.float32)
    if config.bucketing.method == "lsh":
        bits = max(1, int(round(math.log2(max(2, k)))))
        if bits > 24 or rounds << bits >= 2**31:
            raise ConfigError(f"LSH with {bits} bits and {rounds} tables exceeds the bucket id range; set bucketing.k lower")
        if valid_rows:
            sample = _training_sample(spark, rows_uri, valid_rows, dim, config, stored)
        center = sample.mean(axis=0) if len(sample) else np.zeros(dim, dtype=np.float32)
        planes = np.stack([np.random.default_rng(config.bucketing.seed + r).standard_normal((bits, dim))
                           for r in range(rounds)]).astype(np.float32)
        storage.write_npy(storage.join(model_uri, "lsh_center.npy"), center.astype(np.float32))
        storage.write_npy(storage.join(model_uri, "lsh_planes.npy"), planes)
        model = BucketModel("lsh", 1 << bits, min(config.bucketing.m, bits + 1), rounds, "lsh", len(sample))
    else:
        training, cell_rows, merged = "flat", 0, 0
        if not _trains_centroids(valid_rows, k, config):
            centroids = [np.tile(np.eye(1, dim, dtype=np.float32), (k, 1)) for _ in range(rounds)]
        else:
            starved = starved_training(valid_rows, config)
            if starved:
                log.warning(starved)
            sample = _training_sample(spark, rows_uri, valid_rows, dim, config, stored)
            training = training_method(valid_rows, config)
            if training == "two_level":
                drawn = cell_fraction(valid_rows, config)
                cells = read.sampled_rows(spark, rows_uri, drawn, config.bucketing.seed + 3, stored_cells)
                trained = [_train_two_level(cells, drawn, sample, k, dim, config, config.bucketing.seed + r)
                           for r in range(rounds)]
                centroids = [c for c, _ in trained]
                cell_rows = max(rows for _, rows in trained)
            else:
                centroids = [kernels.train_centroids(sample, k, config.bucketing.kmeans_iterations,
                                                     config.bucketing.seed + r) for r in range(rounds)]
            if config.bucketing.merge_centroids is not None:
                # Centroids at distance f * eps, eps^2 = 2 (1 - threshold), have cosine 1 - f^2 (1 - threshold).
                min_cosine = 1.0 - config.bucketing.merge_centroids ** 2 * (1.0 - threshold)
                trained_count = sum(len(c) for c in centroids)
                centroids = [kernels.merge_close_centroids(c, min_cosine, quantizer_kind(len(c), config))
                             for c in centroids]
                merged = trained_count - sum(len(c) for c in centroids)
                log.info("merged %d near-copy centroids (cosine >= %.4f) of %d", merged, min_cosine, trained_count)
        # Rounds may come out a few centroids apart (merged near copies; a two-level cell with fewer
        # sampled rows than its share): the shorter ones are padded with zero rows, ids no quantizer
        # ever returns.
        k = max(len(c) for c in centroids)
        padded = [np.concatenate([c, np.zeros((k - len(c), dim), np.float32)]) for c in centroids]
        m = min(config.bucketing.m, min(len(c) for c in centroids))
        kind = quantizer_kind(k, config)
        for r, round_centroids in enumerate(centroids):
            index = kernels.build_quantizer(round_centroids, kind, m)
            storage.write_bytes(storage.join(model_uri, f"quantizer_{r}.faiss"), faiss.serialize_index(index).tobytes())
        storage.write_npy(storage.join(model_uri, "centroids.npy"), np.concatenate(padded))
        model = BucketModel("kmeans", k, m, rounds, kind, len(sample), config.bucketing.margin, training, cell_rows,
                            merged)
    model = dataclasses.replace(model, model_id=uuid.uuid4().hex)
    storage.write_json(storage.join(model_uri, MODEL_FILE), model.to_dict())
    return model


def training_target(valid_rows: int, config: JobConfig) -> int:
    """Rows the centroids are trained on: points_per_centroid per bucket, at most max_train_rows."""
    return _flat_sample(valid_rows, choose_k(max(1, valid_rows), config), config)[0]


def _flat_sample(valid_rows: int, k: int, config: JobConfig) -> tuple[int, int]:
    """(rows a flat k-means of k centroids trains on: points_per_centroid a centroid, at least 4, at
    most max_train_rows and every row; rows it wants: points_per_centroid a centroid, at most every row)."""
    per_centroid = config.bucketing.points_per_centroid
    target = int(min(valid_rows, config.bucketing.max_train_rows, max(k * per_centroid, 4 * k)))
    return target, min(valid_rows, k * per_centroid)


def _trains_centroids(valid_rows: int, k: int, config: JobConfig) -> bool:
    """Whether k-means trains at all: with one bucket, or m >= K, every row goes to every bucket anyway."""
    return config.bucketing.method == "kmeans" and valid_rows > 0 and k > 1 and config.bucketing.m < k


def training_method(valid_rows: int, config: JobConfig) -> str:
    """How the k-means centroids are trained: bucketing.training, or auto: two_level exactly when
    max_train_rows would starve a flat sample (``starved_training``), else flat.

    flat: one k-means of K centroids on the driver sample, iterations x sample x K x d
    multiply-adds, so K * points_per_centroid rows stop fitting the driver near K = 4,096.
    two_level: sqrt(K) coarse centroids on the driver sample, then each coarse cell's share
    of the K centroids trained in a Spark task on points_per_centroid of the cell's rows per
    centroid, drawn by the read stage (``cell_fraction``): K * points_per_centroid rows over
    the tasks, K^1.5 * d * points_per_centroid * iterations in all. On the 1M bench rows
    (K=1,414, m=2) it left 0.66% of the pairs sharing no bucket against flat's 0.11% at the
    same sample, and 0.73% for flat starved to 4 rows a centroid, with fewer comparisons than
    either; with near-copy centroids merged (bucketing.merge_centroids) 0.17% against flat's
    0.09% (docs/SCALING.md).
    """
    if config.bucketing.method != "kmeans":
        return "flat"
    if config.bucketing.training != "auto":
        return config.bucketing.training
    return "two_level" if _flat_shortfall(valid_rows, config) else "flat"


def _flat_shortfall(valid_rows: int, config: JobConfig) -> tuple[int, int, int] | None:
    """(K, flat sample rows, wanted rows) when max_train_rows cuts the flat k-means sample below
    points_per_centroid per centroid while k-means trains at all; None otherwise."""
    k = choose_k(max(1, valid_rows), config)
    target, wanted = _flat_sample(valid_rows, k, config)
    if not _trains_centroids(valid_rows, k, config) or target >= wanted:
        return None
    return k, target, wanted


def cell_fraction(valid_rows: int, config: JobConfig, drawn_from: int | None = None) -> float:
    """two_level: the Bernoulli fraction (seed + 3) of ``drawn_from`` rows (default ``valid_rows``)
    that draws 1.3 x points_per_centroid rows per centroid for the cells' tasks; 0 for flat."""
    if training_method(valid_rows, config) != "two_level":
        return 0.0
    wanted = _flat_sample(valid_rows, choose_k(max(1, valid_rows), config), config)[1]
    return _overdraw(wanted, valid_rows, drawn_from)


def _overdraw(rows: int, valid_rows: int, drawn_from: int | None) -> float:
    """The Bernoulli fraction of ``drawn_from`` rows (default ``valid_rows``) expected to draw 1.3 x
    ``rows``: enough that the draw rarely falls short, trimmed afterwards."""
    return min(1.0, 1.3 * rows / max(1, valid_rows if drawn_from is None else drawn_from))


CELL_CENTROIDS_SCHEMA = T.StructType([
    T.StructField("cell", T.IntegerType(), False),
    T.StructField("position", T.IntegerType(), False),
    T.StructField("rows", T.LongType(), False),
    T.StructField("centroid", T.BinaryType(), False),
])


def _train_two_level(cells_sample: DataFrame, drawn: float, sample: np.ndarray, k: int, dim: int,
                     config: JobConfig, seed: int) -> tuple[np.ndarray, int]:
    """K centroids (at most; see ``kernels.allocate_centroids``) by two-level k-means: coarse cells
    on the driver ``sample``, each cell's centroids in a Spark task on its rows of ``cells_sample``
    (the rows whose seed + 3 ``sample_hash`` is below ``drawn``). Only the coarse centroids go to
    the tasks and only the K centroids come back, with the rows the cells trained on."""
    iterations, per_centroid = config.bucketing.kmeans_iterations, config.bucketing.points_per_centroid
    coarse_k = max(2, round(math.sqrt(k)))
    coarse = kernels.train_centroids(sample, coarse_k, iterations, seed)
    coarse_k = len(coarse)
    counts = np.bincount(kernels.assign_buckets(sample, coarse, 1)[:, 0], minlength=coarse_k)
    per_cell = kernels.allocate_centroids(counts, k)
    # A cell's task keeps per_centroid rows a centroid, at most max_train_rows (a cell holding a
    # large share of the data trains starved rather than overflow its task).
    wanted = np.minimum(per_cell * per_centroid, config.bucketing.max_train_rows)
    keep = np.where(per_cell > 0, wanted / np.maximum(1, per_cell * per_centroid), 0.0)
    starved = int(np.count_nonzero(wanted < per_cell * per_centroid))
    if starved:
        log.warning("two-level k-means: %d of %d coarse cells hold more than max_train_rows / points_per_centroid "
                    "centroids and train on max_train_rows rows", starved, coarse_k)
    sample_seed = config.bucketing.seed + 3

    def label(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        quantizer = kernels.build_quantizer(coarse, "flat")
        for batch in batches:
            embeddings = kernels.as_float32(binary_matrix(batch.column("embedding"), dim))
            cell = kernels.assign_buckets(embeddings, quantizer, 1)[:, 0]
            # Nested in the draw: a row kept here is one of the cell's smallest sample hashes.
            kept = kernels.sample_hash(batch.column("row_id").to_numpy(), sample_seed) < drawn * keep[cell]
            if kept.any():
                yield pa.RecordBatch.from_arrays([pa.array(cell[kept].astype(np.int32)), batch.column("row_id").filter(kept),
                                                  batch.column("embedding").filter(kept)], names=["cell", "row_id", "embedding"])

    def train_cell(cell: object, rows: pa.Table) -> Iterator[pa.RecordBatch]:
        cell = int(cell)
        embeddings = kernels.as_float32(binary_matrix(rows.column("embedding"), dim))
        order = np.argsort(kernels.sample_hash(rows.column("row_id").to_numpy(), sample_seed), kind="stable")
        centroids = kernels.train_centroids(embeddings[order[: int(wanted[cell])]], int(per_cell[cell]), iterations,
                                            seed * 1_000_003 + cell + 1)
        yield pa.RecordBatch.from_arrays([pa.array(np.full(len(centroids), cell, np.int32)),
                                          pa.array(np.arange(len(centroids), dtype=np.int32)),
                                          pa.array(np.full(len(centroids), min(len(order), int(wanted[cell])), np.int64)),
                                          packed_binary(centroids)], names=CELL_CENTROIDS_SCHEMA.names)

    labelled = cells_sample.mapInArrow(label, "cell int, row_id long, embedding binary")
    trained = stream_groups(labelled, "cell", ["row_id"], int(np.count_nonzero(per_cell)), train_cell,
                            CELL_CENTROIDS_SCHEMA).toArrow()
    cells = trained.column("cell").to_numpy()
    order = np.lexsort((trained.column("position").to_numpy(), cells))
    centroids = binary_matrix(trained.column("centroid"), dim, "float32")[order]
    first = trained.column("position").to_numpy() == 0
    rows = int(trained.column("rows").to_numpy()[first].sum())
    log.info("two-level k-means: %d coarse cells on %d driver rows, %d centroids trained on %d rows in %d tasks",
             coarse_k, len(sample), len(centroids), rows, int(np.count_nonzero(first)))
    return np.ascontiguousarray(centroids, dtype=np.float32), rows


def starved_training(valid_rows: int, config: JobConfig) -> str | None:
    """Why the k-means sample is too small to train K centroids well, or None.

    Only when k-means trains (the report asks whether or not it did) and
    ``max_train_rows`` cuts the sample below ``points_per_centroid`` per
    centroid (not when the data itself has fewer rows). On the 1M bench rows
    (K=1,414, pairs of the first 100k rows against exhaustive search, two samples
    each), pairs not sharing a bucket and in-bucket comparisons were: 64 points
    per centroid 0.11% / 1.63e9, 16 points 1.0% / 2.21e9, 4 points 0.73% / 3.84e9.
    """
    shortfall = _flat_shortfall(valid_rows, config)
    if shortfall is None or training_method(valid_rows, config) != "flat":
        return None
    k, target, wanted = shortfall
    return (f"bucketing.max_train_rows caps the k-means sample at {target:,} rows, {target / k:.1f} per centroid for "
            f"K={k:,} instead of points_per_centroid={config.bucketing.points_per_centroid}: expect uneven buckets "
            f"(more comparisons) and more pairs that share no bucket. Raise bucketing.max_train_rows to {wanted:,} (the "
            f"driver holds the sample as float32, 4 x d bytes a row, and trains on it for iterations x rows x K x d "
            f"multiply-adds), set bucketing.training to auto or two_level, or set bucketing.k lower")


def training_fraction(valid_rows: int, config: JobConfig, drawn_from: int | None = None) -> float:
    """The Bernoulli fraction of ``drawn_from`` rows (default ``valid_rows``) that draws 1.3x the
    training target for ``valid_rows``; the draw is trimmed on the driver (a Spark limit() would cut
    the Python workers' pipes mid-stream)."""
    return _overdraw(training_target(valid_rows, config), valid_rows, drawn_from)


def _training_sample(spark: SparkSession, rows_uri: str, valid_rows: int, dim: int,
                     config: JobConfig, stored: read.StoredSample | None) -> np.ndarray:
    target = training_target(valid_rows, config)
    fraction = training_fraction(valid_rows, config)
    sample = read.sample_valid_rows(spark, rows_uri, fraction, config.bucketing.seed, target, stored)
    return kernels.as_float32(binary_matrix(sample.column("embedding"), dim))


def quantizer_kind(k: int, config: JobConfig) -> str:
    """flat or hnsw: bucketing.assign, or auto (HNSW from bucketing.hnsw_min_k buckets up)."""
    if config.bucketing.assign != "auto":
        return config.bucketing.assign
    return "hnsw" if k >= config.bucketing.hnsw_min_k else "flat"


_ASSIGNERS: dict[str, tuple[BucketModel, Callable[[np.ndarray], np.ndarray]]] = {}


def load_model(model_uri: str, model_id: str = "",
               threshold: float = 1.0) -> tuple[BucketModel, Callable[[np.ndarray], np.ndarray]]:
    """The stored bucketing and a function from unit rows to their global bucket ids
    (n x width, sorted), read once per Python worker, model_id and threshold (which
    scales the k-means margin: pairs at it are sqrt(2 (1 - threshold)) apart)."""
    key = f"{model_uri}#{model_id}#{threshold}"
    if model_id and key in _ASSIGNERS:
        return _ASSIGNERS[key]
    model = BucketModel(**storage.read_json(storage.join(model_uri, MODEL_FILE)))
    if model.method == "lsh":
        center = storage.read_npy(storage.join(model_uri, "lsh_center.npy"))
        planes = storage.read_npy(storage.join(model_uri, "lsh_planes.npy"))

        def per_round(embeddings: np.ndarray, r: int) -> np.ndarray:
            return kernels.lsh_buckets(embeddings, center, planes[r], model.m)
    else:
        faiss = import_faiss()

        quantizers = []
        margin = None if model.margin is None else model.margin * math.sqrt(2.0 * (1.0 - threshold))
        centroids = storage.read_npy(storage.join(model_uri, "centroids.npy")).reshape(
            model.rounds, model.buckets_per_round, -1) if model.margin is not None else [None] * model.rounds
        for r in range(model.rounds):
            raw = storage.read_bytes(storage.join(model_uri, f"quantizer_{r}.faiss"))
            index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
            if hasattr(index, "hnsw"):
                index.hnsw.efSearch = max(index.hnsw.efSearch, 64)
            quantizers.append(index)
        # Built once per worker: the margin test then reads two centroids' distance per row.
        separations = [None if c is None or model.m == 1 else kernels.centroid_separations(c) for c in centroids]

        def per_round(embeddings: np.ndarray, r: int) -> np.ndarray:
            return kernels.assign_buckets(embeddings, quantizers[r], model.m, centroids[r], margin, separations[r])

    def assign_rows(embeddings: np.ndarray) -> np.ndarray:
        ids = [per_round(embeddings, r) + r * model.buckets_per_round for r in range(model.rounds)]
        return np.sort(np.concatenate(ids, axis=1), axis=1)

    _ASSIGNERS[key] = (model, assign_rows)
    return _ASSIGNERS[key]


def assigner(model_uri: str, dim: int, model_id: str = "", threshold: float = 1.0) -> BatchTransform:
    """A batch transform from (row_id, embedding) rows to each row's bucket slots (ASSIGNED_SCHEMA),
    row for row in the same order."""

    def assign_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        _, assign_rows = load_model(model_uri, model_id, threshold)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            buckets = assign_rows(binary_matrix(batch.column("embedding"), dim)).astype(np.int32)
            yield pa.RecordBatch.from_arrays([batch.column("row_id"), packed_binary(buckets)],
                                             names=ASSIGNED_SCHEMA.names)

    return assign_batches


def _joined_slots(buckets: np.ndarray) -> np.ndarray:
    """Which of rows x width sorted slots are joined buckets: a repeated slot is adjacent to its
    first and is not joined twice."""
    joins = np.ones(buckets.shape, dtype=bool)
    joins[:, 1:] = buckets[:, 1:] != buckets[:, :-1]
    return joins


def joined_buckets(buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row index, bucket id) of every bucket each row joins, from rows x width sorted slots."""
    joins = _joined_slots(buckets)
    return np.nonzero(joins)[0], buckets[joins]


def rows_by_bucket(buckets: np.ndarray) -> Callable[[int], np.ndarray]:
    """bucket id -> the ascending indices of the rows that joined it, from rows x width sorted
    slots: one sort for all buckets, so a bucket's rows are one slice, found in time linear in the
    rows however many buckets are asked for."""
    rows, joined = joined_buckets(buckets)
    order = np.argsort(joined, kind="stable")
    rows, joined = rows[order], joined[order]

    def of(bucket_id: int) -> np.ndarray:
        return rows[np.searchsorted(joined, bucket_id):np.searchsorted(joined, bucket_id, side="right")]

    return of


class BucketCounts(NamedTuple):
    sizes: dict[int, int]  # rows per bucket
    shared: np.ndarray  # (bucket_a, bucket_b, rows joining both), bucket_a < bucket_b, int64


def pair_width(model: BucketModel) -> int:
    """How many consecutive slots of a row bucket_counts pairs up: all of them up to
    ``_ALL_PAIRS_WIDTH``, so packs may span rounds; beyond, a round's m (a row's slots are sorted
    and each round's ids lie above the previous round's). LSH with 16 tables would otherwise count
    496 pairs a row: at 100k rows that took the assign stage from 4.8 to 26 s."""
    return model.width if model.width <= _ALL_PAIRS_WIDTH else model.m


def bucket_counts(assigned: DataFrame, width: int, paired: int | None = None) -> BucketCounts:
    """Rows per bucket and rows per pair of buckets, counted from the assign table (small: at most
    K numbers and the bucket pairs rows share, a few dozen per bucket, reach the driver).
    ``paired``: pairs are counted within each run of this many slots (None: all ``width``)."""
    paired = paired or width

    def count(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            slots = binary_matrix(batch.column("buckets"), width, "int32")
            first = _joined_slots(slots)
            ids, counts = np.unique(slots[first], return_counts=True)
            # Sorted slots: two joined buckets of a row are two joined slots, the lower one first;
            # each pair as one int64 key (bucket ids are non-negative int32), so np.unique stays 1-D.
            keys = []
            for i in range(width):
                for j in range(i + 1, (i // paired + 1) * paired):
                    both = first[:, i] & first[:, j]
                    keys.append((slots[both, i].astype(np.int64) << 32) | slots[both, j])
            pairs, pair_counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64), return_counts=True)
            yield pa.RecordBatch.from_arrays(
                [pa.array(np.concatenate([ids, pairs >> 32]).astype(np.int32)),
                 pa.array(np.concatenate([ids, pairs & 0xFFFFFFFF]).astype(np.int32)),
                 pa.array(np.concatenate([counts, pair_counts]).astype(np.int64))],
                names=["bucket_a", "bucket_b", "rows"])

    counted = assigned.select("buckets").mapInArrow(count, "bucket_a int, bucket_b int, rows long")
    totals = counted.groupBy("bucket_a", "bucket_b").agg(F.sum("rows").alias("rows")).toArrow()
    a, b = totals.column("bucket_a").to_numpy(), totals.column("bucket_b").to_numpy()
    rows = totals.column("rows").to_numpy()
    single = a == b
    return BucketCounts({int(k): int(n) for k, n in zip(a[single], rows[single])},
                        np.stack([a[~single], b[~single], rows[~single]], axis=1).astype(np.int64).reshape(-1, 3))


@dataclass(frozen=True)
class SearchPlan:
    """Which search task(s) each (bucket, block) feeds, and on which side."""

    blocks: list[tuple[int, int]]            # (bucket_id, number of blocks)
    routes: list[tuple[int, int, int, int]]  # (bucket_id, block, task_id, side)
    tasks: int
    largest_task_rows: int
    split_buckets: int
    comparisons: int  # row pairs sharing a bucket: what computing all of them costs (d multiply-adds each)
    task_buckets: dict[int, list[int]]  # the buckets each task searches (several: a pack)


def plan_search(bucket_sizes: dict[int, int], cap: int, shared: np.ndarray | None = None,
                pack_rows: int = 0, min_tasks: int = 1, shared_exact: bool = True) -> SearchPlan:
    """Split buckets over ``cap`` into blocks; one task per bucket or per block pair. Buckets that
    share rows (``shared``: bucket_counts' pairs; ``shared_exact``: no row joins more than two
    buckets) are packed into one task of up to ``pack_rows`` rows, so a row joining two of them
    is shuffled once (``pack_buckets``); no pack takes more than 1 / ``min_tasks`` of the
    buckets' estimated cost, so packing leaves tasks enough to spread over the cores.

    Tasks are numbered by falling estimated cost (``_task_cost``), so
    task_id modulo the partitions deals the costliest out first and evenly."""
    blocks, tasks = [], []  # tasks: (cost, rows, [(bucket, block, side)])
    comparisons = 0
    split = 0
    block_rows = max(1, int(cap * _BLOCK_FILL))
    whole = {b: n for b, n in bucket_sizes.items() if n <= cap}
    total_cost = sum(_task_cost(n * (n - 1) // 2, n) for n in bucket_sizes.values())
    packs = pack_buckets(whole, shared if shared is not None else np.zeros((0, 3), np.int64), min(pack_rows, cap),
                         total_cost / max(1, min_tasks), shared_exact)
    for members, rows in packs:
        pairs = sum(bucket_sizes[b] * (bucket_sizes[b] - 1) // 2 for b in members)
        comparisons += pairs
        tasks.append((_task_cost(pairs, rows), rows, [(b, 0, 0) for b in members]))
    for bucket_id, size in sorted(bucket_sizes.items()):
        count = 1 if size <= cap else math.ceil(size / block_rows)
        blocks.append((bucket_id, count))
        if count == 1:
            continue
        split += 1
        comparisons += size * (size - 1) // 2  # blocks by hash: every pair of the bucket, once
        block = math.ceil(size / count)
        for i in range(count):
            for j in range(i, count):
                pairs = block * (block - 1) // 2 if i == j else block * block
                sides = [(bucket_id, i, 0)] + ([(bucket_id, j, 1)] if j != i else [])
                tasks.append((_task_cost(pairs, block * len(sides)), block * len(sides), sides))
    tasks.sort(key=lambda task: -task[0])
    routes = [(b, block, task_id, side) for task_id, (_, _, sides) in enumerate(tasks) for b, block, side in sides]
    task_buckets = {task_id: sorted({b for b, _, _ in sides}) for task_id, (_, _, sides) in enumerate(tasks)}
    return SearchPlan(blocks, routes, len(tasks), max((rows for _, rows, _ in tasks), default=0), split, comparisons,
                      task_buckets)


def pack_buckets(sizes: dict[int, int], shared: np.ndarray, limit: int, max_cost: float = math.inf,
                 exact: bool = True) -> list[tuple[list[int], int]]:
    """Buckets grouped into packs of at most ``limit`` distinct rows and ``max_cost`` estimated cost
    (a bucket alone may exceed both), as (bucket ids, rows). ``shared``: (bucket_a, bucket_b, rows
    in both); ``exact``: no row joins more than two buckets.

    A row near a border joins two buckets and would be shuffled to each; in one pack it travels
    once. Agglomeration in rounds, in numpy: every pack picks the partner it shares the most rows
    with against their combined size, among those it still fits with; packs that pick each other
    merge (the round's best link always does), and their links are summed. A link that does not fit
    is dropped, since packs only grow. Only each bucket's ``_PACK_NEIGHBOURS`` strongest links are
    considered. A pack's rows are exact when ``exact`` (the rows two packs share are then the sum of
    their buckets' links); otherwise (bucketing.rounds > 1, m > 2) a row in three buckets would be
    subtracted twice, so only the largest single link is subtracted: an upper bound.

    Driver time: 0.7 s for K = 65,536 buckets (825k links) and 6.5 s for K = 262,144 (3.3M), where
    a greedy heap over the same links took 8 s and 60 s for as many rows saved."""
    ids = np.array(sorted(sizes), dtype=np.int64)
    count = ids.size
    rows = np.array([sizes[b] for b in ids.tolist()], dtype=np.int64)
    pairs = rows * (rows - 1) // 2
    parent = np.arange(count)  # the pack a bucket (index into ids) joined; its own index at first
    if limit > 0 and len(shared) and count > 1:
        at_a = np.minimum(np.searchsorted(ids, shared[:, 0]), count - 1)
        at_b = np.minimum(np.searchsorted(ids, shared[:, 1]), count - 1)
        known = (ids[at_a] == shared[:, 0]) & (ids[at_b] == shared[:, 1]) & (at_a != at_b)
        a, b, weight = at_a[known], at_b[known], shared[known, 2].astype(np.int64)
        ends, others, weights = np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([weight, weight])
        order = np.lexsort((-weights, ends))
        rank = np.arange(order.size) - np.searchsorted(ends[order], ends[order])
        strong = order[rank < _PACK_NEIGHBOURS]  # a link stays if either end counts it strong
        low, high = np.minimum(ends[strong], others[strong]), np.maximum(ends[strong], others[strong])
        key, weight = _reduce_by_key(low * count + high, (weights[strong], np.maximum))
        a, b, largest = key // count, key % count, weight.copy()
        while a.size:
            union = rows[a] + rows[b] - (weight if exact else largest)
            fits = (union <= limit) & (_task_cost(pairs[a] + pairs[b], union) <= max_cost)
            a, b, weight, largest, union = a[fits], b[fits], weight[fits], largest[fits], union[fits]
            if not a.size:
                break
            score = weight / (rows[a] + rows[b])
            # Equal scores are ordered by a hash of the link, so that they still give many mutual picks.
            tie = ((a * 2654435761 + b * 40503) & 0xFFFFFFF) ^ 0x5BD1E99
            link = np.arange(a.size)
            ends, links = np.concatenate([a, b]), np.concatenate([link, link])
            order = np.lexsort((np.concatenate([tie, tie]), -np.concatenate([score, score]), ends))
            firsts = order[np.concatenate([[True], ends[order][1:] != ends[order][:-1]])]
            pick = np.full(count, -1)
            pick[ends[firsts]] = links[firsts]
            mutual = link[(pick[a] == link) & (pick[b] == link)]
            kept, joined = a[mutual], b[mutual]  # a < b: b's pack joins a's
            rows[kept], pairs[kept] = union[mutual], pairs[kept] + pairs[joined]
            parent[joined] = kept
            moved = np.arange(count)
            moved[joined] = kept
            a, b = moved[a], moved[b]
            between = a != b
            low, high = np.minimum(a[between], b[between]), np.maximum(a[between], b[between])
            key, weight, largest = _reduce_by_key(low * count + high, (weight[between], np.add),
                                                  (largest[between], np.maximum))
            a, b = key // count, key % count
    while not np.array_equal(parent[parent], parent):  # each bucket to its pack's first bucket
        parent = parent[parent]
    order = np.argsort(parent, kind="stable")
    roots, starts = np.unique(parent[order], return_index=True)
    return [(members.tolist(), int(rows[root]))
            for root, members in zip(roots.tolist(), np.split(ids[order], starts[1:]))]


def _reduce_by_key(keys: np.ndarray, *columns: tuple[np.ndarray, np.ufunc]) -> list[np.ndarray]:
    """The distinct keys (sorted), and each column reduced over its key's rows by its ufunc."""
    if not keys.size:
        return [keys, *(values for values, _ in columns)]
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return [keys[starts], *(ufunc.reduceat(values[order], starts) for values, ufunc in columns)]


def router(plan: SearchPlan, width: int, seed: int) -> Callable[[pa.RecordBatch, pa.RecordBatch],
                                                                       Iterator[pa.RecordBatch]]:
    """A function from a batch of accepted rows (row_id, embedding) and their assign rows to the rows
    of every search task they feed (ROUTED_SCHEMA): a row goes once to the task of each bucket it
    joins, or, in a split bucket, to every task of its block (chosen by a hash of row_id); a row
    joining several buckets of one pack goes to that task once."""
    routes = route_ids(plan, width, seed)

    def route_batch(rows: pa.RecordBatch, assigned: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        row, task, side = routes(rows.column("row_id").to_numpy(), assigned.column("buckets"))
        take = pa.array(row)
        yield pa.RecordBatch.from_arrays(
            [pa.array(task), pa.array(side), rows.column("row_id").take(take), rows.column("embedding").take(take),
             assigned.column("buckets").take(take)], names=ROUTED_SCHEMA.names)

    return route_batch


def route_ids(plan: SearchPlan, width: int, seed: int) -> Callable[[np.ndarray, pa.Array],
                                                                  tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``router``'s routing alone: from row ids and their bucket slots (ASSIGNED_SCHEMA's binary
    column) to (row index, task_id, side) of every copy a row sends to a search task."""
    bucket_ids = np.array([b for b, _ in plan.blocks], dtype=np.int64)
    block_counts = np.array([c for _, c in plan.blocks], dtype=np.int64)
    # Flat block index of (bucket, block) = first_block[bucket] + block; each flat block's routes
    # are route_task/route_side[route_start[flat]:route_start[flat + 1]].
    first_block = np.full(int(bucket_ids.max(initial=-1)) + 1, -1, dtype=np.int64)
    first_block[bucket_ids] = np.concatenate([[0], np.cumsum(block_counts)[:-1]])
    routes = np.array(plan.routes, dtype=np.int64).reshape(-1, 4)
    flat = first_block[routes[:, 0]] + routes[:, 1]
    order = np.argsort(flat, kind="stable")
    route_start = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=int(block_counts.sum())))])
    route_task, route_side = routes[order, 2].astype(np.int32), routes[order, 3].astype(np.int32)
    blocks_of = np.zeros_like(first_block)
    blocks_of[bucket_ids] = block_counts

    def route(row_ids: np.ndarray, buckets: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        slots = binary_matrix(buckets, width, "int32")
        row_index, bucket = joined_buckets(slots)
        # Its own hash stream (seed: training sample, seed + 1: recall probes), so blocks are not
        # correlated with which rows were sampled.
        block = (kernels.sample_hash(row_ids[row_index], seed + 2) * blocks_of[bucket]).astype(np.int64)
        flat_block = first_block[bucket] + block
        copies = route_start[flat_block + 1] - route_start[flat_block]
        source = np.repeat(np.arange(len(flat_block)), copies)
        # Position of each copy among its block's routes.
        within = np.arange(len(source)) - np.repeat(np.cumsum(copies) - copies, copies)
        chosen = route_start[flat_block[source]] + within
        source_row = row_index[source]
        # One copy per (row, task, side): a pack's buckets share the task.
        once = np.unique((source_row * plan.tasks + route_task[chosen]) * 2 + route_side[chosen], return_index=True)[1]
        return source_row[once], route_task[chosen[once]], route_side[chosen[once]]

    return route


def index_tasks(plan: SearchPlan) -> set[int]:
    """The search tasks that hold each of their rows once and on side 0: every pack and every split
    bucket's diagonal task, not the pairs of two blocks. Together they hold each row once per task
    of a bucket it joined: the corpus index's files (``index.py``)."""
    paired = {task for _, _, task, side in plan.routes if side == 1}
    return set(range(plan.tasks)) - paired

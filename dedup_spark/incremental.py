"""Incremental runs: new rows deduplicated against a published corpus, without reprocessing it.

``--reference OUTPUT`` (``input.reference``) names a published output (full or incremental). The
run reads only its new input, and:

- reuses the reference's model (``model/``: no training) and assigns only the new rows with it;
- searches the new rows among themselves (the usual search stage) and against the corpus's kept
  rows in the buckets they share (``reference`` stage, below), reading the corpus index
  (``index/``, see ``index.py``) once, one index file per task (or several tasks, each reading
  the file, when its new rows would exceed half of ``max_task_rows``);
- never changes the reference: corpus rows keep their published groups. A new row connected
  (through new rows or directly) to kept corpus rows is removed and joins the published group of
  smallest ``group_id`` among them; new rows that duplicate only each other form new groups under
  the keep policy. Corpus rows are not compared with each other;
- continues row ids after the corpus's largest (or, with ``input.id_column``, refuses ids the
  corpus already has), and publishes an index that lists the reference's segments and its own.

Stages: read, ids, train (the reference's model), assign, search, reference, group, estimate,
write, index. The report adds ``reference`` (the chain, how the new rows spread over the buckets,
and a drift warning) and the recall self-estimate samples new rows against corpus and new rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import bucket, estimate, group, kernels, read, report, search, session, storage, tables
from dedup_spark.config import ConfigError, JobConfig
from dedup_spark.errors import InputError
from dedup_spark.index import FORMAT, MANIFEST, chain_group_sizes, read_file
from dedup_spark.publish import SUCCESS
from dedup_spark.stage import RunContext, Stage
from dedup_spark.tables import binary_matrix

log = logging.getLogger("dedup_spark")

# Levels of the reference stage's rows beside search.py's (below all of them): a probe's pair with a
# corpus row.
PROBE = search.ATTACHED - 1
LINKS_SCHEMA = T.StructType([
    T.StructField("row_id_a", T.LongType(), False),  # a new row (a probe for PROBE rows; a counter's index)
    T.StructField("row_id_b", T.LongType(), False),  # a corpus row (a counter's value)
    T.StructField("group_id", T.LongType(), True),  # the corpus row's published group
    T.StructField("group_size", T.LongType(), True),
    T.StructField("similarity", T.FloatType(), False),
    T.StructField("level", T.IntegerType(), False),
    T.StructField("embedding", T.BinaryType(), True),  # the corpus row's, on level-0 links
])
# A new row routed to a reference task: the search's routed row, by task, without a side.
_ROUTED = T.StructType([T.StructField("task", T.IntegerType(), False),
                        *(bucket.ROUTED_SCHEMA[name] for name in ("row_id", "buckets", "embedding"))])
# The drift warning: new rows spread over the buckets unlike the corpus (total variation distance),
# or the largest bucket grew this much.
DRIFT_DISTANCE = 0.3
DRIFT_GROWTH = 2.0


@dataclass(frozen=True)
class Reference:
    """A published output an incremental run builds on: its index manifest and model, and the
    chain's segments with absolute locations and their file lists."""

    uri: str
    manifest: dict[str, Any]
    segments: list[dict[str, Any]]

    @classmethod
    def open(cls, uri: str) -> Reference:
        # Absolute, so the manifest this run publishes names the chain's segments from anywhere
        # (a later run, another working directory, an executor).
        uri = storage.absolute(uri).rstrip("/")
        if not storage.exists(storage.join(uri, SUCCESS)):
            raise InputError(f"reference {uri} is not a published output of this job (no _SUCCESS)")
        manifest_uri = storage.join(uri, "index", MANIFEST)
        if not storage.exists(manifest_uri):
            raise InputError(f"reference {uri} has no index/ (index/{MANIFEST}); run it again to publish one")
        manifest = storage.read_json(manifest_uri)
        if manifest.get("format") != FORMAT:
            raise InputError(f"reference {uri} has an index of format {manifest.get('format')}, this job reads "
                             f"format {FORMAT}: run the reference again (or run without --reference)")
        return cls(uri, manifest, _chain(uri, manifest))

    @property
    def digest(self) -> str:
        """The manifest's content: stage keys follow it, so a reference republished at the same
        location is never mistaken for the one an interrupted run started from."""
        return manifest_digest(self.manifest)[:16]

    @property
    def outputs(self) -> list[str]:
        """Every published output of the chain (the outputs holding its segments): none may be
        this run's output, whose publish would replace a segment later runs read."""
        roots = [s["uri"].rsplit("/index/", 1)[0] for s in self.segments]
        return list(dict.fromkeys([*roots, self.uri]))

    @property
    def manifest_uri(self) -> str:
        return storage.join(self.uri, "index", MANIFEST)

    @property
    def model_uri(self) -> str:
        return storage.join(self.uri, "model")

    @property
    def row_id_max(self) -> int:
        value = self.manifest.get("row_id_max")
        return -1 if value is None else int(value)

    def files(self) -> list[tuple[str, dict]]:
        """Every index file of the chain: (its segment's location, its manifest entry)."""
        return [(segment["uri"], entry) for segment in self.segments for entry in segment["files"]]

    def links(self) -> list[dict[str, Any]]:
        """The chain's segments as the next run's manifest lists them: without their file lists,
        which stay in the manifest of the output holding each segment."""
        return [{key: value for key, value in segment.items() if key != "files"} for segment in self.segments]


def manifest_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _chain(uri: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The segments of the manifest at ``uri``, absolute, each with its files. A manifest lists its
    own segment's files and only the location and manifest digest of the earlier ones, so a chain of
    n runs keeps n file lists, not n²/2: each earlier list is read from its own output's manifest,
    which must be the one the chain was built on."""
    *earlier, own = manifest["segments"]
    chain = []
    for entry in earlier:
        index_uri = entry["uri"].rsplit("/", 1)[0]
        published = storage.read_json(storage.join(index_uri, MANIFEST))
        if manifest_digest(published) != entry["manifest_sha256"]:
            raise InputError(f"{index_uri} was published again after the chain of {uri} was built on it: its "
                             "segment is no longer the one the chain deduplicated against; run the chain again "
                             "from that output")
        chain.append({**entry, "files": published["segments"][-1]["files"]})
    # A run names its own segment relative to its index (index.SEGMENT).
    location = storage.join(uri, "index", own["uri"])
    return [*chain, {**own, "uri": location, "manifest_sha256": manifest_digest(manifest)}]


def check_settings(reference: Reference, config: JobConfig) -> None:
    """Settings an incremental run cannot change: the threshold scales the bucketing's margin the
    corpus was assigned with, and the caption policies need captions of corpus rows."""
    published = float(reference.manifest["threshold"])
    if config.search.threshold != published:
        raise ConfigError(f"the reference {reference.uri} was deduplicated at threshold {published:g}; an "
                          f"incremental run uses the same (--threshold {published:g}, or run without --reference)")
    if config.captions.policy != "ignore":
        raise ConfigError("captions.policy merge and keep_distinct need the corpus rows' captions: not available "
                          "with --reference")
    if (config.input.id_column or None) != (reference.manifest.get("id_column") or None):
        raise ConfigError(f"the reference identifies rows by {reference.manifest.get('id_column') or 'position'}, "
                          f"this run by {config.input.id_column or 'position'}: use the same input.id_column")


# The model stage: the reference's, copied (it is small), never retrained --------------------------

def _model_settings(ctx: RunContext) -> dict:
    return {"reference": ctx.reference.digest, "model_id": ctx.reference.manifest["model_id"]}


def _model_run(ctx: RunContext) -> dict:
    import yaml

    source = ctx.reference.model_uri
    for uri in storage.list_files(source):
        relative = uri[len(source) + 1:]
        if relative not in ("config.yaml", "manifest.json"):
            storage.copy(uri, storage.join(ctx.work.model, relative))
    storage.write_bytes(storage.join(ctx.work.model, "config.yaml"),
                        yaml.safe_dump(ctx.config.to_dict(), sort_keys=False).encode())
    storage.write_json(storage.join(ctx.work.model, "manifest.json"), ctx.manifest.to_dict())
    model = bucket.BucketModel(**storage.read_json(storage.join(source, bucket.MODEL_FILE)))
    return {"rows": 0, "model": model.to_dict(), "note": f"the reference's {model.method} model, not retrained"}


MODEL_STAGE = Stage("train", _model_settings, _model_run)


# The ids stage: new ids must not collide with the corpus's ------------------------------------

def _ids_settings(ctx: RunContext) -> dict:
    return {"reference": ctx.reference.digest}


def _ids_run(ctx: RunContext) -> dict:
    if not ctx.config.input.id_column:
        return {"rows": 0, "note": f"row ids continue after the corpus's {ctx.reference.row_id_max}"}
    spark = ctx.spark
    new = tables.read_table(spark, ctx.work.rows, ["row_id"]).where(F.col("row_id").isNotNull())
    corpus = _corpus_ids(ctx)
    clash = new.join(corpus, "row_id").select("row_id").distinct().limit(5).collect()
    if clash:
        raise InputError(f"input.id_column {ctx.config.input.id_column!r}: ids the corpus of {ctx.reference.uri} "
                         f"already has, e.g. {sorted(r['row_id'] for r in clash)}; ids must be unique across runs")
    return {"rows": 0, "note": "no id shared with the corpus"}


def _corpus_ids(ctx: RunContext) -> DataFrame:
    """Every id the corpus has used: the index files hold each run's valid rows, and each run's
    rejected/ the rest."""
    spark = ctx.spark
    files = [storage.join(segment, search.index_file(entry["task"])) for segment, entry in ctx.reference.files()]
    ids = [_parquet_ids(spark, files)] if files else []
    for segment in ctx.reference.segments:
        output = segment["uri"].rsplit("/index/", 1)[0]
        ids.append(tables.read_table(spark, storage.join(output, "rejected"), ["row_id"]))
    frame = ids[0]
    for more in ids[1:]:
        frame = frame.unionByName(more)
    return frame.where(F.col("row_id").isNotNull()).distinct()


def _parquet_ids(spark, files: list[str]) -> DataFrame:
    def read_ids(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for uri in batch.column("uri").to_pylist():
                with storage.open_input(uri) as handle:
                    yield from pq.ParquetFile(handle).iter_batches(columns=["row_id"])

    tasks = spark.createDataFrame([(uri,) for uri in files], "uri string").repartition(max(1, len(files)))
    return tasks.mapInArrow(read_ids, "row_id long")


IDS_STAGE = Stage("ids", _ids_settings, _ids_run)


# The reference stage: new rows against the corpus rows of their buckets --------------------------

def _reference_settings(ctx: RunContext) -> dict:
    from dedup_spark.assign import probing

    return {"reference": ctx.reference.digest, "thresholds": ctx.thresholds,
            "query_block_rows": ctx.config.search.query_block_rows,
            "probes": ctx.config.estimate.sample_rows if probing(ctx) else 0}


def _reference_run(ctx: RunContext) -> dict:
    from dedup_spark.assign import probing

    spark, work, model, reference = ctx.spark, ctx.work, ctx.model, ctx.reference
    files = reference.files()
    first_task = _task_layout(files, ctx)
    routed = read.map_valid_rows_beside(spark, work.rows, work.assigned, _to_tasks(model.width, files, first_task),
                                        _ROUTED)
    # One empty row per index file, so every file is read once: the probes meet every corpus row.
    sentinels = spark.createDataFrame([(int(first_task[f]), -1, b"", b"") for f in range(len(files))], _ROUTED)
    tasks = int(first_task[-1])
    probe_ids, probe_matrix = np.zeros(0, np.int64), np.zeros((0, ctx.dim), np.float16)
    if probing(ctx):
        probe_ids, probe_matrix = estimate.probes(spark, work.rows, ctx.config.estimate.sample_rows, ctx.valid_rows,
                                                  ctx.dim, ctx.config.bucketing.seed,
                                                  read.StoredSample.from_dict(ctx.results["read"]["sample"]))
    links = tables.stream_groups(
        routed.unionByName(sentinels), "task", ["row_id"], min(max(1, tasks), 4 * spark.sparkContext.defaultParallelism),
        _against_corpus(files, first_task, ctx.dim, model.width, ctx.thresholds, ctx.config.search.query_block_rows,
                        bucket.task_memory_bytes(spark) // 4, probe_ids, probe_matrix),
        LINKS_SCHEMA, by_id=True)
    info = tables.write_table(links, work.reference_links)
    written = tables.read_table(spark, work.reference_links)
    stats = search.search_stats(written.where(F.col("level") != PROBE).select("row_id_a", "row_id_b", "similarity",
                                                                               "level"), len(ctx.thresholds))
    return {"rows": info.rows, "pair_counts": stats.pair_counts, "histogram": stats.histogram,
            "forest_edges": stats.forest_edges, "kernel_task_seconds": round(stats.kernel_seconds, 3),
            "corpus_rows_read": stats.task_rows, "files": len(files), "tasks": tasks,
            "note": f"{stats.pair_counts[0]} pairs with corpus rows, {stats.task_rows} kept corpus rows read "
                    f"from {len(files)} index files in {tasks} tasks, {stats.kernel_seconds:.1f} s in the kernel "
                    "over all tasks"}


REFERENCE_STAGE = Stage("reference", _reference_settings, _reference_run)


def _task_layout(files: list[tuple[str, dict]], ctx: RunContext) -> np.ndarray:
    """The first task of each index file, then the number of tasks. A file's new rows are split by
    row_id over as many tasks as keep each under half of ``max_task_rows`` (the file's own rows,
    one search task's, take the rest), so a delivery crowding a few buckets cannot put them all in
    one task; each task reads the file again. A file's new rows are bounded by the new rows of its
    buckets (the assign stage's counts; a row in two of them counts twice)."""
    from dedup_spark.assign import bucket_sizes

    cap = max(1, bucket.max_task_rows(bucket.task_memory_bytes(ctx.spark), ctx.dim, ctx.config) // 2)
    sizes = bucket_sizes(ctx)
    bounds = np.array([sum(sizes.get(int(b), 0) for b in entry["buckets"]) for _, entry in files], np.int64)
    return np.concatenate([[0], np.cumsum(np.maximum(1, -(-bounds // cap)))]).astype(np.int64)


def _to_tasks(width: int, files: list[tuple[str, dict]], first_task: np.ndarray):
    """New rows to the tasks of the index files holding the buckets they joined: one routed row per
    (row, file), in the file's task of its row_id."""
    pairs = [(bucket_id, number) for number, (_, entry) in enumerate(files) for bucket_id in entry["buckets"]]
    by_bucket = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)

    def route(rows: pa.RecordBatch, assigned: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        slots = binary_matrix(assigned.column("buckets"), width, "int32")
        row, joined = bucket.joined_buckets(slots)
        lo = np.searchsorted(by_bucket[:, 0], joined)
        hi = np.searchsorted(by_bucket[:, 0], joined, side="right")
        counts = hi - lo
        source = np.repeat(np.arange(len(row)), counts)
        at = np.repeat(lo, counts) + (np.arange(len(source)) - np.repeat(np.cumsum(counts) - counts, counts))
        pairs = np.unique(np.stack([row[source], by_bucket[at, 1]], axis=1), axis=0) if len(source) else \
            np.zeros((0, 2), np.int64)
        take = pa.array(pairs[:, 0])
        row_ids = rows.column("row_id").take(take)
        file = pairs[:, 1]
        task = first_task[file] + row_ids.to_numpy() % (first_task[file + 1] - first_task[file])
        yield pa.RecordBatch.from_arrays(
            [pa.array(task.astype(np.int32)), row_ids,
             assigned.column("buckets").take(take), rows.column("embedding").take(take)], names=_ROUTED.names)

    return route


def _against_corpus(files: list[tuple[str, dict]], first_task: np.ndarray, dim: int, width: int,
                    thresholds: list[float], block_rows: int, memory: int, probe_ids: np.ndarray, probes: np.ndarray):
    """The stream handler of one task of an index file: its new rows against the file's kept corpus
    rows of each bucket both joined (a bipartite search: new x corpus only), and, in the file's first
    task, the file's kept corpus rows against the probes."""

    def handle(task: object, rows: pa.Table) -> Iterator[pa.RecordBatch]:
        file = int(np.searchsorted(first_task, int(task), side="right")) - 1
        segment, entry = files[file]
        corpus = read_file(segment, entry)
        rows = rows.filter(pc.greater(pc.binary_length(rows.column("buckets")), 0))
        corpus_ids = corpus.column("row_id").to_numpy()
        corpus_emb = binary_matrix(corpus.column("embedding"), dim)
        corpus_slots = binary_matrix(corpus.column("buckets"), width, "int32")
        groups, sizes = corpus.column("group_id").to_numpy(), corpus.column("group_size").to_numpy()
        embeddings = corpus.column("embedding").combine_chunks()
        counters = _Counters(len(thresholds))
        if rows.num_rows:
            new_ids = rows.column("row_id").to_numpy()
            new_emb = binary_matrix(rows.column("embedding"), dim)
            new_slots = binary_matrix(rows.column("buckets"), width, "int32")
            new_in, old_in = bucket.rows_by_bucket(new_slots), bucket.rows_by_bucket(corpus_slots)
            for bucket_id in np.intersect1d(entry["buckets"], np.unique(new_slots)):
                new_rows, old_rows = new_in(bucket_id), old_in(bucket_id)
                if not len(new_rows) or not len(old_rows):
                    continue
                points = np.concatenate([new_emb[new_rows], corpus_emb[old_rows]])
                owners = np.concatenate([new_slots[new_rows], corpus_slots[old_rows]])
                started = time.perf_counter()
                found = kernels.graph_search(points, np.arange(len(new_rows)), np.arange(len(new_rows), len(points)),
                                             thresholds, block_rows, memory, owners, int(bucket_id),
                                             histogram_bins=search.HISTOGRAM_BINS)
                counters.add(found, time.perf_counter() - started)
                for level, (a, b, similarity) in enumerate(found.forests):
                    new_at, corpus_at = np.where(a < len(new_rows), a, b), np.where(a < len(new_rows), b, a)
                    taken = old_rows[corpus_at - len(new_rows)]
                    yield _links(new_ids[new_rows[new_at]], corpus_ids[taken], groups[taken], sizes[taken],
                                 similarity, level, embeddings.take(pa.array(taken)) if level == 0 else None)
        if len(probe_ids) and len(corpus_ids) and int(task) == first_task[file]:
            for i, j, similarity in kernels.search_pairs(probes, corpus_emb, thresholds[0]):
                yield _links(probe_ids[i], corpus_ids[j], groups[j], sizes[j], similarity, PROBE, None)
        yield from counters.batches(len(corpus_ids))

    return handle


def _links(new_ids, corpus_ids, groups, sizes, similarity, level: int, embeddings) -> pa.RecordBatch:
    count = len(new_ids)
    return pa.RecordBatch.from_arrays(
        [pa.array(np.asarray(new_ids, np.int64)), pa.array(np.asarray(corpus_ids, np.int64)),
         pa.array(np.asarray(groups, np.int64)), pa.array(np.asarray(sizes, np.int64)),
         pa.array(np.asarray(similarity, np.float32)), pa.array(np.full(count, level, np.int32)),
         embeddings if embeddings is not None else pa.nulls(count, pa.binary())],
        names=LINKS_SCHEMA.names)


class _Counters:
    """A task's counts in search.py's counter rows (summed by ``search.search_stats``)."""

    def __init__(self, levels: int) -> None:
        self.pair_counts = np.zeros(levels, np.int64)
        self.histogram = np.zeros(search.HISTOGRAM_BINS, np.int64)
        self.kernel_seconds = 0.0

    def add(self, found: kernels.GraphSearchResult, seconds: float) -> None:
        self.pair_counts += found.pair_counts
        self.histogram += found.histogram
        self.kernel_seconds += seconds

    def batches(self, corpus_rows: int) -> Iterator[pa.RecordBatch]:
        for level, counts in ((search.PAIR_COUNT, self.pair_counts), (search.HISTOGRAM, self.histogram),
                              (search.KERNEL_MICROS, np.array([round(self.kernel_seconds * 1e6)])),
                              (search.TASK_ROWS, np.array([corpus_rows]))):
            index = np.flatnonzero(counts)
            if index.size:
                yield pa.RecordBatch.from_arrays(
                    [pa.array(index.astype(np.int64)), pa.array(counts[index].astype(np.int64)),
                     pa.nulls(index.size, pa.int64()), pa.nulls(index.size, pa.int64()),
                     pa.array(np.zeros(index.size, np.float32)), pa.array(np.full(index.size, level, np.int32)),
                     pa.nulls(index.size, pa.binary())], names=LINKS_SCHEMA.names)


# The group stage: components over new-new and new-corpus links -----------------------------------

def _group_settings(ctx: RunContext) -> dict:
    config = ctx.config.to_dict()
    return {"group": config["group"], "keep": config["keep"], "pairs": ctx.config.output.pairs, "key": ctx.key_column}


def _group_run(ctx: RunContext) -> dict:
    spark, config, work = ctx.spark, ctx.config, ctx.work
    step = report.StepLog("group")
    edges = tables.read_table(spark, work.edges, max_task_rows=config.group.local_edges)
    links = tables.read_table(spark, work.reference_links).where(F.col("level") >= 0)
    graph = search.forest(edges).select("row_id_a", "row_id_b").unionByName(
        links.where(F.col("level") == 0).select("row_id_a", "row_id_b"))
    count = ctx.results["search"]["forest_edges"][0] + ctx.results["reference"]["forest_edges"][0]
    members, cc_stats = group.connected_components(graph, config, count)
    step.done("connected components")
    linked = (links.where(F.col("level") == 0).select(F.col("row_id_b").alias("row_id"), "group_id", "group_size",
                                                       "embedding").dropDuplicates(["row_id"]))
    corpus = linked.join(chain_group_sizes(spark, ctx.reference.files()), "group_id", "left").select(
        "row_id", "group_id", F.greatest("group_size", F.coalesce("chain_size", "group_size")).alias("group_size"),
        "embedding")
    duplicates = _duplicates(ctx, members, corpus, cc_stats["members"])
    info = tables.write_table(read.with_keys(ctx, duplicates), work.duplicates)
    step.done("duplicates/ of the new rows")
    done = session.run_concurrently("group", _closing_queries(ctx, edges, links))
    totals = done["totals"]
    removed = int(totals["removed"] or 0)
    pairs = ctx.results["search"]["pair_counts"][0] + ctx.results["reference"]["pair_counts"][0]
    calibration = [{"threshold": ctx.threshold, "pairs": pairs, "groups": int(totals["groups"]),
                    "removed_rows": removed}, *done["calibration"]]
    return {"rows": info.rows, "groups": int(totals["groups"]), "removed_rows": removed,
            "joined_corpus_groups": int(totals["corpus_groups"] or 0), "rows_joined_to_corpus": int(totals["joined"] or 0),
            "cc_rounds": cc_stats["rounds"], "pairs_rows": done["pairs/"], "calibration": calibration,
            "views": done["report views"], "captions": None,
            "note": f"{int(totals['groups'])} groups, {int(totals['joined'] or 0)} new rows joined to corpus groups"}


def _duplicates(ctx: RunContext, members: DataFrame, corpus: DataFrame, member_count: int) -> DataFrame:
    """The new rows of every component: a component holding corpus rows keeps its corpus row of
    smallest published group, and its new rows join that group; one of new rows only keeps a row
    by the keep policy. Similarities to the kept row are computed like a full run's."""
    spark, config = ctx.spark, ctx.config
    # Small and read by every step below: computed once (each Spark action would redo the joins).
    corpus = corpus.localCheckpoint()
    tagged = members.join(corpus.select("row_id", F.col("group_id").alias("published"),
                                        F.col("group_size").alias("published_size")), "row_id", "left").localCheckpoint()
    # Per component with corpus rows: the kept corpus row (smallest published group).
    anchored = (tagged.where(F.col("published").isNotNull()).groupBy("group_id")
                .agg(F.min(F.struct("published", "row_id", "published_size")).alias("best"))
                .select("group_id", F.col("best.row_id").alias("kept_row_id"), F.col("best.published").alias("published"),
                        F.col("best.published_size").alias("published_size"))).localCheckpoint()
    new_members = tagged.where(F.col("published").isNull()).select("row_id", "group_id")
    free = new_members.join(anchored.select("group_id"), "group_id", "left_anti")
    metadata = read.read_metadata(spark, ctx.manifest, config) if config.keep.expression else None
    kept = group.choose_kept(free, metadata, config).unionByName(anchored.select("group_id", "kept_row_id"))
    scored = new_members.unionByName(anchored.select(F.col("kept_row_id").alias("row_id"), "group_id"))
    corpus_rows = corpus.select("row_id", "embedding")

    def rows(transform, schema):
        return read.valid_rows(spark, ctx.work.rows, transform, schema).unionByName(
            corpus_rows.mapInArrow(transform, schema))

    # At most every member, so the members are broadcast to the tasks reading rows as in a full run.
    table = group.duplicates_table(scored, kept, rows, ctx.dim, None, config.captions, member_count)
    joined = table.join(anchored.select("group_id", "kept_row_id", "published", "published_size"), "group_id", "left")
    new_only = joined.where(F.col("published").isNull() | (F.col("row_id") != F.col("kept_row_id")))
    arrivals = new_only.groupBy("group_id").agg(F.count("*").alias("arrivals"))
    return (new_only.join(arrivals, "group_id")
            .select("row_id",
                    F.coalesce("published", "group_id").alias("group_id"),
                    F.when(F.col("published").isNotNull(), F.col("published_size") + F.col("arrivals"))
                    .otherwise(F.col("group_size")).cast("long").alias("group_size"),
                    "is_kept", "similarity_to_kept", "caption_similarity", "caption_group"))


def _closing_queries(ctx: RunContext, edges: DataFrame, links: DataFrame) -> dict:
    spark, config, work = ctx.spark, ctx.config, ctx.work

    def totals():
        duplicates = tables.read_table(spark, work.duplicates, ["group_id", "is_kept", "row_id"])
        published = links.where(F.col("level") == 0).select(F.col("group_id").alias("corpus")).distinct()
        joined = duplicates.join(published, duplicates["group_id"] == published["corpus"], "left")
        return joined.agg(F.countDistinct("group_id").alias("groups"),
                          F.sum(F.when(~F.col("is_kept"), 1).otherwise(0)).alias("removed"),
                          F.countDistinct("corpus").alias("corpus_groups"),
                          F.sum(F.when(F.col("corpus").isNotNull(), 1).otherwise(0)).alias("joined")).first()

    def pairs_written():
        if config.output.pairs == "none":
            return None
        level = search.PAIR if ctx.all_pairs else 0
        found = edges.where(F.col("level") == level).select("row_id_a", "row_id_b", "similarity")
        # A link is (new, corpus): written with the smaller id first, like every pair.
        linked = links.where(F.col("level") == 0).select(
            F.least("row_id_a", "row_id_b").alias("row_id_a"), F.greatest("row_id_a", "row_id_b").alias("row_id_b"),
            "similarity")
        spanning = found.unionByName(linked).groupBy("row_id_a", "row_id_b").agg(F.max("similarity").alias("similarity"))
        return tables.write_table(spanning, work.pairs).rows

    def calibration():
        # The search threshold's row comes from the totals; the others need their own components.
        return [{"threshold": threshold, **_removed_at(ctx, edges, links, level)}
                for level, threshold in enumerate(ctx.thresholds) if level > 0]

    def views():
        from dedup_spark.assign import bucket_sizes

        return report.dataset_views(tables.read_table(spark, work.duplicates), ctx.column_names,
                                          lambda ids, columns: read.metadata_of(spark, ctx.manifest, config, ids,
                                                                                columns),
                                          list(bucket_sizes(ctx).values()))

    return {"totals": totals, "pairs/": pairs_written, "calibration": calibration, "report views": views}


GROUP_STAGE = Stage("group", _group_settings, _group_run)


def _removed_at(ctx: RunContext, edges: DataFrame, links: DataFrame, level: int) -> dict:
    """What a run at ``thresholds[level]`` would report: pairs, groups touching new rows, and new
    rows removed (all of a component holding corpus rows, all but one of a component of new rows)."""
    linked = links.where(F.col("level") == level)
    graph = search.forest(edges, level).select("row_id_a", "row_id_b").unionByName(linked.select("row_id_a", "row_id_b"))
    members, _ = group.connected_components(graph, ctx.config)
    corpus = linked.select(F.col("row_id_b").alias("row_id"), F.lit(1).alias("corpus")).distinct()
    per_group = (members.join(corpus, "row_id", "left").groupBy("group_id")
                 .agg(F.max(F.coalesce("corpus", F.lit(0))).alias("anchored"),
                      F.sum(F.when(F.col("corpus").isNull(), 1).otherwise(0)).alias("new_rows")))
    counted = per_group.agg(F.count("*").alias("groups"),
                            F.sum(F.when(F.col("anchored") == 1, F.col("new_rows"))
                                  .otherwise(F.col("new_rows") - 1)).alias("removed")).first()
    pairs = ctx.results["search"]["pair_counts"][level] + ctx.results["reference"]["pair_counts"][level]
    return {"pairs": pairs, "groups": int(counted["groups"]), "removed_rows": int(counted["removed"] or 0)}


# The estimate stage: sampled new rows against the new rows and the whole corpus ------------------

def _estimate_run(ctx: RunContext) -> dict:
    started = time.perf_counter()
    probe_pairs = estimate.probe_pairs_found(ctx)
    if probe_pairs is None:
        return dict(estimate.SKIPPED)
    spark, work = ctx.spark, ctx.work
    corpus_pairs = tables.read_table(spark, work.reference_links).where(F.col("level") == PROBE)
    duplicates = tables.read_table(spark, work.duplicates, ["row_id", "group_id", "is_kept"])
    new_pairs = estimate.closure_flags(estimate.true_pairs(probe_pairs), duplicates)
    # A sampled row's pair with a corpus row is closed when the row joined a published group: the
    # one of its corpus neighbours with the smallest group_id, which may be another's.
    published = (tables.read_table(spark, work.reference_links).where(F.col("level") == 0)
                 .select(F.col("group_id").alias("joined")).distinct())
    joined = (duplicates.where(~F.col("is_kept")).join(published, duplicates["group_id"] == published["joined"])
              .select(F.col("row_id").alias("sample_row_id"), F.lit(1).cast("long").alias("closed")))
    # A corpus row lies in an index file per search task of its buckets: each of its pairs once.
    with_corpus = (corpus_pairs.select(F.col("row_id_a").alias("sample_row_id"), F.col("row_id_b").alias("row_id"))
                   .distinct().join(joined, "sample_row_id", "left")
                   .select("sample_row_id", "row_id", F.coalesce("closed", F.lit(0)).cast("long").alias("closed")))
    sampled = ctx.results["assign"]["probe_rows"]
    result = estimate.summarise(new_pairs.unionByName(with_corpus), sampled, None)
    result["against"] = "new rows and the whole corpus"
    return estimate.stage_result(ctx, result, probe_pairs, started)


ESTIMATE_STAGE = Stage("estimate", estimate.STAGE.settings, _estimate_run)


def drift(ctx: RunContext) -> dict:
    """How the new rows spread over the reference's buckets, against the corpus: the largest bucket
    before and after, and the total variation distance between the two spreads; a warning when the
    buckets no longer fit the data (a full run, which retrains them, is then worth it)."""
    from dedup_spark.assign import bucket_sizes
    from dedup_spark.index import BUCKET_ROWS

    before = None
    for segment in ctx.reference.segments:
        counts = storage.read_npy(storage.join(segment["uri"], BUCKET_ROWS))
        before = counts if before is None else before + counts
    new = np.zeros_like(before)
    for bucket_id, rows in bucket_sizes(ctx).items():
        new[bucket_id] += rows
    after = before + new
    distance = 0.5 * float(np.abs(new / max(1, new.sum()) - before / max(1, before.sum())).sum())
    grown = float(after.max() / max(1, before.max()))
    warning = None
    if distance > DRIFT_DISTANCE or grown > DRIFT_GROWTH:
        warning = (f"the new rows spread over the reference's buckets unlike its corpus (distance {distance:.2f}, "
                   f"largest bucket x{grown:.2f}): its buckets were trained on older data; a full run "
                   "(without --reference) retrains them")
        log.warning(warning)
    return {"new_rows_per_bucket": report.size_stats(new[new > 0]), "largest_bucket_before": int(before.max()),
            "largest_bucket_after": int(after.max()), "mean_bucket_before": round(float(before.mean()), 3),
            "mean_bucket_after": round(float(after.mean()), 3), "spread_distance": round(distance, 4),
            "largest_bucket_growth": round(grown, 4), "warning": warning}


def reference_report(ctx: RunContext) -> dict:
    """report.json's ``reference`` section."""
    searched = ctx.results["reference"]
    grouped = ctx.results["group"]
    return {"uri": ctx.reference.uri, "segments": len(ctx.reference.segments),
            "corpus_rows": int(ctx.reference.manifest["rows"]), "row_id_max": ctx.reference.row_id_max,
            "pairs_with_corpus": searched["pair_counts"][0], "corpus_entries_read": searched["corpus_rows_read"],
            "index_files": searched["files"], "tasks": searched["tasks"],
            "kernel_task_seconds": searched["kernel_task_seconds"],
            "rows_joined_to_corpus_groups": grouped["rows_joined_to_corpus"],
            "corpus_groups_joined": grouped["joined_corpus_groups"], "drift": drift(ctx)}

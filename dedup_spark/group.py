"""Group stage: connected components over the edges, the keep policy, and the
similarity of every group member to its kept row, all in Spark DataFrames.

Components use the large-star / small-star alternation of Kiveris et al.,
"Connected Components in MapReduce and Beyond" (SoCC 2014): O(log^2 n) rounds
in the worst case, a few in practice. Both operations aggregate with min and
join, so no task ever holds a node's whole neighbour list, and a giant
component is spread over many tasks. Before the first round every partition's
edges are turned into stars by a local union-find, which leaves the components
unchanged and saves most rounds on the search's chain-like spanning forests.
Lineage is cut by a local checkpoint
every ``group.checkpoint_every`` rounds. The result maps every node to the
smallest row_id of its component, which is the group_id.

Stage ``group``: in, the edges table, the rows table (members' embeddings), the
input's metadata (keep.expression, captions, the key column); out, ``duplicates/``
(every member of a group with its group, keep flag, similarity to the kept row,
caption similarity and key), ``pairs/`` and, for captions.policy merge, the merged
captions. Result: groups, removed rows, the calibration table, the report's views.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark import Broadcast
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import captions, minhash, read, report, search, session, tables
from dedup_spark.config import CaptionsConfig, JobConfig
from dedup_spark.kernels import components, exact_cosine
from dedup_spark.read import CAPTION_SCHEMA, VALID_SCHEMA
from dedup_spark.stage import RunContext, Stage
from dedup_spark.tables import BatchTransform, binary_matrix

log = logging.getLogger(__name__)


class ConvergenceError(RuntimeError):
    """Connected components did not converge within group.max_rounds."""


def _large_star(edges: DataFrame) -> DataFrame:
    """Each node links its larger neighbours to the smallest node of its neighbourhood."""
    both = edges.select(F.col("x").alias("u"), F.col("y").alias("v")).unionByName(
        edges.select(F.col("y").alias("u"), F.col("x").alias("v")))
    smallest = both.groupBy("u").agg(F.least(F.min("v"), F.col("u")).alias("m"))
    return (both.where(F.col("v") > F.col("u")).join(smallest, "u")
            .select(F.col("v").alias("x"), F.col("m").alias("y")).distinct())


def _small_star(edges: DataFrame) -> DataFrame:
    """Each node links itself and its smaller neighbours to the smallest of them."""
    oriented = edges.select(F.greatest("x", "y").alias("hi"), F.least("x", "y").alias("lo")).distinct()
    smallest = oriented.groupBy("hi").agg(F.min("lo").alias("m"))
    linked = oriented.join(smallest, "hi").select(F.col("lo").alias("x"), F.col("m").alias("y"))
    return (linked.unionByName(smallest.select(F.col("hi").alias("x"), F.col("m").alias("y")))
            .where(F.col("x") != F.col("y")).distinct())


def _is_star_forest(edges: DataFrame) -> bool:
    """Every edge points to a smaller root, and every node has one parent: components are stars.

    One Spark job: a node with two parents, or a parent that is itself a child, is a witness
    that the alternation has not converged.
    """
    parents = edges.groupBy("x").agg(F.count("*").alias("parents"))
    two_parents = parents.where(F.col("parents") > 1).select("x")
    chained = edges.select(F.col("y").alias("x")).join(parents.select("x"), "x", "left_semi")
    return two_parents.unionByName(chained).limit(1).count() == 0


_STAR_SCHEMA = T.StructType([T.StructField("x", T.LongType(), False), T.StructField("y", T.LongType(), False)])


def _local_stars(edges: DataFrame) -> DataFrame:
    """Each partition's edges as stars: every node to the smallest node of its component within
    the partition (union-find in numpy, kernels.components).

    The components are unchanged and the edge count does not grow (a component of c nodes has at
    least c - 1 edges and becomes exactly c - 1), but paths and trees become stars, so the
    alternation below starts near its fixed point: search tasks write their spanning forests one
    task per partition, and forests of chains need many rounds. Memory: one partition's edges
    (at most ``group.local_edges`` once ``connected_components`` has merged partitions).
    """
    def to_stars(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        pieces = [batch for batch in batches if batch.num_rows]
        if not pieces:
            return
        table = pa.Table.from_batches(pieces)
        a = table.column("row_id_a").to_numpy()
        b = table.column("row_id_b").to_numpy()
        nodes, local = np.unique(np.concatenate([a, b]), return_inverse=True)
        labels = components(len(nodes), local[:len(a)], local[len(a):])
        moved = labels != np.arange(len(nodes))
        # Smallest local index is the smallest row_id: np.unique sorts.
        yield pa.RecordBatch.from_arrays([pa.array(nodes[moved]), pa.array(nodes[labels[moved]])], names=["x", "y"])

    return edges.select("row_id_a", "row_id_b").mapInArrow(to_stars, _STAR_SCHEMA)


def connected_components(edges: DataFrame, config: JobConfig, edge_count: int | None = None) -> tuple[DataFrame, dict]:
    """``row_id, group_id`` for every node with an edge; group_id is the component's smallest row_id.

    ``edges`` has columns row_id_a, row_id_b. ``edge_count`` (at least the number of edges, when
    known) lets the local union-find take up to ``group.local_edges`` edges per task: partitions
    are merged without a shuffle, so components that fit one task are finished before the rounds.
    Returns the membership and stats (rounds, members, groups, seconds). Raises ConvergenceError past
    group.max_rounds.
    """
    started = time.perf_counter()
    partitions = None
    if edge_count is not None:
        partitions = max(1, math.ceil(edge_count / config.group.local_edges))
        edges = edges.coalesce(partitions)
    current = _local_stars(edges).distinct().localCheckpoint()
    rounds = 0
    # One task's union-find over every edge leaves final stars: no round, and no check, is needed.
    while partitions != 1:
        if _is_star_forest(current):
            break
        if rounds >= config.group.max_rounds:
            raise ConvergenceError(f"connected components did not converge in {rounds} rounds (group.max_rounds)")
        current = _small_star(_large_star(current))
        rounds += 1
        if rounds % config.group.checkpoint_every == 0:
            current = current.localCheckpoint()
        log.info("group: round %d done", rounds)
    if rounds % config.group.checkpoint_every:
        current = current.localCheckpoint()
    # The stars are read by every later step (sizes, kept rows, the join): counted once, held once.
    counted = current.agg(F.count("*").alias("leaves"), F.countDistinct("y").alias("roots")).first()
    members = current.select(F.col("x").alias("row_id"), F.col("y").alias("group_id")).unionByName(
        current.select(F.col("y").alias("row_id"), F.col("y").alias("group_id")).distinct())
    return members, {"rounds": rounds, "members": int(counted["leaves"]) + int(counted["roots"]),
                     "groups": int(counted["roots"]), "seconds": round(time.perf_counter() - started, 3)}


def choose_kept(members: DataFrame, metadata: DataFrame | None, config: JobConfig) -> DataFrame:
    """``group_id, kept_row_id``: the smallest row_id, or the best row by keep.expression."""
    if config.keep.expression is None:
        return members.select("group_id", F.col("group_id").alias("kept_row_id")).distinct()
    if metadata is None:
        raise ValueError("keep.expression needs input columns, but npy input has none")
    scored = members.join(metadata.select("row_id", F.expr(config.keep.expression).alias("score")), "row_id", "left")
    if config.keep.order == "max":
        # Rows without a score lose; ties go to the smallest row_id.
        rank = F.struct(F.col("score").isNotNull(), F.col("score"), -F.col("row_id"))
        return scored.groupBy("group_id").agg(F.max_by("row_id", rank).alias("kept_row_id"))
    rank = F.struct(F.col("score").isNull(), F.col("score"), F.col("row_id"))
    return scored.groupBy("group_id").agg(F.min_by("row_id", rank).alias("kept_row_id"))


# Members broadcast to the tasks reading the rows (row_id, group_id, group_size, is_kept: 25 bytes
# each in numpy, so at most 25 MB in each Python worker): up to it, no row but a member's leaves them.
BROADCAST_MEMBERS = 1_000_000

RowReader = Callable[[BatchTransform, T.StructType], DataFrame]
"""Rows read with a transform (of batches to a schema) applied in the Python task that reads them:
``read.valid_rows`` (VALID_SCHEMA rows) or ``read.read_captions`` (CAPTION_SCHEMA rows), with their
first arguments bound. Only the transform's output reaches the JVM."""

DUPLICATES_SCHEMA = T.StructType([
    T.StructField("row_id", T.LongType(), False),
    T.StructField("group_id", T.LongType(), False),
    T.StructField("group_size", T.LongType(), False),
    T.StructField("is_kept", T.BooleanType(), False),
    T.StructField("similarity_to_kept", T.FloatType(), False),
    # Filled by dedup_spark.captions when the input has captions; null otherwise.
    T.StructField("caption_similarity", T.FloatType(), True),
    T.StructField("caption_group", T.LongType(), True),
])

# The members' rows the broadcast lookup makes of the readers' rows (VALID_SCHEMA, CAPTION_SCHEMA).
_FLAGS = [DUPLICATES_SCHEMA[name] for name in ("row_id", "group_id", "group_size", "is_kept")]
_MEMBER_EMBEDDINGS = T.StructType([*_FLAGS, VALID_SCHEMA["embedding"]])
_MEMBER_CAPTIONS = T.StructType([*_FLAGS, CAPTION_SCHEMA["caption"]])


def frame_reader(frame: DataFrame) -> RowReader:
    """A RowReader over a DataFrame already made: the transform runs in a mapInArrow after it, so
    every row still crosses into the JVM and back (for tests and callers without a table to read)."""
    return lambda transform, schema: frame.mapInArrow(transform, schema)


def duplicates_table(members: DataFrame, kept: DataFrame, rows: RowReader, dim: int,
                     captions: RowReader | None = None, caption_settings: CaptionsConfig | None = None,
                     member_count: int | None = None) -> DataFrame:
    """Every member of every group with its group size, keep flag and similarity to the kept row,
    and, given ``captions`` (rows of row_id, caption), its caption's estimated similarity to the
    kept row's.

    Members meet their embeddings (read from ``rows``) in one join and their captions in another;
    both are then sent to their group in one shuffle, arranged with the kept row first (a member's
    caption row right after its embedding row, merged in the stream), and a task streams through
    them holding only the current group's kept embedding and caption signature, so a giant group
    costs no memory and nothing is shuffled twice (a second join on kept_row_id, or on row_id for
    the captions). Caption signatures are MinHash values (``minhash.signatures``) computed in the
    stream; caption_group is left null here.

    ``member_count`` (from ``connected_components``), when at most BROADCAST_MEMBERS: the members
    are collected, sorted by row_id and broadcast, and the join is a lookup in the Python tasks
    reading the rows and the captions, so only the members' rows reach the JVM, not every row's
    (1M bench rows, 336k members: the JVM received 1.5 GB of embeddings and 1M captions before).
    """
    sizes = members.groupBy("group_id").agg(F.count("*").alias("group_size"))
    flagged = (members.join(sizes, "group_id").join(kept, "group_id")
               .select("row_id", "group_id", "group_size", (F.col("row_id") == F.col("kept_row_id")).alias("is_kept")))
    columns = ["row_id", "group_id", "group_size", "is_kept", "embedding"]
    with_captions = captions is not None  # the task closure must not hold the DataFrame
    if member_count is not None and member_count <= BROADCAST_MEMBERS:
        lookup = _broadcast_members(flagged)
        with_embeddings = rows(_flag_members(lookup, "embedding"), _MEMBER_EMBEDDINGS)
        member_captions = captions(_flag_members(lookup, "caption"), _MEMBER_CAPTIONS) if with_captions else None
    else:
        with_embeddings = flagged.join(rows(_same, VALID_SCHEMA), "row_id")
        member_captions = captions(_same, CAPTION_SCHEMA).join(flagged, "row_id") if with_captions else None
    order = ["group_id", F.desc("is_kept"), "row_id"]
    if with_captions:
        # A member's caption travels as a row of its own beside its embedding's and the two are merged
        # in the group-sorted stream (_merge_captions): captions and embeddings go to their group in one
        # shuffle, where a join on row_id first would shuffle the members' embeddings twice.
        with_embeddings = with_embeddings.withColumn("caption", F.lit(None).cast("string")).unionByName(
            member_captions.withColumn("embedding", F.lit(None).cast("binary")))
        columns.append("caption")
        order.append(F.col("embedding").isNull())  # a member's embedding row, then its caption row
    arranged = with_embeddings.repartition("group_id").sortWithinPartitions(*order).select(*columns)

    def similarity(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        carried_group = carried_embedding = carried_signature = None
        for batch in _merge_captions(batches) if with_captions else batches:
            if batch.num_rows == 0:
                continue
            own = binary_matrix(batch.column("embedding"), dim)
            group_id = batch.column("group_id").to_numpy()
            is_kept = batch.column("is_kept").to_numpy(zero_copy_only=False)
            # Each group starts with its kept row: a row's kept row is the last kept row so far.
            last_kept = np.maximum.accumulate(np.where(is_kept, np.arange(batch.num_rows), -1))
            if carried_embedding is None and last_kept[0] < 0:
                raise RuntimeError(f"group {group_id[0]} has no kept row")
            carry = carried_embedding is not None
            kept_vectors = np.vstack([own, carried_embedding[None, :]]) if carry else own
            kept_group = np.append(group_id, carried_group) if carry else group_id
            source = np.where(last_kept >= 0, last_kept, batch.num_rows)
            if not np.array_equal(kept_group[source], group_id):
                raise RuntimeError("a group's kept row is missing from its members")
            # The search's own measure: a copy identical to its kept row is exactly 1.0.
            sim = exact_cosine(own, kept_vectors[source])
            sim[is_kept] = 1.0
            caption_similarity = pa.nulls(batch.num_rows, pa.float32())
            if with_captions:
                values, present = minhash.signatures(batch.column("caption").to_pylist(), caption_settings.num_perm,
                                                     caption_settings.shingles, caption_settings.shingle_size)
                # A signature row with a presence flag in front: carried like the kept embedding.
                signed = np.hstack([present[:, None].astype(np.uint32), values])
                kept_signed = np.vstack([signed, carried_signature[None, :]]) if carry else signed
                both = present & (kept_signed[source, 0] == 1)
                estimate = minhash.similarity(values, kept_signed[source, 1:])
                caption_similarity = pa.array(estimate, pa.float32(), mask=~both)
                carried_signature = kept_signed[source[-1]].copy()
            carried_group, carried_embedding = kept_group[source[-1]], kept_vectors[source[-1]].copy()
            yield pa.RecordBatch.from_arrays(
                [batch.column("row_id"), batch.column("group_id"), batch.column("group_size"), batch.column("is_kept"),
                 pa.array(sim, pa.float32()), caption_similarity, pa.nulls(batch.num_rows, pa.int64())],
                names=DUPLICATES_SCHEMA.names)

    return arranged.mapInArrow(similarity, DUPLICATES_SCHEMA)


def _same(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    return batches


def _broadcast_members(flagged: DataFrame) -> Broadcast:
    """The flagged members collected to the driver and broadcast as numpy columns sorted by row_id."""
    table = flagged.toArrow()
    order = np.argsort(table.column("row_id").to_numpy(), kind="stable")
    return flagged.sparkSession.sparkContext.broadcast(
        tuple(table.column(name).to_numpy()[order] for name in ("row_id", "group_id", "group_size", "is_kept")))


def _flag_members(lookup: Broadcast, column: str) -> BatchTransform:
    """The rows of members only, with their group_id, group_size and is_kept, then ``column``."""
    def flagged(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        member_ids, group_ids, group_sizes, kept_flags = lookup.value
        for batch in batches:
            ids = batch.column("row_id")
            row_ids = ids.fill_null(0).to_numpy() if ids.null_count else ids.to_numpy()
            at = np.minimum(np.searchsorted(member_ids, row_ids), max(0, member_ids.size - 1))
            hit = member_ids[at] == row_ids if member_ids.size else np.zeros(row_ids.size, dtype=bool)
            if ids.null_count:
                hit &= ids.is_valid().to_numpy(zero_copy_only=False)
            taken = np.flatnonzero(hit)
            if taken.size:
                at = at[taken]
                yield pa.RecordBatch.from_arrays(
                    [pa.array(row_ids[taken]), pa.array(group_ids[at]), pa.array(group_sizes[at]),
                     pa.array(kept_flags[at]), batch.column(column).take(pa.array(taken))],
                    names=["row_id", "group_id", "group_size", "is_kept", column])

    return flagged


def _merge_captions(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """One row per member from a stream where each member's row with its embedding is followed by
    the row with its caption (if it has one): ``caption`` moves onto the embedding's row. The rows of
    the last member of a batch are held back until the next, which may hold its caption."""
    held = None
    for batch in batches:
        if held is not None:
            batch = pa.concat_batches([held, batch])
        if batch.num_rows == 0:
            continue
        row_ids = batch.column("row_id").to_numpy()
        # A member's rows are adjacent: hold back those of the batch's last member.
        cut = batch.num_rows - 1
        while cut > 0 and row_ids[cut - 1] == row_ids[-1]:
            cut -= 1
        held = batch.slice(cut)
        if cut:
            yield _merged(batch.slice(0, cut))
    if held is not None and held.num_rows:
        yield _merged(held)


def _merged(batch: pa.RecordBatch) -> pa.RecordBatch:
    row_ids = batch.column("row_id").to_numpy()
    has_embedding = batch.column("embedding").is_valid().to_numpy(zero_copy_only=False)
    lead = np.flatnonzero(has_embedding)
    follows = np.flatnonzero(~has_embedding)
    # Every caption row comes right after its member's embedding row.
    if follows.size and (follows[0] == 0 or not np.array_equal(row_ids[follows - 1], row_ids[follows])
                         or not has_embedding[follows - 1].all()):
        raise RuntimeError("a member's caption arrived without its embedding")
    caption_at = np.full(lead.size, -1, dtype=np.int64)
    caption_at[np.searchsorted(lead, follows - 1)] = follows
    captions = batch.column("caption").take(pa.array(caption_at, mask=caption_at < 0))
    base = batch.take(pa.array(lead))
    return base.set_column(base.schema.get_field_index("caption"), "caption", captions)


def _settings(ctx: RunContext) -> dict:
    config = ctx.config.to_dict()
    return {"group": config["group"], "keep": config["keep"], "captions": config["captions"],
            "pairs": ctx.config.output.pairs, "key": ctx.key_column}


def _run(ctx: RunContext) -> dict:
    spark, config, work = ctx.spark, ctx.config, ctx.work
    forest_edges = ctx.results["search"]["forest_edges"]
    # A partition of edges is at most what one local union-find may hold.
    edges = tables.read_table(spark, work.edges, max_task_rows=config.group.local_edges)
    step = report.StepLog("group")
    members, cc_stats = connected_components(search.forest(edges).select("row_id_a", "row_id_b"), config,
                                             forest_edges[0])
    step.done("connected components")
    metadata = read.read_metadata(spark, ctx.manifest, config) if config.keep.expression else None
    kept = choose_kept(members, metadata, config)
    written, merged_rows = _write_duplicates(ctx, members, kept, metadata, cc_stats["members"], step)
    done = session.run_concurrently("group", _closing_queries(ctx, edges, merged_rows))
    totals_row = done["totals"]
    groups = int(totals_row["groups"])
    # By embeddings alone, like the other thresholds' rows (keep_distinct may keep more).
    calibration = [{"threshold": ctx.threshold, "pairs": ctx.results["search"]["pair_counts"][0], "groups": groups,
                    "removed_rows": written - groups}, *done["calibration"]]
    return {"rows": written, "groups": groups, "removed_rows": int(totals_row["removed"] or 0),
            "cc_rounds": cc_stats["rounds"], "pairs_rows": done["pairs/"], "calibration": calibration,
            "views": done["report views"], "captions": done["captions summary"],
            "note": f"{groups} groups, {cc_stats['rounds']} rounds"}


def _write_duplicates(ctx: RunContext, members: DataFrame, kept: DataFrame, metadata: DataFrame | None,
                      member_count: int, step: report.StepLog) -> tuple[int, int | None]:
    """``duplicates/`` (with the key column), and for captions.policy merge the merged captions:
    the rows written and the merged lists' rows."""
    spark, config, work, column = ctx.spark, ctx.config, ctx.work, ctx.caption_column
    # Readers, not DataFrames: with few members, only the members' rows leave the reading tasks.
    caption_reader = None if column is None else functools.partial(read.read_captions, spark, ctx.manifest, config,
                                                                   column)
    duplicates = duplicates_table(members, kept, functools.partial(read.valid_rows, spark, work.rows), ctx.dim,
                                  caption_reader, config.captions, member_count)
    if column is None or config.captions.policy == "ignore":
        info = tables.write_table(read.with_keys(ctx, duplicates), work.duplicates)
        step.done("duplicates/ with similarity to kept" + ("" if column is None else " and caption similarity"))
        return info.rows, None
    # Signatures are stored once: clustering and merging each read them.
    tables.write_table(duplicates, work.duplicates_base)
    step.done("duplicates with similarity to kept and caption similarity")
    base = tables.read_table(spark, work.duplicates_base)
    tables.write_table(captions.signed_members(base, caption_reader(), config), work.caption_signatures)
    step.done("caption signatures")
    annotated = captions.annotate(base, tables.read_table(spark, work.caption_signatures), metadata, config)
    info = tables.write_table(read.with_keys(ctx, annotated.duplicates), work.duplicates)
    merged_rows = None
    if annotated.merged is not None:
        merged_rows = tables.write_table(annotated.merged, work.merged_captions).rows
    step.done(f"captions ({config.captions.policy})")
    return info.rows, merged_rows


def _closing_queries(ctx: RunContext, edges: DataFrame, merged_rows: int | None) -> dict[str, Callable[[], Any]]:
    """Independent queries over the tables just written, run side by side: their Spark jobs' fixed
    latencies overlap and each fills the cores the others' tails leave."""
    spark, config, work = ctx.spark, ctx.config, ctx.work
    forest_edges = ctx.results["search"]["forest_edges"]

    def totals() -> Any:
        return tables.read_table(spark, work.duplicates, ["group_id", "is_kept"]).agg(
            F.countDistinct("group_id").alias("groups"),
            F.sum(F.when(~F.col("is_kept"), 1).otherwise(0)).alias("removed")).first()

    def pairs_written() -> int | None:
        if ctx.all_pairs:
            return tables.write_table(search.found_pairs(edges), work.pairs).rows
        if config.output.pairs == "spanning":
            # A spanning edge found by several tasks (soft assignment) is written once.
            spanning = search.forest(edges).groupBy("row_id_a", "row_id_b").agg(F.max("similarity").alias("similarity"))
            return tables.write_table(spanning, work.pairs).rows
        return None

    def calibration_levels() -> list[dict[str, Any]]:
        levels = []
        for level, extra in enumerate(ctx.thresholds[1:], start=1):
            extra_members, _ = connected_components(search.forest(edges, level).select("row_id_a", "row_id_b"), config,
                                                    forest_edges[level])
            counted = extra_members.agg(F.count("*").alias("rows"), F.countDistinct("group_id").alias("groups")).first()
            levels.append({"threshold": extra, "pairs": ctx.results["search"]["pair_counts"][level],
                           "groups": int(counted["groups"]), "removed_rows": int(counted["rows"] - counted["groups"])})
        return levels

    def views() -> dict[str, Any]:
        from dedup_spark.assign import bucket_sizes

        return report.dataset_views(tables.read_table(spark, work.duplicates), ctx.column_names,
                                    functools.partial(read.metadata_of, spark, ctx.manifest, config),
                                    list(bucket_sizes(ctx).values()))

    def caption_report() -> dict[str, Any] | None:
        return None if ctx.caption_column is None else captions.summary(
            tables.read_table(spark, work.duplicates), ctx.caption_column, merged_rows, config)

    return {"totals": totals, "pairs/": pairs_written, "calibration": calibration_levels, "report views": views,
            "captions summary": caption_report}


STAGE = Stage("group", _settings, _run)

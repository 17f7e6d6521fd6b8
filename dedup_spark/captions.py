"""Caption-aware groups: caption similarity to the kept row, caption clusters, and the
``captions.policy`` (ignore, merge, keep_distinct). Part of the group stage.

Everything runs in Spark over the rows of duplicate groups only, with no step
that holds a group's captions together:

1. Each member's caption becomes a MinHash signature (``dedup_spark.minhash``);
   ``caption_similarity`` compares it with the kept row's signature. This is
   done by ``group.duplicates_table`` in the same stream (sorted by group, kept
   row first) that gives the similarity of embeddings, so under the default
   ``ignore`` policy captions cost one join and the signatures, nothing more.
2. ``merge`` and ``keep_distinct`` need caption clusters inside each group.
   Candidates come from LSH bands keyed by (group, band, band hash): every row
   is linked to the smallest row of each of its band buckets (a star, so links
   stay linear even when 20,000 copies share one caption), a link is kept when
   the two signatures' estimated similarity is >= ``captions.same_caption``,
   and connected components over the links (``group.connected_components``)
   give the clusters. ``caption_group`` is the smallest row_id of the cluster.
3. ``keep_distinct`` keeps, besides the group's kept row, the best row of every
   other caption cluster (by the same keep policy). ``merge`` gives the kept
   row a ``captions`` list: its own caption first, then one caption per other
   cluster, largest clusters first, at most ``captions.max_merged``.

Rows without a caption (null or blank) have no similarity and no cluster;
they are never kept for their caption.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dedup_spark import minhash
from dedup_spark.config import CAPTION_COLUMNS, ConfigError, JobConfig
from dedup_spark.tables import binary_matrix, packed_binary

log = logging.getLogger(__name__)

MERGED_SCHEMA = T.StructType([T.StructField("row_id", T.LongType(), False),
                              T.StructField("captions", T.ArrayType(T.StringType()), True)])


def caption_column(columns: list[str], config: JobConfig) -> str | None:
    """The input column holding captions, or None when there is none (or captions are off)."""
    wanted = config.captions.column
    if wanted is None:
        found = None
    elif wanted != "auto":
        if wanted not in columns:
            raise ConfigError(f"captions.column {wanted!r} is not an input column; the input has {sorted(columns)}")
        found = wanted
    else:
        lowered = {name.lower(): name for name in columns}
        found = next((lowered[name] for name in CAPTION_COLUMNS if name in lowered), None)
    if found is None and config.captions.policy != "ignore":
        raise ConfigError(f"captions.policy {config.captions.policy} needs a caption column, but "
                          f"{'captions.column is null' if wanted is None else 'the input has none'} "
                          f"(input columns: {sorted(columns)}); set captions.column")
    if found is not None and config.captions.policy == "merge" and "captions" in columns:
        raise ConfigError("captions.policy merge adds a 'captions' column, but the input already has one")
    return found


@dataclass(frozen=True)
class CaptionResult:
    duplicates: DataFrame
    merged: DataFrame | None


SIGNED_SCHEMA = T.StructType([T.StructField("row_id", T.LongType(), False), T.StructField("group_id", T.LongType(), False),
                              T.StructField("is_kept", T.BooleanType(), False),
                              T.StructField("caption", T.StringType(), True),
                              T.StructField("signature", T.BinaryType(), True)])


def signed_members(duplicates: DataFrame, captions: DataFrame, config: JobConfig) -> DataFrame:
    """Every group member with its caption and MinHash signature (null without a caption)."""
    settings = config.captions

    def sign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            texts = batch.column("caption").to_pylist()
            values, present = minhash.signatures(texts, settings.num_perm, settings.shingles, settings.shingle_size)
            yield pa.RecordBatch.from_arrays(
                [batch.column("row_id"), batch.column("group_id"), batch.column("is_kept"), batch.column("caption"),
                 packed_binary(values, present)], names=SIGNED_SCHEMA.names)

    joined = duplicates.select("row_id", "group_id", "is_kept").join(captions, "row_id", "left")
    return joined.select("row_id", "group_id", "is_kept", F.col("caption").cast("string")).mapInArrow(
        sign, SIGNED_SCHEMA)


def _similarity_column(pairs: DataFrame, left: str, right: str, name: str, num_perm: int) -> DataFrame:
    """Adds ``name``: estimated similarity of signature columns ``left`` and ``right`` (null if either is)."""
    schema = T.StructType([*[f for f in pairs.schema if f.name not in (left, right)],
                           T.StructField(name, T.FloatType(), True)])
    keep = [f.name for f in schema.fields[:-1]]

    def compare(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            a, b = batch.column(left), batch.column(right)
            both = np.asarray(a.is_valid()) & np.asarray(b.is_valid())
            values = np.zeros(batch.num_rows, dtype=np.float32)
            if both.any():
                chosen = pa.array(both)
                values[both] = minhash.similarity(binary_matrix(a.filter(chosen), num_perm, "uint32"),
                                                  binary_matrix(b.filter(chosen), num_perm, "uint32"))
            yield pa.RecordBatch.from_arrays([batch.column(n) for n in keep] + [pa.array(values, mask=~both)],
                                             names=schema.names)

    return pairs.mapInArrow(compare, schema)


def caption_clusters(signed: DataFrame, config: JobConfig) -> DataFrame:
    """``row_id, caption_group`` for every member with a caption (see the module docstring, step 2)."""
    from dedup_spark.group import connected_components

    settings = config.captions
    bands, rows = minhash.band_layout(settings.num_perm, settings.same_caption)
    band_schema = T.StructType([T.StructField("row_id", T.LongType(), False),
                                T.StructField("group_id", T.LongType(), False),
                                T.StructField("band", T.IntegerType(), False),
                                T.StructField("band_key", T.LongType(), False)])

    def explode_bands(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            keys = minhash.band_keys(binary_matrix(batch.column("signature"), settings.num_perm, "uint32"), bands, rows)
            count = batch.num_rows
            yield pa.RecordBatch.from_arrays(
                [pa.array(np.repeat(batch.column("row_id").to_numpy(), bands)),
                 pa.array(np.repeat(batch.column("group_id").to_numpy(), bands)),
                 pa.array(np.tile(np.arange(bands, dtype=np.int32), count)), pa.array(keys.reshape(-1))],
                names=band_schema.names)

    with_caption = signed.where(F.col("signature").isNotNull())
    banded = with_caption.select("row_id", "group_id", "signature").mapInArrow(explode_bands, band_schema)
    smallest = banded.groupBy("group_id", "band", "band_key").agg(F.min("row_id").alias("representative"))
    candidates = (banded.join(smallest, ["group_id", "band", "band_key"])
                  .where(F.col("row_id") != F.col("representative"))
                  .select("row_id", "representative").distinct())
    signatures = with_caption.select("row_id", "signature")
    paired = (candidates.join(signatures, "row_id")
              .join(signatures.select(F.col("row_id").alias("representative"),
                                      F.col("signature").alias("representative_signature")), "representative"))
    verified = _similarity_column(paired, "signature", "representative_signature", "caption_similarity",
                                  settings.num_perm).where(F.col("caption_similarity") >= settings.same_caption)
    clustered, _ = connected_components(
        verified.select(F.col("row_id").alias("row_id_a"), F.col("representative").alias("row_id_b")), config)
    return (with_caption.select("row_id").join(clustered, "row_id", "left")
            .select("row_id", F.coalesce("group_id", "row_id").alias("caption_group")))


def annotate(duplicates: DataFrame, signed: DataFrame, metadata: DataFrame | None, config: JobConfig) -> CaptionResult:
    """``duplicates`` (with caption_similarity already filled in by ``group.duplicates_table``)
    with caption_group filled in and the ``merge`` or ``keep_distinct`` policy applied, and, for
    ``merge``, the kept rows' ``captions`` lists.

    ``signed``: ``signed_members``' output, best read back from a stored table: signatures are
    the costly part, and clustering and merging both read them.
    """
    from dedup_spark.group import choose_kept

    settings = config.captions
    if settings.policy == "ignore":
        return CaptionResult(_ordered(duplicates), None)
    base = duplicates.drop("caption_group")
    clusters = caption_clusters(signed, config)
    annotated = base.join(clusters, "row_id", "left")
    if settings.policy == "keep_distinct":
        cluster_members = clusters.select("row_id", F.col("caption_group").alias("group_id"))
        kept_per_cluster = choose_kept(cluster_members, metadata, config).select(
            F.col("kept_row_id").alias("row_id"), F.lit(True).alias("kept_for_caption"))
        annotated = (annotated.join(kept_per_cluster, "row_id", "left")
                     .withColumn("is_kept", F.col("is_kept") | F.coalesce("kept_for_caption", F.lit(False)))
                     .drop("kept_for_caption"))
        return CaptionResult(_ordered(annotated), None)

    # merge: one caption per cluster, the kept row's own caption first, then the largest clusters.
    members = signed.select("row_id", "group_id", "is_kept", "caption").join(clusters, "row_id")
    kept_clusters = members.where("is_kept").select("group_id", F.col("caption_group").alias("kept_group"),
                                                    F.col("caption").alias("kept_caption"))
    sized = (members.groupBy("group_id", "caption_group")
             .agg(F.count("*").alias("cluster_rows"), F.min_by("caption", "row_id").alias("caption"))
             .join(kept_clusters, "group_id", "left")
             .withColumn("own", F.col("caption_group") == F.coalesce("kept_group", F.lit(-1)))
             .withColumn("caption", F.when(F.col("own"), F.col("kept_caption")).otherwise(F.col("caption"))))
    ranked = sized.withColumn("rank", F.row_number().over(Window.partitionBy("group_id").orderBy(
        F.desc("own"), F.desc("cluster_rows"), "caption_group"))).where(F.col("rank") <= settings.max_merged)
    lists = ranked.groupBy("group_id").agg(
        F.transform(F.array_sort(F.collect_list(F.struct("rank", "caption"))), lambda item: item["caption"])
        .alias("captions"))
    kept_rows = duplicates.where("is_kept").select("group_id", "row_id")
    merged = kept_rows.join(lists, "group_id").select("row_id", "captions")
    return CaptionResult(_ordered(annotated), merged)


def _ordered(annotated: DataFrame) -> DataFrame:
    from dedup_spark.group import DUPLICATES_SCHEMA

    return annotated.select(*[F.col(f.name).cast(f.dataType) for f in DUPLICATES_SCHEMA.fields])


def summary(duplicates: DataFrame, column: str, merged_rows: int | None, config: JobConfig) -> dict:
    """report.json's ``captions`` section, aggregated from the written duplicates/ table."""
    settings = config.captions
    bands, rows = minhash.band_layout(settings.num_perm, settings.same_caption)
    totals = duplicates.agg(
        F.count("caption_similarity").alias("members_with_similarity"),
        F.avg("caption_similarity").alias("mean_similarity"),
        F.countDistinct("group_id").alias("groups"),
        F.sum(F.col("is_kept").cast("long")).alias("kept"),
        F.countDistinct("caption_group").alias("clusters")).first()
    result = {"policy": settings.policy, "column": column, "shingles": f"{settings.shingles}, n={settings.shingle_size}",
              "num_perm": settings.num_perm, "members_with_similarity": int(totals["members_with_similarity"]),
              "mean_caption_similarity_to_kept": None if totals["mean_similarity"] is None
              else round(float(totals["mean_similarity"]), 4)}
    if settings.policy != "ignore":
        several = (duplicates.where(F.col("caption_group").isNotNull()).groupBy("group_id")
                   .agg(F.countDistinct("caption_group").alias("clusters")).where("clusters > 1").count())
        result.update({"same_caption": settings.same_caption, "lsh_bands": bands, "lsh_rows_per_band": rows,
                       "caption_clusters": int(totals["clusters"]), "groups_with_several_captions": several,
                       "rows_kept_for_their_caption": int((totals["kept"] or 0) - totals["groups"])})
    if merged_rows is not None:
        result["merged_rows"] = merged_rows
    return result

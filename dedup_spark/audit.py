"""Replication audits and decontamination: which training rows does a set of
query embeddings (a model's generated images, an evaluation set) nearly copy?

The queries (at most ``audit.max_queries``) are collected to the driver,
shipped to every task and compared exactly with every training row in one scan
(``search.scan_probes``: the same float32 + float64 exact kernel as the dedup
search), so every match >= threshold is found, with no bucketing error.

The training set is a raw dataset, or the output of a dedup run: then its
input (from ``model/manifest.json`` and ``model/config.yaml``) is searched and
each matched row's duplicate group size comes from its ``duplicates/``, which
is what memorisation studies compare (replicated images are those duplicated
most). With ``audit.exclude`` the training set minus every matched row is
written to ``decontaminated/``, with the dedup job's accounting.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import yaml
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dedup_spark import report, search, storage, tables, write
from dedup_spark.config import ConfigError, JobConfig
from dedup_spark.publish import SUCCESS, Claim, check_locations, publish
from dedup_spark.read import InputError, Manifest, build_manifest, read_metadata, read_rows
from dedup_spark.tables import binary_matrix

log = logging.getLogger("dedup_spark")
_SHOWN = ("key", "caption", "url")
# What an audit publishes under its output, at the top level.
ENTRIES = ("matches", "decontaminated", "audit_report.json")


def _training_side(config: JobConfig) -> tuple[Manifest, JobConfig, bool]:
    """The training manifest, the settings to read it, and whether it is a dedup run's input."""
    train = config.input.uri.rstrip("/")
    marker = storage.join(train, "model", "manifest.json")
    if storage.exists(storage.join(train, SUCCESS)) and storage.exists(marker):
        manifest = Manifest.from_dict(storage.read_json(marker))
        recorded = yaml.safe_load(storage.read_bytes(storage.join(train, "model", "config.yaml")))
        train_config = config.replace({f"input.{key}": value for key, value in recorded["input"].items()})
        return manifest, train_config, True
    return build_manifest(config), config, False


def run_audit(config: JobConfig, spark: SparkSession | None = None) -> dict[str, Any]:
    """Run the audit; return its report (also written to audit_report.json)."""
    started = time.perf_counter()
    if not config.audit.queries_uri or not config.input.uri or not config.output.uri:
        raise ConfigError("--queries, --train and --output are required")
    executor_env = storage.configure_s3(config.storage.s3_endpoint, config.storage.s3_region, config.storage.s3_attempts)
    # Every input is checked before Spark starts, so a bad one is the only line the command prints.
    manifest, train_config, dedup_run = _training_side(config)
    query_config = config.replace({"input.uri": config.audit.queries_uri, "input.format": config.audit.queries_format,
                                   "input.id_column": None, "input.dim": None})
    query_manifest = build_manifest(query_config)
    if query_manifest.dim != manifest.dim:
        raise InputError(f"the queries under {config.audit.queries_uri} are {query_manifest.dim}-d and the training rows "
                         f"{manifest.dim}-d: embed the queries with the training set's model")
    if query_manifest.rows > config.audit.max_queries:
        raise InputError(f"{query_manifest.rows} queries > audit.max_queries {config.audit.max_queries}; split them")
    check_locations([config.input.uri, manifest.input_uri, config.audit.queries_uri], config.output.uri,
                    config.work_uri, config.output.overwrite, ENTRIES)
    locations = [config.output.uri] + ([] if storage.is_within(config.work_uri, config.output.uri) else [config.work_uri])
    with Claim(locations, config.run.claim_timeout, config.run.take_over) as claim:
        from dedup_spark.session import get_session

        spark = spark or get_session(config, executor_env)
        return _audit(config, spark, claim, started, (manifest, train_config, dedup_run), (query_manifest, query_config))


def _audit(config: JobConfig, spark: SparkSession, claim: Claim, started: float,
           training: tuple[Manifest, JobConfig, bool], querying: tuple[Manifest, JobConfig]) -> dict[str, Any]:
    staged = storage.join(config.work_uri, "publish")
    storage.delete_tree(staged)
    threshold = config.search.threshold
    manifest, train_config, dedup_run = training
    query_manifest, query_config = querying
    queries = read_rows(spark, query_manifest, query_config).where(F.col("reject_reason").isNull()).toArrow()
    query_ids = queries.column("row_id").to_numpy()
    query_matrix = binary_matrix(queries.column("embedding"), manifest.dim).copy()
    log.info("audit: %d valid queries of %d against %d training rows (%s)", len(query_ids), query_manifest.rows,
             manifest.rows, "a dedup run's input" if dedup_run else "a raw dataset")

    train_rows = read_rows(spark, manifest, train_config)
    valid = train_rows.where(F.col("reject_reason").isNull())
    if dedup_run:
        sizes = tables.read_table(spark, storage.join(config.input.uri, "duplicates"), ["row_id", "group_size"])
    else:
        sizes = spark.createDataFrame([], "row_id long, group_size long")
    matches = (search.scan_probes(valid, query_ids, query_matrix, manifest.dim, threshold)
               .withColumnRenamed("probe_id", "query_id")
               .join(sizes, "row_id", "left").withColumn("group_size", F.coalesce("group_size", F.lit(1)).cast("long")))
    metadata = read_metadata(spark, manifest, train_config, list(_SHOWN))
    if metadata is not None:
        shown = [name for name in _SHOWN if name in metadata.columns]
        matches = matches.join(metadata.select("row_id", *shown), "row_id", "left")
    matches_uri = storage.join(staged, "matches")
    info = tables.write_table(matches.select("query_id", "row_id", "similarity", "group_size",
                                             *[c for c in matches.columns if c in _SHOWN]), matches_uri)
    written = tables.read_table(spark, matches_uri)
    totals = written.agg(F.countDistinct("query_id").alias("queries"), F.countDistinct("row_id").alias("rows")).first()
    top = [row.asDict() for row in written.orderBy(F.desc("similarity"), "query_id", "row_id")
           .limit(config.audit.top_matches).collect()]
    matched_sizes = written.select("row_id", "group_size").distinct().groupBy("group_size").count().collect()
    fraction = min(1.0, 1.5 * config.audit.baseline_rows / max(1, manifest.rows))
    baseline = (valid.select("row_id").sample(fraction=fraction, seed=config.bucketing.seed)
                .join(sizes, "row_id", "left").withColumn("group_size", F.coalesce("group_size", F.lit(1)))
                .groupBy("group_size").count().collect())
    result: dict[str, Any] = {
        "threshold": threshold, "queries": {"uri": config.audit.queries_uri, "rows": query_manifest.rows,
                                            "valid": int(len(query_ids))},
        "train": {"uri": config.input.uri, "rows": manifest.rows, "dedup_run": dedup_run,
                  "input_uri": manifest.input_uri},
        "matches": info.rows, "queries_with_match": int(totals["queries"]),
        "fraction_of_queries_matched": round(int(totals["queries"]) / max(1, len(query_ids)), 6),
        "matched_training_rows": int(totals["rows"]),
        "group_sizes": {"matched_rows": _distribution(matched_sizes), "random_training_rows": _distribution(baseline)},
        "top_matches": [{key: (round(value, 5) if isinstance(value, float) else value) for key, value in row.items()}
                        for row in top],
    }
    if config.audit.exclude:
        result["decontamination"] = _exclude(spark, manifest, train_rows, written, staged, config)
    result["seconds"] = round(time.perf_counter() - started, 3)
    storage.write_json(storage.join(staged, "audit_report.json"), result)
    publish(config.output.uri, staged, claim.run_id, claim, keep_staged=config.run.keep_work)
    if not config.run.keep_work:
        storage.delete_tree(config.work_uri)
    log.info("audit done: %d of %d queries match %d training rows; outputs under %s", result["queries_with_match"],
             len(query_ids), result["matched_training_rows"], config.output.uri)
    return result


def _distribution(rows: list) -> dict[str, Any]:
    """Rows by group size, with mean and median: counts are small (one entry per distinct size)."""
    pairs = sorted((int(r["group_size"]), int(r["count"])) for r in rows)
    total = sum(count for _, count in pairs)
    if not total:
        return {"rows": 0}
    sizes = np.repeat([s for s, _ in pairs], [c for _, c in pairs])
    return {"rows": total, "mean": round(float(sizes.mean()), 4), "median": float(np.median(sizes)),
            "by_size": [[s, c] for s, c in pairs]}


def _exclude(spark: SparkSession, manifest: Manifest, train_rows: DataFrame, matches: DataFrame, staged: str,
             config: JobConfig) -> dict[str, Any]:
    """The training set minus every matched row (and the rejected ones), with the accounting check."""
    positions = train_rows.select("row_id", "shard_id", "shard_row", "reject_reason")
    matched = matches.select("row_id").distinct()
    excluded = positions.join(matched, "row_id").where(F.col("reject_reason").isNull())
    rejected = positions.where(F.col("reject_reason").isNotNull())
    counts = {r["kind"]: r["count"] for r in excluded.select(F.lit("excluded").alias("kind"))
              .unionByName(rejected.select(F.lit("rejected").alias("kind"))).groupBy("kind").count().collect()}
    drops = excluded.select("shard_id", "shard_row").unionByName(rejected.select("shard_id", "shard_row"))
    dedup_uri = storage.join(staged, "decontaminated")
    write.write_dedup(spark, manifest, drops, dedup_uri, storage.join(config.work_uri, "scratch"))
    written = write.count_written(manifest, dedup_uri)
    excluded_rows, rejected_rows = int(counts.get("excluded", 0)), int(counts.get("rejected", 0))
    kept = manifest.rows - excluded_rows - rejected_rows
    return report.accounting(manifest.rows, kept, excluded_rows, rejected_rows, written)

"""The job, stage by stage: read -> train -> assign -> search -> group -> write -> report.

Stage results live under the run's work prefix (``run.work_dir``, default
``<output>/_work``); the published outputs are staged under ``<work>/publish``
and moved to the output only when the whole run has succeeded, after which
``_SUCCESS`` (listing every published file) is written last.

Only small things reach the driver: the manifest, a bounded training sample,
per-bucket and per-reason counts, per-shard write summaries.
"""

from __future__ import annotations

import io
import logging
import math
import time
from typing import Any

import numpy as np
import yaml
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from dedup_spark import bucket, group, report, search, storage, tables, write
from dedup_spark.config import ConfigError, JobConfig
from dedup_spark.read import build_manifest, read_metadata, read_rows

log = logging.getLogger("dedup_spark")

SUCCESS = "_SUCCESS"


class OutputError(ValueError):
    """The output location cannot be used as asked."""


def check_locations(config: JobConfig) -> None:
    if not config.input.uri or not config.output.uri:
        raise ConfigError("both --input and --output are required")
    if storage.is_within(config.output.uri, config.input.uri):
        raise OutputError(f"output {config.output.uri} is the input or inside it; choose another location")
    if storage.is_within(config.input.uri, config.output.uri):
        raise OutputError(f"input {config.input.uri} is inside the output {config.output.uri}; choose another location")
    if storage.exists(storage.join(config.output.uri, SUCCESS)):
        if not config.output.overwrite:
            raise OutputError(f"output {config.output.uri} already holds a published result; pass --overwrite to replace it")


def publish(config: JobConfig, staged_uri: str) -> list[str]:
    """Move staged files into the output, then write _SUCCESS listing them."""
    output = config.output.uri
    if config.output.overwrite:
        for entry in storage.list_files(output, recursive=False) + _top_dirs(output):
            if not storage.is_within(entry, config.work_uri):
                storage.delete_tree(entry)
    filesystem, _ = storage.resolve(output)
    published = []
    for uri in storage.list_files(staged_uri):
        relative = uri[len(staged_uri.rstrip("/")) + 1:]
        target = storage.join(output, relative)
        _, source_path = storage.resolve(uri)
        _, target_path = storage.resolve(target)
        filesystem.create_dir(target_path.rsplit("/", 1)[0], recursive=True)
        filesystem.move(source_path, target_path)
        published.append(relative)
    storage.write_json(storage.join(output, SUCCESS), {"files": sorted(published)})
    return published


def _top_dirs(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    filesystem, path = storage.resolve(uri)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    return [storage.join(uri, info.base_name) for info in filesystem.get_file_info(selector)
            if info.type == pafs.FileType.Directory]


def run(config: JobConfig, spark: SparkSession | None = None) -> dict[str, Any]:
    """Run the whole job; return the report (also written to report.json)."""
    check_locations(config)
    from dedup_spark.session import get_session

    spark = spark or get_session(config)
    started = time.perf_counter()
    timer = report.StageTimer()
    work = config.work_uri
    staged = storage.join(work, "publish")
    storage.delete_tree(staged)
    threshold = config.search.threshold
    all_pairs = config.output.pairs == "all"

    with timer.stage("read") as record:
        manifest = build_manifest(config)
        dim = manifest.dim
        read_info = tables.write_table(read_rows(spark, manifest, config), storage.join(work, "read"))
        rows = tables.read_table(spark, read_info.uri)
        reasons = {r["reject_reason"]: r["count"] for r in rows.where(F.col("reject_reason").isNotNull())
                   .groupBy("reject_reason").count().collect()}
        rejected_rows = sum(reasons.values())
        tables.write_table(rows.where(F.col("reject_reason").isNotNull())
                           .select("row_id", "shard_id", "shard_row", "reject_reason"),
                           storage.join(staged, "rejected"))
        valid = rows.where(F.col("reject_reason").isNull()).select("row_id", "embedding")
        valid_rows = read_info.rows - rejected_rows
        if read_info.rows != manifest.rows:
            raise report.AccountingError(f"read {read_info.rows} rows but the manifest lists {manifest.rows}")
        record.update(rows=read_info.rows, note=f"{len(manifest.shards)} shards, {manifest.format}, d={dim}, "
                                                f"{rejected_rows} rejected")
    if config.input.id_column:
        duplicated_ids = rows.groupBy("row_id").count().where(F.col("count") > 1).where(F.col("row_id").isNotNull())
        clash = duplicated_ids.limit(5).collect()
        if clash:
            raise ConfigError(f"id column {config.input.id_column!r} is not unique, e.g. {[r['row_id'] for r in clash]}")

    with timer.stage("train") as record:
        centroids, train_stats = bucket.train(spark, valid, valid_rows, dim, config) if valid_rows else (
            np.zeros((1, dim), np.float32), {"k": 1, "train_rows": 0})
        buffer = io.BytesIO()
        np.save(buffer, centroids)
        centroids_uri = storage.join(staged, "model", "centroids.npy")
        storage.write_bytes(centroids_uri, buffer.getvalue())
        storage.write_bytes(storage.join(staged, "model", "config.yaml"),
                            yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
        storage.write_json(storage.join(staged, "model", "manifest.json"), manifest.to_dict())
        k = centroids.shape[0]
        m = min(config.bucketing.m, k)
        record.update(rows=train_stats["train_rows"], note=f"K={k}, m={m}")

    with timer.stage("assign") as record:
        assigned_info = tables.write_table(bucket.assign(valid, centroids_uri, dim, m), storage.join(work, "assign"))
        assigned = tables.read_table(spark, assigned_info.uri)
        bucket_sizes = {r["bucket_id"]: r["count"] for r in assigned.groupBy("bucket_id").count().collect()}
        record.update(rows=assigned_info.rows, note=f"{len(bucket_sizes)} non-empty buckets")

    with timer.stage("search") as record:
        cap = bucket.max_task_rows(spark, dim, config)
        plan = bucket.plan_search(bucket_sizes, cap)
        partitions = max(1, min(plan.tasks, max(spark.sparkContext.defaultParallelism * 4,
                                                math.ceil(assigned_info.rows / 20000))))
        routed = bucket.route(assigned, plan, config.bucketing.seed)
        edges_df = search.search(routed, dim, threshold, config.search.query_block_rows, all_pairs, partitions)
        edges_info = tables.write_table(edges_df, storage.join(work, "edges"))
        edges = tables.read_table(spark, edges_info.uri)
        record.update(rows=edges_info.rows, note=f"{plan.tasks} tasks, {plan.split_buckets} split buckets, cap {cap}")

    with timer.stage("group") as record:
        spanning = edges.where("spanning").select("row_id_a", "row_id_b")
        members, cc_stats = group.connected_components(spanning, config)
        metadata = read_metadata(spark, manifest, config) if config.keep.expression else None
        kept = group.choose_kept(members, metadata, config)
        duplicates_info = tables.write_table(group.duplicates_table(members, kept, valid, dim),
                                             storage.join(staged, "duplicates"))
        duplicates = tables.read_table(spark, duplicates_info.uri)
        totals = duplicates.agg(F.countDistinct("group_id").alias("groups"),
                                F.sum(F.when(~F.col("is_kept"), 1).otherwise(0)).alias("removed")).first()
        groups, removed_rows = int(totals["groups"]), int(totals["removed"] or 0)
        pairs_rows = None
        if config.output.pairs != "none":
            chosen = edges if all_pairs else edges.where("spanning")
            pairs_df = (chosen.groupBy("row_id_a", "row_id_b").agg(F.max("similarity").alias("similarity")))
            pairs_rows = tables.write_table(pairs_df, storage.join(staged, "pairs")).rows
        record.update(rows=duplicates_info.rows, note=f"{groups} groups, {cc_stats['rounds']} rounds")

    with timer.stage("write") as record:
        removed_positions = (duplicates.where(~F.col("is_kept")).select("row_id")
                             .join(rows.select("row_id", "shard_id", "shard_row"), "row_id")
                             .select("shard_id", "shard_row"))
        drops = removed_positions.unionByName(
            rows.where(F.col("reject_reason").isNotNull()).select("shard_id", "shard_row"))
        summaries = write.write_dedup(spark, manifest, drops, storage.join(staged, "dedup"))
        written_rows = sum(s["rows_written"] for s in summaries)
        record.update(rows=written_rows, note=f"{len(summaries)} shards")

    kept_rows = valid_rows - removed_rows
    result: dict[str, Any] = {
        "input": {"uri": manifest.input_uri, "format": manifest.format, "dim": dim, "shards": len(manifest.shards)},
        "output": {"uri": config.output.uri, "pairs": config.output.pairs},
        "threshold": threshold,
        "accounting": report.accounting(manifest.rows, kept_rows, removed_rows, rejected_rows, written_rows),
        "rejected_by_reason": reasons,
        "bucketing": {"method": config.bucketing.method, "k": k, "m": m, "train_rows": train_stats["train_rows"],
                      "assigned_rows": assigned_info.rows, "bucket_sizes": report.size_stats(list(bucket_sizes.values())),
                      "max_task_rows": cap, "search_tasks": plan.tasks, "split_buckets": plan.split_buckets,
                      "largest_task_rows": plan.largest_task_rows},
        "search": {"edges_emitted": edges_info.rows, "pairs_written": pairs_rows},
        "groups": {"count": groups, "rows_in_groups": duplicates_info.rows, "cc_rounds": cc_stats["rounds"]},
        "timings_seconds": {**timer.seconds},
        "rows_per_stage": timer.rows,
    }
    with timer.stage("publish"):
        storage.write_json(storage.join(staged, "report.json"), result)
        publish(config, staged)
        storage.delete_tree(work)
    result["timings_seconds"] = {**timer.seconds, "total": round(time.perf_counter() - started, 3)}
    storage.write_json(storage.join(config.output.uri, "report.json"), result)
    log.info("done: %d rows in, %d groups, %d removed, %d rejected, %.1f s; outputs under %s",
             manifest.rows, groups, removed_rows, rejected_rows, result["timings_seconds"]["total"], config.output.uri)
    return result

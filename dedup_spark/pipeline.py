"""The job, stage by stage: read -> train -> assign -> search -> group -> estimate -> write -> report.

Stage results live under the run's work prefix (``run.work_dir``, default
``<output>/_work``). Each completed stage writes ``stages/<name>.json`` with a
key: the hash of the previous stage's key, the stage's own settings and (for
read) the input files' identity. A rerun with the same arguments reuses every
stage whose key matches and recomputes from the first that does not.

Published outputs are staged under ``<work>/publish`` and moved into the output
only when every stage has succeeded; ``_SUCCESS`` (listing every published
file) is written last, so a reader that waits for it never sees a partial
result.

Only small things reach the driver: the manifest, a bounded training sample,
per-bucket and per-reason counts, per-shard write summaries.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import yaml
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from dedup_spark import (
    blas,
    bucket,
    captions,
    estimate,
    group,
    html,
    kernels,
    read,
    report,
    search,
    session,
    storage,
    tables,
    write,
)
from dedup_spark.config import ConfigError, JobConfig
from dedup_spark.read import (
    InputError,
    build_manifest,
    map_valid_rows_beside,
    metadata_schema,
    read_metadata,
    valid_rows,
    write_rows,
    write_valid_tables,
)

log = logging.getLogger("dedup_spark")

SUCCESS = "_SUCCESS"
# Bump when a stage's output format or meaning changes, so old work is not reused.
STAGE_FORMAT = 4


class OutputError(ValueError):
    """The output location cannot be used as asked."""


class InjectedFault(RuntimeError):
    """Raised by the test-only run.fail_after_stage switch."""


def check_locations(config: JobConfig) -> None:
    if not config.input.uri or not config.output.uri:
        raise ConfigError("both --input and --output are required")
    if storage.is_within(config.output.uri, config.input.uri):
        raise OutputError(f"output {config.output.uri} is the input or inside it; choose another location")
    if storage.is_within(config.input.uri, config.output.uri):
        raise OutputError(f"input {config.input.uri} is inside the output {config.output.uri}; choose another location")
    if storage.exists(storage.join(config.output.uri, SUCCESS)) and not config.output.overwrite:
        raise OutputError(f"output {config.output.uri} already holds a published result; pass --overwrite to replace it")


class StageRunner:
    """Runs stages in order, reusing those whose recorded key matches."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.timer = report.StageTimer()
        self.previous_key = ""
        self.reused: list[str] = []

    def run(self, name: str, settings: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        payload = json.dumps({"stage": name, "format": STAGE_FORMAT, "previous": self.previous_key,
                              "settings": settings}, sort_keys=True, default=str)
        key = hashlib.sha256(payload.encode()).hexdigest()
        marker = storage.join(self.config.work_uri, "stages", f"{name}.json")
        recorded = storage.read_json(marker) if storage.exists(marker) else None
        if recorded and recorded.get("key") == key:
            self.reused.append(name)
            self.timer.seconds[name] = 0.0
            log.info("stage %s: reused from an earlier run (key %s)", name, key[:12])
            result = recorded["result"]
        else:
            with self.timer.stage(name) as record:
                result = compute()
                record.update(rows=result.get("rows", 0), note=result.get("note", ""))
            storage.write_json(marker, {"key": key, "result": result})
        self.previous_key = key
        if self.config.run.fail_after_stage == name:
            raise InjectedFault(f"run.fail_after_stage={name}: stopping after stage {name} as asked")
        return result


def run(config: JobConfig, spark: SparkSession | None = None) -> dict[str, Any]:
    """Run the whole job; return the report (also written to report.json)."""
    executor_env = storage.configure_s3(config.storage.s3_endpoint, config.storage.s3_region, config.storage.s3_attempts)
    check_locations(config)
    spark = spark or session.get_session(config, executor_env)
    started = time.perf_counter()
    stages = StageRunner(config)
    work = config.work_uri
    staged = storage.join(work, "publish")
    threshold = config.search.threshold
    all_pairs = config.output.pairs == "all"
    manifest = build_manifest(config)
    dim = manifest.dim
    input_columns = metadata_schema(manifest, config)
    # Checked before any work: a caption policy that cannot apply fails here.
    caption_name = captions.caption_column([] if input_columns is None else input_columns.names, config)
    # After the input's checks, so a bad input's error is all the command line prints.
    kernels_used = blas_report(spark)
    rows_uri = storage.join(work, "read")
    # Published, and read back by the write stage for the rejected rows' positions.
    rejected_uri = storage.join(staged, "rejected")

    def read_stage() -> dict[str, Any]:
        # The training sample and the recall probes are drawn while the rows are written, at
        # fractions enough for any accepted count the job goes on with (>= 1 - max_rejected_fraction
        # of the rows), so neither needs a scan of its own.
        least_valid = max(1, math.floor((1.0 - config.input.max_rejected_fraction) * manifest.rows))
        draws = ((bucket.training_fraction(manifest.rows, config, least_valid), config.bucketing.seed),
                 (estimate.probe_fraction(config.estimate.sample_rows, least_valid), config.bucketing.seed + 1))
        sample = read.StoredSample(storage.join(work, "sample"), draws)
        # Two-level k-means trains its cells in tasks on a larger draw, kept apart from the driver's.
        cell_draw = bucket.cell_fraction(manifest.rows, config, least_valid)
        cell_sample = read.StoredSample(storage.join(work, "cell_sample"), ((cell_draw, config.bucketing.seed + 3),))
        samples = [sample, cell_sample] if cell_draw > 0 else [sample]
        info = write_rows(spark, manifest, config, rows_uri, samples)  # tasks may fail: see run.fault_task_fraction
        if info.rows != manifest.rows:
            raise report.AccountingError(f"read {info.rows} rows but the manifest lists {manifest.rows}")
        rejected_cols = tables.read_table(spark, rows_uri, ["row_id", "shard_id", "shard_row", "reject_reason"])
        shard_names = spark.createDataFrame([(s.shard_id, s.relative[0]) for s in manifest.shards], "shard_id int, shard string")
        tables.write_table(rejected_cols.where(F.col("reject_reason").isNotNull())
                           .join(F.broadcast(shard_names), "shard_id")
                           .select("row_id", "shard_id", "shard", "shard_row", "reject_reason"), rejected_uri)
        # Counted from the rejected table just written: it holds only the rejected rows.
        by_reason = tables.read_table(spark, rejected_uri, ["reject_reason"]).groupBy("reject_reason").count()
        reasons = {r["reject_reason"]: r["count"] for r in by_reason.collect()}
        if config.input.id_column:
            ids = tables.read_table(spark, rows_uri, ["row_id"]).where(F.col("row_id").isNotNull())
            clash = ids.groupBy("row_id").count().where(F.col("count") > 1).limit(5).collect()
            if clash:
                raise ConfigError(f"id column {config.input.id_column!r} is not unique, e.g. {[r['row_id'] for r in clash]}")
        rejected = sum(reasons.values())
        return {"rows": info.rows, "valid_rows": info.rows - rejected, "rejected_rows": rejected, "reasons": reasons,
                "sample": sample.to_dict(), "cell_sample": cell_sample.to_dict() if cell_draw > 0 else None,
                "note": f"{len(manifest.shards)} shards, {manifest.format}, d={dim}, {rejected} rejected"}

    read_result = stages.run("read", {"manifest": manifest.to_dict(), "input": config.to_dict()["input"]}, read_stage)
    limit = config.input.max_rejected_fraction
    if read_result["rejected_rows"] > limit * manifest.rows:
        raise InputError(f"{read_result['rejected_rows']} of {manifest.rows} input rows were rejected "
                         f"({read_result['rejected_rows'] / manifest.rows:.1%} > input.max_rejected_fraction {limit:g}): "
                         f"{read_result['reasons']}; see {rejected_uri}")
    valid_count = read_result["valid_rows"]
    stored_sample = read.StoredSample.from_dict(read_result["sample"])
    stored_cells = read.StoredSample.from_dict(read_result["cell_sample"]) if read_result.get("cell_sample") else None
    model_uri = storage.join(staged, "model")

    def train_stage() -> dict[str, Any]:
        model = bucket.train(spark, rows_uri, valid_count, dim, config, model_uri, stored_sample, stored_cells,
                             threshold)
        storage.write_bytes(storage.join(model_uri, "config.yaml"),
                            yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
        storage.write_json(storage.join(model_uri, "manifest.json"), manifest.to_dict())
        return {"rows": model.train_rows, "model": model.to_dict(),
                "note": f"{model.method} ({model.training}), K={model.buckets_per_round} x {model.rounds} round(s), "
                        f"m={model.m}, {model.assign} assignment"}

    # The threshold scales which near-copy centroids are merged.
    train_result = stages.run("train", {"bucketing": config.to_dict()["bucketing"],
                                        "threshold": threshold if config.bucketing.merge_centroids is not None else None},
                              train_stage)
    model = bucket.BucketModel(**train_result["model"])
    assigned_uri = storage.join(work, "assign")

    probe_pairs_uri = storage.join(work, "probe_pairs")
    probing = config.estimate.sample_rows > 0 and valid_count > 0

    def assign_stage() -> dict[str, Any]:
        outputs = {"assigned": (bucket.assigner(model_uri, dim, model.model_id, threshold), bucket.ASSIGNED_SCHEMA,
                                assigned_uri)}
        probe_rows = 0
        if probing:
            # The recall probes ride on this scan of every row (see the estimate stage).
            probe_ids, probe_matrix = estimate.probes(spark, rows_uri, config.estimate.sample_rows, valid_count, dim,
                                                      config.bucketing.seed, stored_sample)
            probe_rows = len(probe_ids)
            outputs["probe_pairs"] = (estimate.probe_transform(probe_ids, probe_matrix, dim, threshold),
                                      search.PROBE_PAIRS_SCHEMA, probe_pairs_uri)
        info = write_valid_tables(spark, rows_uri, outputs)["assigned"]
        if info.rows != valid_count:
            raise report.AccountingError(f"assign wrote {info.rows} rows for {valid_count} valid rows")
        sizes, shared = bucket.bucket_counts(tables.read_table(spark, assigned_uri), model.width,
                                             bucket.pair_width(model))
        joins = sum(sizes.values())
        # Every row joins at least its nearest bucket of each round, at most model.width buckets.
        if not valid_count * model.rounds <= joins <= valid_count * model.width:
            raise report.AccountingError(f"rows joined {joins} buckets, not between {valid_count} valid rows x "
                                         f"{model.rounds} and x {model.width}: rows would go unsearched")
        storage.write_npy(storage.join(work, "bucket_sizes.npy"), np.array(sorted(sizes.items()), dtype=np.int64).reshape(-1, 2))
        storage.write_npy(storage.join(work, "bucket_pairs.npy"), shared)
        return {"rows": joins, "buckets": len(sizes), "probe_rows": probe_rows,
                "note": f"{len(sizes)} non-empty buckets" + (f", {probe_rows} recall probes" if probing else "")}

    # The threshold scales the k-means margin, so it changes which further buckets rows join, and it
    # is the probes' threshold.
    assign_result = stages.run("assign", {"threshold": threshold if model.margin is not None or probing else None,
                                          "probes": config.estimate.sample_rows if probing else 0}, assign_stage)
    bucket_sizes = {int(b): int(c) for b, c in storage.read_npy(storage.join(work, "bucket_sizes.npy"))}
    # An assign stage reused from before bucket pairs were counted leaves none: no packing.
    pairs_uri = storage.join(work, "bucket_pairs.npy")
    shared_rows = storage.read_npy(pairs_uri) if storage.exists(pairs_uri) else None
    task_memory = bucket.task_memory_bytes(spark)
    cap = bucket.max_task_rows(task_memory, dim, config)
    edges_uri = storage.join(work, "edges")
    thresholds = [threshold, *sorted(set(config.search.thresholds) - {threshold})]

    # Partitions of about 20,000 routed rows (at least 4 a core). Packs of buckets up to
    # max_task_rows, each at most an eighth of a core's share of the search (at 1M rows packs of
    # 40,000-110,000 rows searched as fast as each other, the same pairs as a task per bucket).
    cores = spark.sparkContext.defaultParallelism
    partitions = max(1, max(cores * 4, math.ceil(assign_result["rows"] / 20000)))
    pack_rows = config.search.pack_rows if config.search.pack_rows is not None else cap
    pack_tasks = cores * 8

    def search_stage() -> dict[str, Any]:
        plan = bucket.plan_search(bucket_sizes, cap, shared_rows, pack_rows, pack_tasks,
                                  bucket.pair_width(model) <= 2)
        routed = map_valid_rows_beside(spark, rows_uri, assigned_uri,
                                       bucket.router(plan, model.width, config.bucketing.seed), bucket.ROUTED_SCHEMA)
        edges = search.search(routed, dim, thresholds, config.search.query_block_rows, all_pairs,
                              min(plan.tasks, partitions), task_memory // 2, model.width, plan.task_buckets,
                              config.run.fault_task_fraction)
        info = tables.write_table(edges, edges_uri)
        stats = search.search_stats(tables.read_table(spark, edges_uri), len(thresholds))
        return {"rows": info.rows, "tasks": plan.tasks, "split_buckets": plan.split_buckets,
                "routed_rows": stats.task_rows, "packed_buckets": sum(len(b) for b in plan.task_buckets.values()
                                                                      if len(b) > 1),
                "comparisons": plan.comparisons, "largest_task_rows": plan.largest_task_rows,
                "pair_counts": stats.pair_counts, "histogram": stats.histogram, "forest_edges": stats.forest_edges,
                "kernel_task_seconds": round(stats.kernel_seconds, 3), "comparisons_done": stats.comparisons_done,
                "comparisons_all_pairs": stats.comparisons_all_pairs, "rows_attached": stats.rows_attached,
                "note": f"{stats.pair_counts[0]} pairs, {plan.tasks} tasks, {plan.split_buckets} split buckets, "
                        f"{stats.task_rows} rows shuffled for {assign_result['rows']} bucket joins, "
                        f"cap {cap}, {stats.kernel_seconds:.1f} s in the kernel over all tasks"}

    search_settings = {"thresholds": thresholds, "cap": cap, "task_memory": task_memory, "all_pairs": all_pairs,
                       "pack_rows": pack_rows if shared_rows is not None else 0, "pack_tasks": pack_tasks,
                       "query_block_rows": config.search.query_block_rows, "seed": config.bucketing.seed}
    search_result = stages.run("search", search_settings, search_stage)
    duplicates_uri = storage.join(staged, "duplicates")
    # Connected components size their tasks by the spanning edges alone (under output.pairs: all the
    # edges table also holds every pair).
    forest_edges = search_result["forest_edges"]
    merged_uri = storage.join(work, "merged_captions")

    def group_stage() -> dict[str, Any]:
        # A partition of edges is at most what one local union-find may hold.
        edges = tables.read_table(spark, edges_uri, max_task_rows=config.group.local_edges)
        step = report.StepLog("group")
        members, cc_stats = group.connected_components(search.forest(edges).select("row_id_a", "row_id_b"), config,
                                                       forest_edges[0])
        step.done("connected components")
        metadata = read_metadata(spark, manifest, config) if config.keep.expression else None
        kept = group.choose_kept(members, metadata, config)
        # Readers, not DataFrames: with few members, only the members' rows leave the reading tasks.
        caption_reader = None if caption_name is None else functools.partial(
            read.read_captions, spark, manifest, config, caption_name)
        duplicates = group.duplicates_table(members, kept, functools.partial(valid_rows, spark, rows_uri), dim,
                                            caption_reader, config.captions, cc_stats["members"])
        merged_rows = None
        if caption_name is None or config.captions.policy == "ignore":
            info = tables.write_table(duplicates, duplicates_uri)
            step.done("duplicates/ with similarity to kept" + ("" if caption_name is None else " and caption similarity"))
        else:
            # Signatures are stored once: clustering and merging each read them.
            base_uri, signed_uri = storage.join(work, "duplicates_base"), storage.join(work, "caption_signatures")
            tables.write_table(duplicates, base_uri)
            step.done("duplicates with similarity to kept and caption similarity")
            base = tables.read_table(spark, base_uri)
            tables.write_table(captions.signed_members(base, caption_reader(), config), signed_uri)
            step.done("caption signatures")
            annotated = captions.annotate(base, tables.read_table(spark, signed_uri), metadata, config)
            info = tables.write_table(annotated.duplicates, duplicates_uri)
            if annotated.merged is not None:
                merged_rows = tables.write_table(annotated.merged, merged_uri).rows
            step.done(f"captions ({config.captions.policy})")

        def totals() -> Any:
            return tables.read_table(spark, duplicates_uri, ["group_id", "is_kept"]).agg(
                F.countDistinct("group_id").alias("groups"),
                F.sum(F.when(~F.col("is_kept"), 1).otherwise(0)).alias("removed")).first()

        def pairs_written() -> int | None:
            if all_pairs:
                return tables.write_table(search.found_pairs(edges), storage.join(staged, "pairs")).rows
            if config.output.pairs == "spanning":
                # A spanning edge found by several tasks (soft assignment) is written once.
                spanning = search.forest(edges).groupBy("row_id_a", "row_id_b").agg(F.max("similarity").alias("similarity"))
                return tables.write_table(spanning, storage.join(staged, "pairs")).rows
            return None

        def calibration_levels() -> list[dict[str, Any]]:
            levels = []
            for level, extra in enumerate(thresholds[1:], start=1):
                extra_members, _ = group.connected_components(
                    search.forest(edges, level).select("row_id_a", "row_id_b"), config, forest_edges[level])
                counted = extra_members.agg(F.count("*").alias("rows"), F.countDistinct("group_id").alias("groups")).first()
                levels.append({"threshold": extra, "pairs": search_result["pair_counts"][level],
                               "groups": int(counted["groups"]), "removed_rows": int(counted["rows"] - counted["groups"])})
            return levels

        def views() -> dict[str, Any]:
            return report.dataset_views(tables.read_table(spark, duplicates_uri),
                                        [] if input_columns is None else input_columns.names,
                                        functools.partial(read.metadata_of, spark, manifest, config),
                                        list(bucket_sizes.values()))

        def caption_report() -> dict[str, Any] | None:
            return None if caption_name is None else captions.summary(
                tables.read_table(spark, duplicates_uri), caption_name, merged_rows, config)

        # Independent queries over the tables just written: side by side, their Spark jobs' fixed
        # latencies overlap (1.3 -> 1.0 s at 10k rows) and each fills the cores the others' tails leave.
        done = session.run_concurrently("group", {"totals": totals, "pairs/": pairs_written,
                                                  "calibration": calibration_levels, "report views": views,
                                                  "captions summary": caption_report})
        totals_row = done["totals"]
        groups = int(totals_row["groups"])
        # By embeddings alone, like the other thresholds' rows (keep_distinct may keep more).
        calibration = [{"threshold": threshold, "pairs": search_result["pair_counts"][0], "groups": groups,
                        "removed_rows": info.rows - groups}, *done["calibration"]]
        return {"rows": info.rows, "groups": groups, "removed_rows": int(totals_row["removed"] or 0),
                "cc_rounds": cc_stats["rounds"], "pairs_rows": done["pairs/"], "calibration": calibration,
                "views": done["report views"], "captions": done["captions summary"],
                "note": f"{groups} groups, {cc_stats['rounds']} rounds"}

    group_result = stages.run("group", {"group": config.to_dict()["group"], "keep": config.to_dict()["keep"],
                                        "captions": config.to_dict()["captions"], "pairs": config.output.pairs},
                              group_stage)

    def estimate_stage() -> dict[str, Any]:
        if not probing:
            return {"rows": 0, "skipped": True}
        started_at = time.perf_counter()
        # The probes' true pairs were found by the assign stage's scan; here they meet the groups.
        probe_pairs = tables.read_table(spark, probe_pairs_uri)
        sampled = assign_result["probe_rows"]
        pairs = tables.read_table(spark, storage.join(staged, "pairs")) if all_pairs else None
        result = estimate.estimate_recall(estimate.true_pairs(probe_pairs), sampled,
                                          tables.read_table(spark, duplicates_uri), pairs)
        # The cost: this stage, and the probe comparisons inside assign spread over the cores.
        probe_seconds = estimate.probe_task_seconds(probe_pairs)
        result["probe_task_seconds"] = round(probe_seconds, 3)
        result["seconds"] = round(time.perf_counter() - started_at + probe_seconds / spark.sparkContext.defaultParallelism,
                                  3)
        return {"rows": sampled, **result, "note": f"closure recall {result['closure_recall']} "
                                                    f"(95% CI {result['closure_recall_ci95']})"}

    estimate_result = stages.run("estimate", {"sample_rows": config.estimate.sample_rows}, estimate_stage)

    def write_stage() -> dict[str, Any]:
        duplicates = tables.read_table(spark, duplicates_uri, ["row_id", "is_kept"])
        # Only the position columns are read: the rows table's embeddings are most of its bytes, and
        # a projection cannot reach into the Python tasks that read it.
        positions = tables.read_table(spark, rows_uri, ["row_id", "shard_id", "shard_row"])
        removed = duplicates.where(~F.col("is_kept")).select("row_id").join(positions, "row_id")
        drops = removed.select("shard_id", "shard_row").unionByName(
            tables.read_table(spark, rejected_uri, ["shard_id", "shard_row"]))
        dedup_uri = storage.join(staged, "dedup")
        merged = None
        if (group_result["captions"] or {}).get("merged_rows") is not None:
            merged = tables.read_table(spark, merged_uri).join(positions, "row_id")
        summaries = write.write_dedup(spark, manifest, drops, dedup_uri, storage.join(work, "scratch"),
                                      config.run.fault_task_fraction, config.run.fault_drop_rows, merged)
        reported = sum(s["rows_written"] for s in summaries)
        written = write.count_written(manifest, dedup_uri)
        if written != reported:
            log.error("write tasks reported %d rows but dedup/ holds %d", reported, written)
        return {"rows": written, "shards": len(summaries), "note": f"{len(summaries)} shards"}

    write_result = stages.run("write", {}, write_stage)

    removed_rows = group_result["removed_rows"]
    kept_rows = valid_count - removed_rows
    result: dict[str, Any] = {
        "input": {"uri": manifest.input_uri, "format": manifest.format, "dim": dim, "shards": len(manifest.shards)},
        "output": {"uri": config.output.uri, "pairs": config.output.pairs},
        "threshold": threshold,
        "accounting": report.accounting(manifest.rows + manifest.skipped_rows, kept_rows, removed_rows,
                                        read_result["rejected_rows"], write_result["rows"], manifest.skipped_rows),
        "skipped_shards": manifest.skipped,
        "rejected_by_reason": read_result["reasons"],
        "bucketing": {"method": model.method, "k": model.buckets_per_round, "m": model.m, "rounds": model.rounds,
                      "margin": model.margin,
                      "buckets_per_row": round(assign_result["rows"] / valid_count, 4) if valid_count else 0.0,
                      "train_rows": model.train_rows, "training": model.training,
                      "cell_train_rows": model.cell_train_rows, "merged_centroids": model.merged_centroids,
                      "assign": model.assign,
                      # Also logged at train: set when max_train_rows starved the k-means sample.
                      "training_warning": bucket.starved_training(valid_count, config),
                      "k_source": "config" if config.bucketing.k else "cost model",
                      "assigned_rows": assign_result["rows"],
                      "bucket_sizes": report.size_stats(list(bucket_sizes.values())),
                      "max_task_rows": cap, "search_tasks": search_result["tasks"],
                      "split_buckets": search_result["split_buckets"],
                      "packed_buckets": search_result.get("packed_buckets"),
                      "largest_task_rows": search_result["largest_task_rows"]},
        "search": {"pairs_found": search_result["pair_counts"][0], "edges_emitted": search_result["rows"],
                   "pairs_written": group_result["pairs_rows"], "comparisons": search_result["comparisons"],
                   # Summed over tasks; the rest of the stage is the shuffle that brings the rows.
                   "kernel_task_seconds": search_result.get("kernel_task_seconds"),
                   # Rows the shuffle to search carried: each row once per task it feeds (assigned_rows
                   # counts it once per bucket; a pack of buckets takes it once).
                   "routed_rows": search_result.get("routed_rows"),
                   # Similarities the search tasks computed, against what every pair of their buckets costs;
                   # rows attached to a representative inside dense groups were not compared with each other,
                   # and then pairs_found and similarity_histogram count the pairs among the comparisons made.
                   "comparisons_done": search_result.get("comparisons_done"),
                   "comparisons_all_pairs": search_result.get("comparisons_all_pairs"),
                   "rows_attached": search_result.get("rows_attached"),
                   "pairs_found_is_lower_bound": bool(search_result.get("rows_attached"))},
        "calibration": group_result["calibration"],
        "similarity_histogram": {"edges": [round(float(e), 6) for e in
                                           kernels.histogram_edges(threshold, search.HISTOGRAM_BINS)],
                                 "counts": search_result["histogram"]},
        "groups": {"count": group_result["groups"], "rows_in_groups": group_result["rows"],
                   "cc_rounds": group_result["cc_rounds"]},
        "captions": group_result["captions"],
        "recall_estimate": {key: value for key, value in estimate_result.items() if key not in ("rows", "note")},
        "stages_reused": stages.reused,
        "blas": kernels_used,
        "timings_seconds": dict(stages.timer.seconds),
    }
    result["timings_seconds"]["total"] = round(time.perf_counter() - started, 3)
    if "seconds" in estimate_result:
        result["recall_estimate"]["fraction_of_run"] = round(estimate_result["seconds"] / result["timings_seconds"]["total"], 4)
    result.update(group_result["views"])
    storage.write_json(storage.join(staged, "report.json"), result)
    # Rendered from the JSON as written, so the page shows exactly report.json's numbers.
    storage.write_bytes(storage.join(staged, "report.html"), html.render(json.loads(json.dumps(result))).encode())
    publish(config, staged)
    if not config.run.keep_work:
        storage.delete_tree(work)
    log.info("done: %d rows in, %d groups, %d removed, %d rejected, %.1f s; outputs under %s",
             manifest.rows, result["groups"]["count"], removed_rows, read_result["rejected_rows"],
             result["timings_seconds"]["total"], config.output.uri)
    return result


def blas_report(spark: SparkSession) -> dict[str, Any]:
    """The OpenBLAS cores (``blas.describe``) of the driver and of one executor task, logged: the
    search kernel and the assignment are matrix products, and a library on generic kernels runs
    them several times slower without any other sign, so that is a warning."""
    driver = blas.describe()
    executor = spark.sparkContext.parallelize([0], 1).map(lambda _: blas.describe()).first()
    for where, described in (("driver", driver), ("executor", executor)):
        cores = ", ".join(f"{library} {core}" for library, core in sorted(described["openblas"].items()))
        log.info("BLAS on the %s: OpenBLAS %s (CPU %s, OPENBLAS_CORETYPE %s)", where, cores or "not found",
                 described["cpu"], described["OPENBLAS_CORETYPE"] or "unset")
        for warning in described["warnings"]:
            log.warning("BLAS on the %s: %s", where, warning)
        for advice in described["advice"]:
            log.info("BLAS on the %s: %s", where, advice)
    return {"driver": driver, "executor": executor}


def publish(config: JobConfig, staged_uri: str) -> list[str]:
    """Move the staged files into the output, then write _SUCCESS listing them.

    The list of files is recorded first, so a publish interrupted half-way is
    completed by the rerun (files already moved are found at their target).
    A work prefix that is kept (run.keep_work) has its staged files copied
    instead: its stage records stay true, so a later run that reuses them
    (another output, --overwrite) publishes them whole.
    """
    output = config.output.uri
    plan_uri = storage.join(config.work_uri, "publish_plan.json")
    if storage.exists(plan_uri):
        relatives = storage.read_json(plan_uri)["files"]
    else:
        relatives = [uri[len(staged_uri.rstrip("/")) + 1:] for uri in storage.list_files(staged_uri)]
        storage.write_json(plan_uri, {"files": relatives})
    # An earlier result stops being published before anything of the new one appears.
    storage.delete_tree(storage.join(output, SUCCESS))
    if config.output.overwrite:
        for entry in storage.list_entries(output):
            if not storage.is_within(config.work_uri, entry):
                storage.delete_tree(entry)
    for relative in relatives:
        source, target = storage.join(staged_uri, relative), storage.join(output, relative)
        if storage.exists(source):
            (storage.copy if config.run.keep_work else storage.move)(source, target)
        elif not storage.exists(target):
            raise OutputError(f"cannot publish {relative}: missing from the staging area and the output")
    storage.write_json(storage.join(output, SUCCESS), {"files": sorted(relatives)})
    storage.delete_tree(plan_uri)
    return relatives

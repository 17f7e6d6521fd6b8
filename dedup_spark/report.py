"""Report: the run's counts, bucket statistics, timings and the accounting check
(input rows = kept + removed + rejected), assembled from what the stages returned,
as report.json and its page report.html."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from dedup_spark.config import CAPTION_COLUMNS

if TYPE_CHECKING:
    from dedup_spark.stage import RunContext

log = logging.getLogger("dedup_spark")


class AccountingError(RuntimeError):
    """Rows were lost or double counted: input != kept + removed + rejected."""


class StageTimer:
    """Times stages and logs one line per stage with its rows and seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.rows: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        record: dict[str, Any] = {}
        log.info("stage %s: started", name)
        yield record
        elapsed = time.perf_counter() - started
        self.seconds[name] = round(elapsed, 3)
        if "rows" in record:
            self.rows[name] = int(record["rows"])
        log.info("stage %s: %s rows in %.1f s%s", name, f"{record.get('rows', '-'):,}" if "rows" in record else "-",
                 elapsed, f" ({record['note']})" if record.get("note") else "")


def size_stats(sizes: list[int] | np.ndarray) -> dict[str, float]:
    values = np.asarray(sizes, dtype=np.float64)
    if values.size == 0:
        return {"count": 0}
    return {"count": int(values.size), "min": int(values.min()), "median": float(np.median(values)),
            "mean": round(float(values.mean()), 3), "p99": float(np.percentile(values, 99)), "max": int(values.max())}


def accounting(input_rows: int, kept: int, removed: int, rejected: int, written: int, skipped: int = 0) -> dict[str, Any]:
    """The invariant, checked: every input row is kept, removed, rejected or in a skipped shard,
    and dedup/ holds exactly the kept ones."""
    result = {"input_rows": input_rows, "kept_rows": kept, "removed_rows": removed, "rejected_rows": rejected,
              "skipped_shard_rows": skipped, "written_rows": written,
              "balanced": input_rows == kept + removed + rejected + skipped and written == kept}
    if not result["balanced"]:
        raise AccountingError(f"accounting failed: input {input_rows} != kept {kept} + removed {removed} + "
                              f"rejected {rejected} + in skipped shards {skipped}, or dedup/ holds {written} rows "
                              f"instead of {kept}; nothing was published")
    return result


LARGEST_GROUPS = 50
# Metadata shown for the largest groups, first match wins per role.
_SHOWN_COLUMNS = {"key": ("key", "id", "uid"), "caption": CAPTION_COLUMNS, "url": ("url", "image_url")}


def dataset_views(duplicates, metadata_columns: list[str],
                  metadata_of: Callable[[list[int], list[str]], dict[int, dict]] | None,
                  bucket_sizes: list[int]) -> dict[str, Any]:
    """Small summaries for the report, computed in Spark and collected: the group-size
    distribution, the bucket-size distribution, and the largest groups with the metadata
    of their kept row and of their least similar member.

    ``metadata_columns``: the input's metadata columns; ``metadata_of(row_ids, columns)``: those
    rows' values (``read.metadata_of``), asked once for the hundred rows shown."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    kept = duplicates.where("is_kept")
    # Small results are sorted here: an orderBy would add a sampling job and a range shuffle.
    by_size = sorted(kept.groupBy("group_size").count().collect(), key=lambda row: row["group_size"])
    largest = kept.orderBy(F.desc("group_size"), "group_id").limit(LARGEST_GROUPS).select("group_id", "group_size").collect()
    groups = [{"group_id": int(r["group_id"]), "size": int(r["group_size"])} for r in largest]
    if groups:
        wanted = duplicates.sparkSession.createDataFrame([(g["group_id"],) for g in groups], "group_id long")
        ranked = (duplicates.join(F.broadcast(wanted), "group_id")
                  .withColumn("rank", F.row_number().over(Window.partitionBy("group_id").orderBy(
                      F.desc("is_kept"), "similarity_to_kept", "row_id")))
                  .where("rank <= 2").collect())
        ranked.sort(key=lambda row: (row["group_id"], row["rank"]))
        roles = {}
        if metadata_of is not None:
            for role, names in _SHOWN_COLUMNS.items():
                name = next((n for n in names if n in metadata_columns and n != "row_id"), None)
                if name:
                    roles[role] = name
        shown: dict[int, dict] = {}
        if roles and ranked:
            shown = metadata_of([int(row["row_id"]) for row in ranked], sorted(set(roles.values())))
        members: dict[int, list[dict]] = {}
        for row in ranked:
            entry = {"row_id": int(row["row_id"]), "is_kept": bool(row["is_kept"]),
                     "similarity_to_kept": round(float(row["similarity_to_kept"]), 4)}
            entry.update({role: shown.get(entry["row_id"], {}).get(name) for role, name in roles.items()})
            members.setdefault(int(row["group_id"]), []).append(entry)
        for entry in groups:
            entry["members"] = members.get(entry["group_id"], [])
    sizes = np.asarray(bucket_sizes, dtype=np.int64)
    edges = [1 << i for i in range(int(np.log2(max(1, sizes.max()))) + 2)] if sizes.size else [1, 2]
    counts, _ = np.histogram(sizes, bins=edges) if sizes.size else (np.zeros(1, np.int64), None)
    return {"group_sizes": [[int(r["group_size"]), int(r["count"])] for r in by_size],
            "bucket_size_histogram": {"edges": edges, "counts": [int(c) for c in counts]},
            "largest_groups": groups}


class StepLog:
    """Progress lines for the steps inside one stage: ``group: connected components in 2.1 s``."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.last = time.perf_counter()

    def done(self, step: str) -> None:
        now = time.perf_counter()
        log.info("%s: %s in %.1f s", self.stage, step, now - self.last)
        self.last = now


def assemble(ctx: RunContext, reused: list[str], seconds: dict[str, float], kernels_used: dict[str, Any]) -> dict:
    """report.json's content from the stages' results; raises AccountingError when the rows do not add up."""
    from dedup_spark import bucket, kernels, search
    from dedup_spark.assign import bucket_sizes

    results, config, manifest = ctx.results, ctx.config, ctx.manifest
    read, assign, searched, grouped = results["read"], results["assign"], results["search"], results["group"]
    estimated, model, valid = results["estimate"], ctx.model, ctx.valid_rows
    removed = grouped["removed_rows"]
    report: dict[str, Any] = {
        "input": {"uri": manifest.input_uri, "format": manifest.format, "dim": ctx.dim, "shards": len(manifest.shards)},
        "output": {"uri": config.output.uri, "pairs": config.output.pairs},
        "threshold": ctx.threshold,
        "accounting": accounting(manifest.rows + manifest.skipped_rows, valid - removed, removed,
                                 read["rejected_rows"], results["write"]["rows"], manifest.skipped_rows),
        "skipped_shards": manifest.skipped,
        "rejected_by_reason": read["reasons"],
        "bucketing": {"method": model.method, "k": model.buckets_per_round, "m": model.m, "rounds": model.rounds,
                      "margin": model.margin, "buckets_per_row": round(assign["rows"] / valid, 4) if valid else 0.0,
                      "train_rows": model.train_rows, "training": model.training,
                      "cell_train_rows": model.cell_train_rows, "merged_centroids": model.merged_centroids,
                      "assign": model.assign,
                      # Also logged at train: set when max_train_rows starved the k-means sample.
                      "training_warning": bucket.starved_training(valid, config),
                      "k_source": "config" if config.bucketing.k else "cost model",
                      "assigned_rows": assign["rows"], "bucket_sizes": size_stats(list(bucket_sizes(ctx).values())),
                      "max_task_rows": searched["max_task_rows"], "search_tasks": searched["tasks"],
                      "split_buckets": searched["split_buckets"], "packed_buckets": searched.get("packed_buckets"),
                      "largest_task_rows": searched["largest_task_rows"]},
        "search": {"pairs_found": searched["pair_counts"][0], "edges_emitted": searched["rows"],
                   "pairs_written": grouped["pairs_rows"], "comparisons": searched["comparisons"],
                   # Summed over tasks; the rest of the stage is the shuffle that brings the rows.
                   "kernel_task_seconds": searched.get("kernel_task_seconds"),
                   # Rows the shuffle to search carried: each row once per task it feeds (assigned_rows
                   # counts it once per bucket; a pack of buckets takes it once).
                   "routed_rows": searched.get("routed_rows"),
                   # Similarities the search tasks computed, against what every pair of their buckets costs;
                   # rows attached to a representative inside dense groups were not compared with each other,
                   # and then pairs_found and similarity_histogram count the pairs among the comparisons made.
                   "comparisons_done": searched.get("comparisons_done"),
                   "comparisons_all_pairs": searched.get("comparisons_all_pairs"),
                   "rows_attached": searched.get("rows_attached"),
                   "pairs_found_is_lower_bound": bool(searched.get("rows_attached"))},
        "calibration": grouped["calibration"],
        "similarity_histogram": {"edges": [round(float(e), 6) for e in
                                           kernels.histogram_edges(ctx.threshold, search.HISTOGRAM_BINS)],
                                 "counts": searched["histogram"]},
        "groups": {"count": grouped["groups"], "rows_in_groups": grouped["rows"], "cc_rounds": grouped["cc_rounds"]},
        "captions": grouped["captions"],
        "recall_estimate": {key: value for key, value in estimated.items() if key not in ("rows", "note")},
        "index": {key: value for key, value in results.get("index", {}).items() if key != "note"},
        "stages_reused": reused,
        "blas": kernels_used,
        "timings_seconds": dict(seconds),
    }
    if ctx.reference is not None:
        from dedup_spark.incremental import reference_report

        report["reference"] = reference_report(ctx)
    if "seconds" in estimated and seconds.get("total"):
        report["recall_estimate"]["fraction_of_run"] = round(estimated["seconds"] / seconds["total"], 4)
    report.update(grouped["views"])
    return report


def write_report(report: dict, json_uri: str, html_uri: str) -> None:
    """report.json, and report.html rendered from the JSON as written, so the page shows exactly its numbers."""
    from dedup_spark import html, storage

    storage.write_json(json_uri, report)
    storage.write_bytes(html_uri, html.render(json.loads(json.dumps(report))).encode())

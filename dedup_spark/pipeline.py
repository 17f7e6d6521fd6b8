"""The runner: the stages in order, each reused when its recorded key matches, then the report.

    read -> train -> assign -> search -> group -> estimate -> write -> index   (then the report)

Each stage (``stage.Stage``) lives in its own module and declares the settings its result
depends on. Its key is the hash of that, the previous stage's key and the format version, so it
covers the input's identity (the read stage's settings hold the manifest: file names, sizes,
modification times) and every upstream setting. A completed stage writes
``<work>/stages/<name>.json`` with its key and result; a rerun with the same arguments reuses
every stage whose key matches and recomputes from the first that does not.

``run`` is the files job (the command line's ``jobs/dedup.py``): it checks the locations,
claims the output, runs the stages, and publishes (``publish``). ``api.deduplicate`` runs the
same stages on a DataFrame.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from pyspark.sql import SparkSession

from dedup_spark import (
    assign,
    blas,
    estimate,
    faults,
    group,
    incremental,
    index,
    read,
    report,
    search,
    session,
    storage,
    train,
    write,
)
from dedup_spark.config import ConfigError, JobConfig
from dedup_spark.formats import frame
from dedup_spark.publish import SUCCESS, Claim, OutputError, check_locations, publish
from dedup_spark.stage import RunContext, Stage, Work

log = logging.getLogger("dedup_spark")

__all__ = ["ENTRIES", "STAGES", "SUCCESS", "OutputError", "execute", "run"]

STAGES: tuple[Stage, ...] = (read.STAGE, train.STAGE, assign.STAGE, search.STAGE, group.STAGE, estimate.STAGE,
                             write.STAGE, index.STAGE)
# An incremental run (input.reference): the reference's model instead of training, new ids checked
# against the corpus's, and the new rows searched against the corpus's kept rows too.
INCREMENTAL_STAGES: tuple[Stage, ...] = (read.STAGE, incremental.IDS_STAGE, incremental.MODEL_STAGE, assign.STAGE,
                                         search.STAGE, incremental.REFERENCE_STAGE, incremental.GROUP_STAGE,
                                         incremental.ESTIMATE_STAGE, write.STAGE, index.STAGE)
# Bump when a stage's output format or meaning changes, so old work is not reused.
STAGE_FORMAT = 6
# What a run publishes under its output, at the top level.
ENTRIES = ("dedup", "duplicates", "pairs", "rejected", "model", "index", "report.json", "report.html")


class StageRunner:
    """Runs stages in order, reusing those whose recorded key matches, timing the others."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.timer = report.StageTimer()
        self.previous_key = ""
        self.reused: list[str] = []

    def run(self, stage: Stage) -> dict[str, Any]:
        ctx = self.ctx
        payload = json.dumps({"stage": stage.name, "format": STAGE_FORMAT, "previous": self.previous_key,
                              "settings": stage.settings(ctx)}, sort_keys=True, default=str)
        key = hashlib.sha256(payload.encode()).hexdigest()
        marker = ctx.work.marker(stage.name)
        recorded = storage.read_json(marker) if storage.exists(marker) else None
        if ctx.claim is not None:
            ctx.claim.verify()  # a run that lost its output to another stops before its next stage
        if recorded and recorded.get("key") == key:
            self.reused.append(stage.name)
            self.timer.seconds[stage.name] = 0.0
            log.info("stage %s: reused from an earlier run (key %s)", stage.name, key[:12])
            result = recorded["result"]
        else:
            with self.timer.stage(stage.name) as record:
                result = stage.run(ctx)
                record.update(rows=result.get("rows", 0), note=result.get("note", ""))
            storage.write_json(marker, {"key": key, "result": result})
        self.previous_key = key
        ctx.results[stage.name] = result
        faults.after_stage(stage.name)
        return result


def execute(ctx: RunContext) -> tuple[dict[str, Any], str]:
    """Run the stages and write report.json / report.html beside the staged outputs; the report,
    and the last stage's key (what the staged outputs were made from)."""
    stages = STAGES if ctx.reference is None else INCREMENTAL_STAGES
    started = time.perf_counter()
    ctx.caption_column  # noqa: B018 - a caption policy that cannot apply fails here, before any work
    # After the input's checks (building the manifest), so a bad input's error is all the command line prints.
    kernels_used = blas.report(ctx.spark)
    runner = StageRunner(ctx)
    for stage in stages:
        runner.run(stage)
    seconds = {**runner.timer.seconds, "total": round(time.perf_counter() - started, 3)}
    result = report.assemble(ctx, runner.reused, seconds, kernels_used)
    report.write_report(result, ctx.work.report_json, ctx.work.report_html)
    return result, runner.previous_key


def claim_for(config: JobConfig) -> Claim:
    """The claim a run holds on its output, and on its work prefix when that lies elsewhere."""
    locations = [config.output.uri]
    if not storage.is_within(config.work_uri, config.output.uri):
        locations.append(config.work_uri)
    return Claim(locations, config.run.claim_timeout, config.run.take_over)


def run(config: JobConfig, spark: SparkSession | None = None) -> dict[str, Any]:
    """The files job: read ``input.uri`` (or the catalog table ``input.table``), publish every output
    under ``output.uri``; the report.

    Locations are checked and the output claimed before Spark starts; nothing appears in the
    output until every stage has succeeded (``publish``)."""
    executor_env = storage.configure_s3(config.storage.s3_endpoint, config.storage.s3_region, config.storage.s3_attempts)
    if not (config.input.uri or config.input.table) or not config.output.uri:
        raise ConfigError("--output and one of --input or --table are required")
    if config.input.uri and config.input.table:
        raise ConfigError("give --input or --table, not both")
    reference = incremental.Reference.open(config.input.reference) if config.input.reference else None
    inputs = [config.input.uri] if config.input.uri else []
    check_locations(inputs + (reference.outputs if reference else []), config.output.uri, config.work_uri,
                    config.output.overwrite, ENTRIES)
    if reference is not None:
        incremental.check_settings(reference, config)
        if config.input.table and not config.input.id_column:
            raise ConfigError("an incremental run over a table needs input.id_column: an integer column whose "
                              "ids stay the same across runs (generated row ids would collide with the corpus's)")
    first_row_id = reference.row_id_max + 1 if reference is not None and not config.input.id_column else 0
    with claim_for(config) as claim:
        manifest = read.build_manifest(config, first_row_id) if config.input.uri else None
        spark = spark or session.get_session(config, executor_env)
        work = Work(config.work_uri)
        if manifest is None:  # a catalog table: its rows are staged as parquet, then read as such
            staged = frame.stage(spark.table(config.input.table), work.input_copy, config.input.embedding_column,
                                 config.input.id_column)
            if reference is not None and staged["input.id_column"] != config.input.id_column:
                raise ConfigError(f"input.id_column {config.input.id_column!r} of {config.input.table} is not an "
                                  "integer column: an incremental run over a table needs integer ids")
            config = config.replace(staged)
            manifest = read.build_manifest(config, first_row_id)
        ctx = RunContext(spark, config, manifest, work, claim, reference=reference)
        result, key = execute(ctx)
        publish(config.output.uri, work.staged, key, claim, keep_staged=config.run.keep_work)
        if not config.run.keep_work:
            storage.delete_tree(config.work_uri)
    log.info("done: %d rows in, %d groups, %d removed, %d rejected, %.1f s; outputs under %s",
             manifest.rows, result["groups"]["count"], result["accounting"]["removed_rows"],
             result["accounting"]["rejected_rows"], result["timings_seconds"]["total"], config.output.uri)
    return result

"""The library's front door: deduplicate a DataFrame from your own Spark code.

    from dedup_spark import deduplicate

    with deduplicate(spark.table("laion.images"), embedding_col="clip", id_col="key") as result:
        result.kept.write.saveAsTable("laion.images_dedup")
        result.duplicates.where("not is_kept").select("key", "group_id").show()

The same stages as the command line run on the DataFrame's rows: it is written once into the
work prefix (``work_dir``) as parquet, read from there, and every table the stages produce lives
there until ``cleanup()`` (or the end of the ``with`` block). Nothing is collected to the
driver but samples, centroids and counts, and the caller's session is left as it was: no
setting, log level or environment variable of it is changed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame

from dedup_spark import storage, tables
from dedup_spark.config import ConfigError, JobConfig
from dedup_spark.formats import frame
from dedup_spark.publish import Claim, check_locations, publish
from dedup_spark.read import build_manifest
from dedup_spark.stage import RunContext, Work

log = logging.getLogger("dedup_spark")

__all__ = ["DedupResult", "deduplicate"]


@dataclass
class DedupResult:
    """What ``deduplicate`` found. The DataFrames read tables under ``work_dir``: use them (or
    ``write`` them) before ``cleanup``.

    - ``kept``: the input rows that are kept, with the input's columns.
    - ``duplicates``: every member of a group of two or more rows: ``row_id, group_id, group_size,
      is_kept, similarity_to_kept, caption_similarity, caption_group`` and the caller's id column.
    - ``pairs``: ``row_id_a, row_id_b, similarity`` (``output.pairs``; None for ``none``).
    - ``rejected``: rows that could not be used, with ``reject_reason`` and the caller's id column.
    - ``report``: the run's report (``report.json`` of the command line).
    """

    kept: DataFrame
    duplicates: DataFrame
    pairs: DataFrame | None
    rejected: DataFrame
    report: dict[str, Any]
    work_dir: str
    _key: str = ""
    _owns_work_dir: bool = field(default=False, repr=False)

    def write(self, output: str, overwrite: bool = False) -> list[str]:
        """Publish the results under ``output`` in the command line's layout (``dedup/`` as parquet,
        ``duplicates/``, ``pairs/``, ``rejected/``, ``model/``, ``report.json``, ``report.html``,
        ``_SUCCESS`` last); the files published."""
        from dedup_spark.pipeline import ENTRIES

        staged = Work(self.work_dir).staged
        check_locations([self.work_dir], output, output, overwrite, ENTRIES)
        with Claim([output]) as claim:
            return publish(output, staged, self._key, claim, keep_staged=True)

    def cleanup(self) -> None:
        """Remove the work prefix (the DataFrames above can no longer be read)."""
        storage.delete_tree(self.work_dir)
        if self._owns_work_dir:
            storage.delete_tree(os.path.dirname(self.work_dir))

    def __enter__(self) -> DedupResult:
        return self

    def __exit__(self, *_: object) -> None:
        self.cleanup()


def deduplicate(df: DataFrame, *, embedding_col: str = "embedding", id_col: str | None = None,
                threshold: float = 0.95, work_dir: str | None = None, config: JobConfig | None = None,
                **settings: Any) -> DedupResult:
    """Find near-duplicate rows of ``df`` by the cosine similarity of ``embedding_col`` (an array of
    floats, an ml vector, or float16 bytes with ``input={"binary_dtype": "float16"}``).

    ``id_col``: the caller's row identity, carried into ``duplicates`` and ``rejected`` so results join
    back to any copy of the data; an integer id is also the ``row_id`` (it must then be unique).
    ``work_dir``: where the stages write (any URI pyarrow.fs reaches, visible to every executor);
    default: a new temporary directory, in local mode only. ``config``: a ``JobConfig`` to start from
    (``config.load("my.yaml")``); ``settings``: overrides as section mappings
    (``bucketing={"m": 3}``) or dotted keys (``**{"bucketing.m": 3}``).
    """
    spark = df.sparkSession
    config = _settings(config or JobConfig(), threshold, settings)
    if config.input.reference:
        raise ConfigError("deduplicate() runs on the DataFrame alone; an incremental run against a published "
                          "output is the files job's (pipeline.run, or jobs/dedup.py --table/--input with --reference)")
    root, owned = _work_root(spark, work_dir or config.run.work_dir)
    run_root = storage.join(root, f"run-{uuid.uuid4().hex[:12]}")
    try:
        overrides = frame.stage(df, storage.join(run_root, "input"), embedding_col, id_col)
        config = config.replace({**overrides, "run.work_dir": run_root})
        ctx = RunContext(spark, config, build_manifest(config), Work(run_root))
        from dedup_spark.pipeline import execute

        report, key = execute(ctx)
    except BaseException:
        storage.delete_tree(run_root)
        raise
    return _result(ctx, report, key, owned)


def _settings(base: JobConfig, threshold: float, settings: dict[str, Any]) -> JobConfig:
    overrides: dict[str, Any] = {"search.threshold": threshold}
    sections = base.to_dict()
    for name, value in settings.items():
        if name in sections and isinstance(value, dict):
            overrides.update({f"{name}.{key}": item for key, item in value.items()})
        else:
            overrides[name.replace("__", ".")] = value
    return base.replace(overrides)


def _work_root(spark, work_dir: str | None) -> tuple[str, bool]:
    """The work prefix's parent, and whether it was made here (then removed by ``cleanup``)."""
    if work_dir:
        return work_dir, False
    if not spark.sparkContext.master.startswith("local"):
        raise ConfigError("deduplicate() on a cluster needs work_dir: a location every executor can read and "
                          "write (s3://bucket/prefix, or a shared filesystem)")
    return tempfile.mkdtemp(prefix="dedup-spark-"), True


def _result(ctx: RunContext, report: dict[str, Any], key: str, owned: bool) -> DedupResult:
    spark, work = ctx.spark, ctx.work
    schema = tables.table_info(ctx.config.input.uri).schema
    shards = [shard.relative[0] for shard in ctx.manifest.shards]
    tables.commit_files(work.dedup, shards, report["accounting"]["written_rows"], schema)
    kept = tables.read_table(spark, work.dedup)
    if ctx.config.input.id_column == frame.ROW_ID:
        kept = kept.drop(frame.ROW_ID)
    pairs = tables.read_table(spark, work.pairs) if storage.exists(work.pairs) else None
    rejected = tables.read_table(spark, work.rejected)
    duplicates = tables.read_table(spark, work.duplicates)
    return DedupResult(kept, duplicates, pairs, rejected, report, work.root, key, owned)

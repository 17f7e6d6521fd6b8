"""What a stage is, and what every stage of one run shares.

A ``Stage`` declares, in one place, its name, the settings its result depends on (its cache
key, beside the previous stage's key and the input's identity) and the function computing it.
Each stage module (read, train, assign, search, group, estimate, write, index) defines one;
``pipeline`` orders them, resumes and times them. A stage reads the tables earlier stages wrote
(``Work`` names every location) and returns a small JSON result, which the runner records and
later stages and the report read from ``RunContext.results``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pyspark.sql import SparkSession

from dedup_spark import storage
from dedup_spark.config import JobConfig

if TYPE_CHECKING:
    import pyarrow as pa

    from dedup_spark.bucket import BucketModel
    from dedup_spark.publish import Claim
    from dedup_spark.read import Manifest


@dataclass(frozen=True)
class Work:
    """Every location of one run: stage tables under the work prefix, and the staged outputs
    (``staged``: moved into the output by the publish, or read in place by the library API)."""

    root: str

    def __getattr__(self, name: str) -> str:
        if name in _WORK_TABLES:
            return storage.join(self.root, _WORK_TABLES[name])
        if name in _STAGED:
            return storage.join(self.root, "publish", _STAGED[name])
        raise AttributeError(name)

    @property
    def staged(self) -> str:
        return storage.join(self.root, "publish")

    def marker(self, stage: str) -> str:
        return storage.join(self.root, "stages", f"{stage}.json")


# Intermediate tables, under the work prefix.
_WORK_TABLES = {
    "rows": "read", "sample": "sample", "cell_sample": "cell_sample", "assigned": "assign",
    "probe_pairs": "probe_pairs", "bucket_sizes": "bucket_sizes.npy", "bucket_pairs": "bucket_pairs.npy",
    "edges": "edges", "merged_captions": "merged_captions", "duplicates_base": "duplicates_base",
    "caption_signatures": "caption_signatures", "scratch": "scratch", "input_copy": "input",
    "reference_links": "reference_links",
}
# Outputs, under the work prefix's publish/ (the output's layout).
_STAGED = {
    "rejected": "rejected", "model": "model", "duplicates": "duplicates", "pairs": "pairs", "dedup": "dedup",
    "index": "index", "index_segment": "index/segment", "report_json": "report.json", "report_html": "report.html",
}


@dataclass
class RunContext:
    """One run: its session, settings, input, locations, and the results of the stages so far."""

    spark: SparkSession
    config: JobConfig
    manifest: Manifest
    work: Work
    claim: Claim | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: Any = None  # an incremental run's reference corpus (``incremental.Reference``)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def threshold(self) -> float:
        return self.config.search.threshold

    @property
    def thresholds(self) -> list[float]:
        """The search threshold first, then the calibration thresholds above it."""
        return [self.threshold, *sorted(set(self.config.search.thresholds) - {self.threshold})]

    @property
    def all_pairs(self) -> bool:
        return self.config.output.pairs == "all"

    @property
    def valid_rows(self) -> int:
        return self.results["read"]["valid_rows"]

    @property
    def model(self) -> BucketModel:
        from dedup_spark.bucket import BucketModel

        return BucketModel(**self.results["train"]["model"])

    @cached_property
    def input_columns(self) -> pa.Schema | None:
        """The input's metadata columns (none for npy input)."""
        from dedup_spark.read import metadata_schema

        return metadata_schema(self.manifest, self.config)

    @property
    def column_names(self) -> list[str]:
        return [] if self.input_columns is None else self.input_columns.names

    @cached_property
    def caption_column(self) -> str | None:
        from dedup_spark.captions import caption_column

        return caption_column(self.column_names, self.config)

    @cached_property
    def key_column(self) -> str | None:
        """The column that identifies a row in any copy of the data, carried beside row_id in
        duplicates/ and rejected/: ``input.key_column``, else the id column, else ``key``, else ``url``."""
        from dedup_spark.formats.frame import ROW_ID

        settings = self.config.input
        if settings.key_column:
            return settings.key_column
        if settings.id_column and settings.id_column != ROW_ID:
            return settings.id_column
        return next((name for name in ("key", "url") if name in self.column_names), None)


@dataclass(frozen=True)
class Stage:
    """A stage: ``settings(ctx)`` is what its result depends on besides the previous stage's key
    (``pipeline`` hashes it into the stage's key); ``run(ctx)`` computes and returns the result,
    a small JSON object (``rows`` and ``note`` are logged)."""

    name: str
    settings: Callable[[RunContext], dict[str, Any]]
    run: Callable[[RunContext], dict[str, Any]]

"""Helpers shared by tests: generate a sample, run the job in-process, read outputs back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dedup_spark import config as config_module
from dedup_spark.pipeline import run
from dedup_spark.sample import SampleSpec, generate, write


def make_sample(directory: Path, rows: int, dim: int = 64, seed: int = 0, fmt: str = "laion", **write_options):
    sample = generate(SampleSpec(rows=rows, dim=dim, seed=seed))
    root = directory / f"{fmt}-{rows}-{dim}-{seed}"
    write(sample, root, fmt, **write_options)
    return sample, root


def run_job(spark, input_dir, output_dir, **settings) -> dict:
    """The job in-process. The recall estimate is off unless asked for: it has its own tests, and the
    spark-submit tests run it with the defaults."""
    overrides = {"input.uri": str(input_dir), "output.uri": str(output_dir), "estimate.sample_rows": 0}
    overrides.update({key.replace("__", "."): value for key, value in settings.items()})
    return run(config_module.load(None, overrides), spark)


def read_table(directory: Path):
    return pq.read_table(sorted(p for p in Path(directory).glob("part-*.parquet")))


def output_pairs(output_dir: Path) -> dict:
    table = read_table(output_dir / "pairs")
    return {(a, b): s for a, b, s in zip(table.column("row_id_a").to_pylist(), table.column("row_id_b").to_pylist(),
                                           table.column("similarity").to_pylist())}


def output_groups(output_dir: Path) -> dict:
    table = read_table(output_dir / "duplicates")
    return dict(zip(table.column("row_id").to_pylist(), table.column("group_id").to_pylist()))


def stored_embeddings(sample) -> np.ndarray:
    from oracle import normalize

    return normalize(sample.embeddings)

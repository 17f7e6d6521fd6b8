"""Helpers shared by tests: generate a sample, run the job in-process, read outputs back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dedup_spark import config as config_module
from dedup_spark.faults import inject
from dedup_spark.pipeline import run
from dedup_spark.sample import SampleSpec, generate, write


def make_sample(directory: Path, rows: int, dim: int = 64, seed: int = 0, fmt: str = "laion", **write_options):
    sample = generate(SampleSpec(rows=rows, dim=dim, seed=seed))
    root = directory / f"{fmt}-{rows}-{dim}-{seed}"
    write(sample, root, fmt, **write_options)
    return sample, root


def run_job(spark, input_dir, output_dir, faults: dict | None = None, **settings) -> dict:
    """The job in-process. The recall estimate and caption work are off unless asked for: they have
    their own tests, and the spark-submit tests run them with the defaults. ``faults``: test-only
    fault switches (``dedup_spark.faults.Faults`` fields) in force for this run."""
    overrides = {"input.uri": str(input_dir), "output.uri": str(output_dir), "estimate.sample_rows": 0,
                 "captions.column": None}
    overrides.update({key.replace("__", "."): value for key, value in settings.items()})
    with inject(**(faults or {})):
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


def random_caption(rng: np.random.Generator, words: int = 6) -> str:
    """Words of random letters: two such captions share almost no shingles."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, size=rng.integers(3, 9))) for _ in range(words))


def _shown_number(text: str):
    text = text.strip()
    if text in ("yes", "no"):
        return text == "yes"
    return float(text.replace(",", ""))


def _json_value(report: dict, key: str):
    value = report
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def check_html_numbers(page: str, report: dict) -> set[str]:
    """Every number report.html shows equals report.json's value at its data-key; the keys shown."""
    import re

    import pytest

    shown = re.findall(r'data-key="([^"]+)">([^<]*)<', page)
    for key, text in shown:
        expected = _json_value(report, key)
        if isinstance(expected, float):
            assert _shown_number(text) == pytest.approx(expected, rel=1e-5), key
        elif isinstance(expected, (bool, int)):
            assert _shown_number(text) == expected, key
    return {key for key, _ in shown}

"""`spark-submit jobs/dedup.py` as a subprocess, checked through its outputs only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import make_sample, output_groups, output_pairs
from oracle import brute_force_pairs, groups_of, normalize

REPO = Path(__file__).resolve().parent.parent


def spark_submit() -> str:
    return shutil.which("spark-submit", path=str(Path(sys.executable).parent)) or "spark-submit"


def test_spark_submit_runs_the_job(tmp_path):
    sample, root = make_sample(tmp_path, rows=4000, dim=32, seed=11)
    out = tmp_path / "out"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    result = subprocess.run(
        [spark_submit(), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
         str(REPO / "jobs" / "dedup.py"), "--input", str(root), "--output", str(out),
         "--format", "laion", "--threshold", "0.95", "--set", "bucketing.k=1", "--set", "output.pairs=all"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    oracle = brute_force_pairs(normalize(sample.embeddings), 0.95)
    assert set(output_pairs(out)) == set(oracle)
    assert output_groups(out) == groups_of(oracle)
    report = json.loads((out / "report.json").read_text())
    assert report["accounting"]["balanced"]
    assert f"rows in: {len(sample.embeddings):,}" in result.stdout
    # One progress line per stage, with rows and seconds (spark-submit merges the
    # Python driver's stderr into its stdout).
    lines = (result.stdout + result.stderr).splitlines()
    for stage in ("read", "train", "assign", "search", "group", "write"):
        assert any(f"stage {stage}:" in line and " s" in line and "rows" in line for line in lines), stage
    # A second run without --overwrite refuses to replace the published result.
    again = subprocess.run([sys.executable, str(REPO / "jobs" / "dedup.py"), "--input", str(root), "--output", str(out)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr

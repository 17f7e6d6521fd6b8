"""Which OpenBLAS kernels the matrix products run on: faiss loaded with numpy's detected core,
a core the environment sets respected, generic kernels warned about, and the executors' cores
reported. Each case runs in a fresh interpreter, since OpenBLAS picks its core once, at load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dedup_spark import blas
from dedup_spark.blas import report as blas_report

REPO = Path(__file__).resolve().parent.parent


def describe_in_fresh_process(coretype: str | None, code: str = "blas.describe()") -> dict:
    """``code``'s value (JSON) in a new interpreter whose OPENBLAS_CORETYPE is ``coretype`` (None: unset)."""
    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_CORETYPE"}
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    script = f"import json, os\nfrom dedup_spark import blas\nprint(json.dumps({code}))"
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def unpinned():
    """numpy's own detection, in a process where nothing else has loaded yet."""
    cores = describe_in_fresh_process(None, "__import__('numpy') and blas.openblas_cores()")
    if "numpy" not in cores:
        pytest.skip("numpy is not linked to an OpenBLAS that reports its core")
    return cores["numpy"]


def test_faiss_is_loaded_with_the_core_numpy_detected_and_the_environment_left_unset(unpinned):
    result = describe_in_fresh_process(
        None, "[blas.import_faiss() and blas.openblas_cores(), os.environ.get('OPENBLAS_CORETYPE')]")
    cores, left_set = result
    assert cores["numpy"] == unpinned
    # faiss-cpu's own OpenBLAS, left to detect this CPU, may fall back to generic kernels.
    assert cores.get("faiss", unpinned) == {"SapphireRapids": "Cooperlake"}.get(unpinned, unpinned), cores
    assert left_set is None


def test_a_core_the_environment_sets_is_respected_and_advice_given_only_where_avx512_goes_unused(unpinned):
    described = describe_in_fresh_process("Haswell")
    if described["cpu"] not in ("avx2", "avx512"):
        pytest.skip("Haswell kernels need AVX2")
    assert set(described["openblas"].values()) == {"Haswell"}, described
    assert described["OPENBLAS_CORETYPE"] == "Haswell"
    assert described["warnings"] == []
    assert bool(described["advice"]) == (described["cpu"] == "avx512")


def test_generic_kernels_on_a_vector_cpu_are_warned_about_naming_each_library(unpinned):
    described = describe_in_fresh_process("Prescott")
    if described["cpu"] not in ("avx2", "avx512"):
        pytest.skip("no wider vector unit to leave unused")
    assert all(core not in blas.AVX2_CORES for core in described["openblas"].values()), described
    (warning,) = described["warnings"]
    assert all(library in warning for library in described["openblas"]), warning
    assert "OPENBLAS_CORETYPE" in warning


def test_the_report_holds_the_cores_an_executor_task_runs(spark, unpinned):
    # The local executor's Python workers inherit this process's environment, like a fresh one.
    expected = describe_in_fresh_process(os.environ.get("OPENBLAS_CORETYPE"))
    reported = blas_report(spark)
    # A worker that ran other tasks may hold scipy's OpenBLAS too (datasketch loads it).
    assert {name: reported["executor"]["openblas"].get(name) for name in ("numpy", "faiss")} == expected["openblas"]
    assert reported["executor"]["cpu"] == expected["cpu"]
    assert reported["driver"]["openblas"].keys() >= {"numpy", "faiss"}

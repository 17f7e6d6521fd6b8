"""Shared fixtures: one real local SparkSession for the whole test session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

if "JAVA_HOME" not in os.environ:
    found = subprocess.run([str(REPO / "scripts" / "find_java.sh")], capture_output=True, text=True)
    if found.returncode == 0:
        os.environ["JAVA_HOME"] = found.stdout.strip()
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
# The tests run hundreds of short Spark jobs, where the JVM's optimising (C2) compiler costs more CPU
# than its code saves: the quick (C1) compiler alone cuts the suite's CPU by about 30%. Every JVM
# the tests start (the shared SparkSession, spark-submit, a standalone cluster) reads this variable.
os.environ.setdefault("JDK_JAVA_OPTIONS", "-XX:TieredStopAtLevel=1")


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    # local[2,4]: two cores, and a failed task is retried up to 4 times, as on a cluster.
    session = (SparkSession.builder.master("local[2,4]").appName("dedup-spark-tests")
               .config("spark.driver.memory", "3g")
               .config("spark.sql.shuffle.partitions", "8")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               # The session's own catalog keeps the tables tests create out of the repository.
               .config("spark.sql.warehouse.dir", tempfile.mkdtemp(prefix="dedup-spark-warehouse-"))
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


# Files whose tests start JVMs of their own (spark-submit, a standalone cluster) or run long jobs go
# first, so the two xdist workers (one file at a time each) do not end with one of them alone.
_LONG_FILES = ("test_object_storage.py", "test_scale.py", "test_integrity.py", "test_publish_resume.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return _LONG_FILES.index(name) if name in _LONG_FILES else len(_LONG_FILES)

    items.sort(key=rank)  # stable: the order inside each file and among the rest is kept

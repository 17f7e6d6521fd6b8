"""The SparkSession the job runs in, and independent queries run on it side by side.

Under ``spark-submit`` the master and resources come from spark-submit; under
plain ``python`` the job starts a local session from the ``spark`` config.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyspark import inheritable_thread_target
from pyspark.sql import SparkSession

from dedup_spark.config import JobConfig

log = logging.getLogger("dedup_spark")


def launched_by_spark_submit() -> bool:
    # spark-submit starts the Python driver with a gateway to its JVM already running.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def get_session(config: JobConfig, executor_env: dict[str, str] | None = None) -> SparkSession:
    """The active session, as it is, or a new one configured from ``config.spark``.

    ``executor_env``: variables remote executors need too (the S3 endpoint and
    region; never credentials, which executors take from their own chain).
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # Python workers must run the interpreter that has our dependencies.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("dedup-spark")
    if not launched_by_spark_submit():
        builder = (builder.master(config.spark.master)
                   .config("spark.driver.memory", config.spark.driver_memory)
                   .config("spark.sql.shuffle.partitions", "16")
                   .config("spark.ui.showConsoleProgress", "false"))
    for name, value in (executor_env or {}).items():
        builder = builder.config(f"spark.executorEnv.{name}", value)
    for key, value in config.spark.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def run_concurrently(stage: str, jobs: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each of ``jobs`` in a thread of its own, so their Spark jobs run side by side; their results by name.

    For independent queries: a small one spends most of its time in fixed latency (planning, task
    launch, results), which overlaps, and a large one's last tasks leave cores the others fill.
    Threads inherit the caller's Spark local properties (``inheritable_thread_target``). Every job
    runs to its end; then the first failure, in the order given, is raised. Each job's time is
    logged as ``<stage>: <name> in <s> s (side by side)``.
    """
    def timed(name: str, job: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            started = time.perf_counter()
            result = job()
            log.info("%s: %s in %.1f s (side by side)", stage, name, time.perf_counter() - started)
            return result
        return inheritable_thread_target(run)

    with ThreadPoolExecutor(max_workers=max(1, len(jobs)), thread_name_prefix=f"dedup-{stage}") as pool:
        futures = {name: pool.submit(timed(name, job)) for name, job in jobs.items()}
    return {name: future.result() for name, future in futures.items()}

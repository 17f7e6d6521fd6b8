"""The SparkSession the job runs in.

Under ``spark-submit`` the master and resources come from spark-submit; under
plain ``python`` the job starts a local session from the ``spark`` config.
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from dedup_spark.config import JobConfig


def launched_by_spark_submit() -> bool:
    # spark-submit starts the Python driver with a gateway to its JVM already running.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def get_session(config: JobConfig, executor_env: dict[str, str] | None = None) -> SparkSession:
    """The active session, or a new one configured from ``config.spark``.

    ``executor_env``: variables remote executors need too (the S3 endpoint and
    region; never credentials, which executors take from their own chain).
    """
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

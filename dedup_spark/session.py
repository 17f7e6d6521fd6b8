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


def get_session(config: JobConfig) -> SparkSession:
    """The active session, or a new one configured from ``config.spark``."""
    # Python workers must run the interpreter that has our dependencies.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("dedup-spark")
    if not launched_by_spark_submit():
        builder = (builder.master(config.spark.master)
                   .config("spark.driver.memory", config.spark.driver_memory)
                   .config("spark.sql.shuffle.partitions", "16")
                   .config("spark.ui.showConsoleProgress", "false"))
    for key, value in config.spark.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark

"""Test-only fault injection inside Spark tasks (``run.fault_task_fraction``).

A seeded share of *first* task attempts raise, so Spark's retry must produce
the same outputs as a clean run; later attempts never fail, so the job still
finishes when tasks are retried (local mode: a master like ``local[2,4]``).
"""

from __future__ import annotations

import zlib


class InjectedTaskFault(RuntimeError):
    """Raised by a task chosen to fail by run.fault_task_fraction."""


def maybe_fail(stage: str, fraction: float, key: object = None) -> None:
    """Raise in this task's first attempt for a ``fraction`` of tasks (chosen by a hash of stage and key)."""
    if fraction <= 0.0:
        return
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None or context.attemptNumber() > 0:
        return
    tag = f"{stage}/{context.partitionId() if key is None else key}".encode()
    if zlib.crc32(tag) / 2**32 < fraction:
        raise InjectedTaskFault(f"run.fault_task_fraction: injected failure in {stage} task {tag.decode()}, attempt 0")

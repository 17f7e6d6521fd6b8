"""Test-only fault injection: no user setting reaches it.

Tests prove that retried tasks, failed runs and concurrent runs leave the outputs right by
making these happen on purpose. They install faults in-process with ``inject(...)``; a job
started as a subprocess reads them from the ``DEDUP_SPARK_TEST_FAULTS`` environment variable
(a JSON object of ``Faults`` fields) when this module is first imported on its driver. The
driver captures the task-level switches when it builds a stage's tasks and ships them inside
the task, so executors need neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

VARIABLE = "DEDUP_SPARK_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    # This share of first task attempts in read, search and write raise (Spark retries them;
    # outputs must not change). Local mode retries only with a master like local[2,4].
    task_fraction: float = 0.0
    # The write stage silently drops this many kept rows of the first shard, so the accounting
    # check must fail the run.
    drop_rows: int = 0
    # Raise InjectedFault right after this stage has completed and recorded its result.
    fail_after_stage: str | None = None
    # After this stage, create ``hold_file + ".reached"`` and wait until ``hold_file`` exists: a
    # run held at a known point while a test starts another.
    hold_after_stage: str | None = None
    hold_file: str | None = None
    # Raise InjectedFault once the publish has moved this many files into the output: a run
    # killed half-way through its publish.
    fail_after_published_files: int | None = None


class InjectedFault(RuntimeError):
    """Raised by ``Faults.fail_after_stage``."""


class InjectedTaskFault(RuntimeError):
    """Raised by a task chosen to fail by ``Faults.task_fraction``."""


_active = Faults(**json.loads(os.environ.get(VARIABLE) or "{}"))


def active() -> Faults:
    """The faults in force on this driver (none outside tests)."""
    return _active


@contextlib.contextmanager
def inject(**settings: object) -> Iterator[Faults]:
    """Faults in force inside the block: ``with inject(fail_after_stage="search"): ...``."""
    global _active
    previous = _active
    _active = dataclasses.replace(previous, **settings)
    try:
        yield _active
    finally:
        _active = previous


def after_stage(name: str) -> None:
    """Called by the runner once a stage's result is recorded."""
    if _active.hold_after_stage == name and _active.hold_file:
        Path(_active.hold_file + ".reached").touch()
        deadline = time.monotonic() + 900
        while not Path(_active.hold_file).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    if _active.fail_after_stage == name:
        raise InjectedFault(f"injected fault: stopping after stage {name}")


def published_file(count: int) -> None:
    """Called by the publish after each file it moved into the output (``count`` so far)."""
    if _active.fail_after_published_files is not None and count >= _active.fail_after_published_files:
        raise InjectedFault(f"injected fault: stopping the publish after {count} files")


def maybe_fail(stage: str, fraction: float, key: object = None) -> None:
    """In a task: raise in its first attempt for a ``fraction`` of tasks (chosen by a hash of stage and key)."""
    if fraction <= 0.0:
        return
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None or context.attemptNumber() > 0:
        return
    tag = f"{stage}/{context.partitionId() if key is None else key}".encode()
    if zlib.crc32(tag) / 2**32 < fraction:
        raise InjectedTaskFault(f"injected failure in {stage} task {tag.decode()}, attempt 0")

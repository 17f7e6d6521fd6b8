"""Report stage: the run's counts, bucket statistics, timings and the
accounting check (input rows = kept + removed + rejected), as report.json."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any

import numpy as np

log = logging.getLogger("dedup_spark")


class AccountingError(RuntimeError):
    """Rows were lost or double counted: input != kept + removed + rejected."""


class StageTimer:
    """Times stages and logs one line per stage with its rows and seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.rows: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        record: dict[str, Any] = {}
        log.info("stage %s: started", name)
        yield record
        elapsed = time.perf_counter() - started
        self.seconds[name] = round(elapsed, 3)
        if "rows" in record:
            self.rows[name] = int(record["rows"])
        log.info("stage %s: %s rows in %.1f s%s", name, f"{record.get('rows', '-'):,}" if "rows" in record else "-",
                 elapsed, f" ({record['note']})" if record.get("note") else "")


def size_stats(sizes: list[int] | np.ndarray) -> dict[str, float]:
    values = np.asarray(sizes, dtype=np.float64)
    if values.size == 0:
        return {"count": 0}
    return {"count": int(values.size), "min": int(values.min()), "median": float(np.median(values)),
            "mean": round(float(values.mean()), 3), "p99": float(np.percentile(values, 99)), "max": int(values.max())}


def accounting(input_rows: int, kept: int, removed: int, rejected: int, written: int) -> dict[str, Any]:
    """The invariant, checked: every input row is kept, removed or rejected, and dedup/ holds the kept ones."""
    result = {"input_rows": input_rows, "kept_rows": kept, "removed_rows": removed, "rejected_rows": rejected,
              "written_rows": written,
              "balanced": input_rows == kept + removed + rejected and written == kept}
    if not result["balanced"]:
        raise AccountingError(f"accounting failed: input {input_rows} != kept {kept} + removed {removed} + "
                              f"rejected {rejected}, or dedup/ holds {written} rows instead of {kept}")
    return result

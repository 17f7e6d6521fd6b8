"""make bench BENCH_ARGS=--incremental: a scheduled run's cost against a full rerun, in one process.

A full run over N rows (the corpus), then an incremental run of N/10 new rows against its output
(``--reference``), then a full rerun over all 1.1 N rows, on one generated CLIP-like set whose
planted groups spread over both. Reported: the three times, the incremental run's speed-up over
the rerun, and on a sample of the new rows the removed-row recall and precision against an
exhaustive search over the kept corpus rows and the new rows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

THRESHOLD = 0.95
# New rows compared exhaustively with the kept corpus and the new rows, for recall and precision.
SAMPLE_ROWS = 2000


def _link_shards(sources: list[Path], target: Path) -> None:
    """One LAION-layout input of several inputs' shards, numbered on (hard links: no copy)."""
    shutil.rmtree(target, ignore_errors=True)
    (target / "img_emb").mkdir(parents=True)
    (target / "metadata").mkdir()
    number = 0
    for source in sources:
        embeddings = sorted((source / "img_emb").glob("*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
        for path in embeddings:
            suffix = path.stem.split("_")[-1]
            os.link(path, target / "img_emb" / f"img_emb_{number}.npy")
            os.link(source / "metadata" / f"metadata_{suffix}.parquet", target / "metadata" / f"metadata_{number}.parquet")
            number += 1


def make_inputs(rows: int, dim: int, directory: Path) -> tuple[Path, Path, Path, np.ndarray]:
    """The corpus (N rows), the new rows (N/10) and both together, from one generated set."""
    from oracle import normalize

    from dedup_spark.sample import Sample, SampleSpec, generate, write

    total = rows + rows // 10
    sample = generate(SampleSpec(rows=total, dim=dim, seed=11))
    corpus, new, both = (directory / f"incremental-{rows}-{name}" for name in ("corpus", "new", "all"))
    if not (directory / f"incremental-{rows}-done").exists():
        for path, span in ((corpus, slice(0, rows)), (new, slice(rows, total))):
            shutil.rmtree(path, ignore_errors=True)
            part = Sample(sample.embeddings[span], sample.planted_group[span], sample.topic[span],
                          sample.captions[span], sample.widths[span], sample.heights[span], sample.spec)
            write(part, path, "laion", shard_rows=50_000)
        _link_shards([corpus, new], both)
        (directory / f"incremental-{rows}-done").touch()
    return corpus, new, both, normalize(sample.embeddings)


def _removed(out: Path) -> set[int]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((out / "duplicates").glob("part-*.parquet")), columns=["row_id", "is_kept"])
    return set(table.filter(pc.invert(table.column("is_kept"))).column("row_id").to_pylist())


def sampled_truth(stored: np.ndarray, rows: int, corpus_removed: set[int], new_removed: set[int]) -> dict:
    """Removed-row recall and precision of the incremental run on a sample of the new rows. A new
    row with a >= threshold neighbour among the kept corpus rows must be removed; a removed new
    row must have a neighbour among the kept corpus rows or the new rows."""
    import faiss

    from dedup_spark.kernels import unit_float32

    kept_corpus = np.setdiff1d(np.arange(rows), np.fromiter(corpus_removed, np.int64, len(corpus_removed)))
    new_ids = np.arange(rows, len(stored))
    sample = np.random.default_rng(12).choice(new_ids, min(SAMPLE_ROWS, len(new_ids)), replace=False)
    queries = unit_float32(stored[sample])

    def neighbours(ids: np.ndarray) -> list[set[int]]:
        index = faiss.IndexFlatIP(stored.shape[1])
        for start in range(0, len(ids), 200_000):
            index.add(unit_float32(stored[ids[start:start + 200_000]]))
        lims, _, labels = index.range_search(queries, THRESHOLD)
        return [set(ids[labels[lims[i]:lims[i + 1]]].tolist()) - {int(sample[i])} for i in range(len(sample))]

    corpus_hits, new_hits = neighbours(kept_corpus), neighbours(new_ids)
    must = {int(row) for row, hits in zip(sample, corpus_hits) if hits}
    may = {int(row) for row, a, b in zip(sample, corpus_hits, new_hits) if a or b}
    removed = {int(row) for row in sample if int(row) in new_removed}
    return {"sampled_new_rows": len(sample), "duplicating_the_corpus": len(must),
            "removed_row_recall": round(len(must & removed) / max(1, len(must)), 5),
            "removed_row_precision": round(len(removed & may) / max(1, len(removed)), 5),
            "removed_in_sample": len(removed)}


def run(spark, rows: int, dim: int, data: Path, run_job) -> dict:
    corpus, new, both, stored = make_inputs(rows, dim, data)
    # Untimed: the JVM's and the Python workers' start would land on the first timed run.
    warm, _, _, _ = make_inputs(min(rows, 10_000), dim, data)
    run_job(spark, warm, data / "out-incremental-warmup")
    full, full_seconds = run_job(spark, corpus, data / "out-incremental-corpus")
    step, step_seconds = run_job(spark, new, data / "out-incremental-step",
                                 **{"input.reference": str(data / "out-incremental-corpus")})
    rerun, rerun_seconds = run_job(spark, both, data / "out-incremental-rerun")
    quality = sampled_truth(stored, rows, _removed(data / "out-incremental-corpus"), _removed(data / "out-incremental-step"))
    cores = spark.sparkContext.defaultParallelism
    return {"rows": rows, "new_rows": len(stored) - rows, "dim": dim,
            "full_run": {"seconds": round(full_seconds, 2), "stages": full["timings_seconds"]},
            "incremental_run": {"seconds": round(step_seconds, 2), "stages": step["timings_seconds"],
                                "reference": {k: v for k, v in step["reference"].items() if k != "drift"},
                                "drift": step["reference"]["drift"], "recall_estimate": step["recall_estimate"],
                                "removed_rows": step["accounting"]["removed_rows"]},
            "full_rerun": {"seconds": round(rerun_seconds, 2), "stages": rerun["timings_seconds"],
                           "rows_per_s_per_core": round(len(stored) / rerun_seconds / cores)},
            "speedup_over_rerun": round(rerun_seconds / step_seconds, 2), "quality_on_sample": quality}


def markdown(result: dict) -> str:
    quality = result["quality_on_sample"]
    lines = [f"# Incremental run: {result['new_rows']:,} new rows against {result['rows']:,} (d={result['dim']})", "",
             "| measure | value | target |", "|---|---|---|",
             f"| full run over the corpus | {result['full_run']['seconds']} s | |",
             f"| incremental run (--reference) | {result['incremental_run']['seconds']} s | |",
             f"| full rerun over corpus + new rows | {result['full_rerun']['seconds']} s | |",
             f"| rerun / incremental | {result['speedup_over_rerun']}× | ≥ 5× |",
             f"| removed-row recall, {quality['sampled_new_rows']:,} sampled new rows "
             f"({quality['duplicating_the_corpus']:,} duplicate the corpus) | {quality['removed_row_recall']} | ≥ 0.99 |",
             f"| removed-row precision on the sample | {quality['removed_row_precision']} | 1.0 |",
             f"| the run's own recall estimate | {result['incremental_run']['recall_estimate'].get('closure_recall')} | |",
             "", "Stages of the incremental run (s): " + json.dumps(result["incremental_run"]["stages"])]
    return "\n".join(lines) + "\n"

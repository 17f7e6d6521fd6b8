"""Write a CLIP-like sample dataset with planted near-duplicates and its ground truth.

    python jobs/make_sample.py OUT_DIR [--rows 100000] [--dim 512] [--format laion|parquet|npy] [--seed 0]

The ground truth goes beside OUT_DIR: OUT_DIR_ground_truth.parquet (row_id,
planted_group, planted_group_size) and OUT_DIR_ground_truth.json (summary).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dedup_spark.sample import SampleSpec, generate, write  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=["laion", "parquet", "npy"], default="laion")
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--list-type", choices=["list", "fixed_size_list", "binary"], default="list")
    parser.add_argument("--id-column", default=None)
    parser.add_argument("--duplicate-fraction", type=float, default=0.3)
    parser.add_argument("--max-group-size", type=int, default=None)
    args = parser.parse_args(argv)
    spec = SampleSpec(rows=args.rows, dim=args.dim, seed=args.seed, duplicate_fraction=args.duplicate_fraction,
                      max_group_size=args.max_group_size)
    summary = write(generate(spec), args.out_dir, args.format, args.shard_rows, args.dtype, args.list_type,
                    args.id_column)
    print(json.dumps({k: v for k, v in summary.items() if k != "spec"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""spark-submit entry point: find and remove near-duplicate embeddings.

    spark-submit jobs/dedup.py (--input URI | --table DB.NAME) --output URI [--format laion|parquet|npy]
        [--threshold 0.95] [--thresholds 0.96,0.98] [--config conf/FILE.yaml] [--set key=value ...] [--overwrite]
        [--take-over] [--reference PREVIOUS_OUTPUT]

Also runs as plain ``python jobs/dedup.py ...`` in Spark local mode.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, when not installed

from dedup_spark import config as config_module  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dedup.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="input URI (input.uri)")
    parser.add_argument("--table", help="a catalog table, db.name, instead of --input (input.table)")
    parser.add_argument("--reference", help="an earlier run's output: deduplicate the new input against its corpus "
                        "(input.reference)")
    parser.add_argument("--output", help="output URI (output.uri)")
    parser.add_argument("--format", choices=config_module.FORMATS, help="input.format")
    parser.add_argument("--threshold", type=float, help="search.threshold")
    parser.add_argument("--thresholds", help="more thresholds to calibrate from the same search, comma-separated, "
                        "each >= --threshold (search.thresholds)")
    parser.add_argument("--config", help="a YAML file of settings (see conf/default.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any setting")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a published output: removes only the files its _SUCCESS lists (output.overwrite)")
    parser.add_argument("--take-over", action="store_true",
                        help="take over the output's claim from a run known to be dead (run.take_over)")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> config_module.JobConfig:
    flags = {"input.uri": args.input, "input.table": args.table, "input.reference": args.reference,
             "output.uri": args.output, "input.format": args.format,
             "search.threshold": args.threshold,
             "search.thresholds": args.thresholds, "output.overwrite": True if args.overwrite else None,
             "run.take_over": True if args.take_over else None}
    overrides = {key: value for key, value in flags.items() if value is not None}
    overrides.update(dict(config_module.parse_override(item) for item in args.set))
    return config_module.load(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args)
    except (config_module.ConfigError, OSError) as error:
        print(f"dedup.py: configuration error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.run.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from dedup_spark.pipeline import OutputError, run
    from dedup_spark.read import InputError
    from dedup_spark.report import AccountingError

    try:
        result = run(config)
    except (config_module.ConfigError, InputError, OutputError) as error:
        print(f"dedup.py: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # storage: unreachable endpoint, bad credentials, missing bucket
        logging.getLogger("dedup_spark").debug("storage error", exc_info=True)
        print(f"dedup.py: storage error: {_one_line(error)}", file=sys.stderr)
        return 2
    except AccountingError as error:
        print(f"dedup.py: {_one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - a Spark task failure and the like: one line, traceback in the log
        logging.getLogger("dedup_spark").error("job failed", exc_info=True)
        print(f"dedup.py: job failed, nothing was published: {type(error).__name__}: {_one_line(error)}",
              file=sys.stderr)
        return 1
    counts = result["accounting"]
    print(f"rows in: {counts['input_rows']:,}  duplicate groups: {result['groups']['count']:,}  "
          f"rows removed: {counts['removed_rows']:,}  rejected: {counts['rejected_rows']:,}  "
          f"seconds: {result['timings_seconds']['total']:.1f}")
    print(f"outputs: {config.output.uri} (dedup/, duplicates/, pairs/, rejected/, model/, index/, report.json, report.html)")
    return 0


def _one_line(error: BaseException) -> str:
    """The error's message on one line. Spark wraps a task's error in pages of Java and Python
    traceback: the innermost ``SomethingError: message`` line says what happened."""
    lines = str(error).splitlines()
    causes = [line.strip() for line in lines if re.match(r"^\s*[\w.]+(Error|Exception|Fault)\b: ", line)]
    text = " ".join((causes[-1] if len(lines) > 1 and causes else str(error)).split())
    return text if len(text) <= 600 else text[:600] + " ..."


if __name__ == "__main__":
    sys.exit(main())

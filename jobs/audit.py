"""spark-submit entry point: match query embeddings (generated images, an evaluation set)
against a training set, for replication audits and decontamination.

    spark-submit jobs/audit.py --queries URI --train URI --output URI [--threshold 0.95]
        [--exclude] [--queries-format F] [--format F] [--config FILE.yaml] [--set key=value ...] [--overwrite]

--train is a raw dataset or the output of a dedup run (then its input is searched and group
sizes come from its duplicates/). Writes matches/ (query_id, row_id, similarity, group_size and
the row's key, caption, url), audit_report.json, and with --exclude decontaminated/: the
training set minus every matched row.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the library, when not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dedup import _one_line  # noqa: E402

from dedup_spark import config as config_module  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="audit.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", help="query embeddings URI (audit.queries_uri)")
    parser.add_argument("--train", help="training set URI, raw or a dedup run's output (input.uri)")
    parser.add_argument("--output", help="output URI (output.uri)")
    parser.add_argument("--threshold", type=float, help="search.threshold")
    parser.add_argument("--exclude", action="store_true", help="write decontaminated/ (audit.exclude)")
    parser.add_argument("--queries-format", choices=config_module.FORMATS, help="audit.queries_format")
    parser.add_argument("--format", choices=config_module.FORMATS, help="input.format of the training set")
    parser.add_argument("--config", help="a YAML file of settings (see conf/default.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any setting")
    parser.add_argument("--overwrite", action="store_true", help="replace a published output")
    args = parser.parse_args(argv)
    flags = {"audit.queries_uri": args.queries, "input.uri": args.train, "output.uri": args.output,
             "search.threshold": args.threshold, "audit.exclude": True if args.exclude else None,
             "audit.queries_format": args.queries_format, "input.format": args.format,
             "output.overwrite": True if args.overwrite else None}
    try:
        overrides = {key: value for key, value in flags.items() if value is not None}
        overrides.update(dict(config_module.parse_override(item) for item in args.set))
        config = config_module.load(args.config, overrides)
    except (config_module.ConfigError, OSError) as error:
        print(f"audit.py: configuration error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.run.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from dedup_spark.audit import run_audit
    from dedup_spark.publish import OutputError
    from dedup_spark.read import InputError

    try:
        result = run_audit(config)
    except (config_module.ConfigError, InputError, OutputError, OSError) as error:
        print(f"audit.py: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - one line, the trace is in the log
        logging.getLogger("dedup_spark").error("audit failed", exc_info=True)
        print(f"audit.py: failed, nothing was published: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return 1
    print(f"queries: {result['queries']['valid']:,}  with a match: {result['queries_with_match']:,} "
          f"({result['fraction_of_queries_matched']:.2%})  matched training rows: {result['matched_training_rows']:,}")
    print(f"outputs: {config.output.uri} (matches/, audit_report.json{', decontaminated/' if config.audit.exclude else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

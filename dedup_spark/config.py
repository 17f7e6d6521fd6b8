"""One typed, validated configuration object for the whole job.

The knobs and their meaning are documented once, in ``conf/default.yaml``; the
dataclass defaults below mirror that file (a test keeps them equal), so the
library works where the YAML file is not shipped (executors, zipped library).

Precedence, later wins: defaults < ``--config FILE`` < explicit command-line
flags < ``--set key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FORMATS = ("auto", "laion", "parquet", "npy")
PAIR_OUTPUTS = ("all", "spanning", "none")
BUCKETING_METHODS = ("kmeans", "lsh")
CAPTION_POLICIES = ("ignore", "merge", "keep_distinct")
# Caption columns recognised by captions.column: auto (case-insensitive, first match wins).
CAPTION_COLUMNS = ("caption", "text", "title")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


@dataclass(frozen=True)
class InputConfig:
    uri: str | None = None
    format: str = "auto"
    embedding_column: str = "embedding"
    binary_dtype: str = "float16"
    id_column: str | None = None
    key_column: str | None = None
    table: str | None = None
    reference: str | None = None
    dim: int | None = None
    chunk_rows: int = 65536
    on_bad_shard: str = "fail"
    max_rejected_fraction: float = 0.1


@dataclass(frozen=True)
class OutputConfig:
    uri: str | None = None
    pairs: str = "spanning"
    overwrite: bool = False


@dataclass(frozen=True)
class SearchConfig:
    threshold: float = 0.95
    thresholds: list[float] = field(default_factory=list)
    max_task_rows: int | None = None
    pack_rows: int | None = None
    query_block_rows: int = 1024


@dataclass(frozen=True)
class BucketingConfig:
    method: str = "kmeans"
    k: int | None = None
    m: int = 2
    margin: float | None = 0.3
    rounds: int | None = None
    points_per_centroid: int = 64
    max_train_rows: int = 262144
    kmeans_iterations: int = 10
    training: str = "auto"
    merge_centroids: float | None = 0.7
    seed: int = 0
    assign: str = "auto"
    hnsw_min_k: int = 8192


@dataclass(frozen=True)
class GroupConfig:
    max_rounds: int = 60
    checkpoint_every: int = 1
    local_edges: int = 2_000_000


@dataclass(frozen=True)
class EstimateConfig:
    sample_rows: int = 256


@dataclass(frozen=True)
class KeepConfig:
    expression: str | None = None
    order: str = "max"


@dataclass(frozen=True)
class CaptionsConfig:
    policy: str = "ignore"
    column: str | None = "auto"
    shingles: str = "chars"
    shingle_size: int = 4
    num_perm: int = 128
    same_caption: float = 0.7
    max_merged: int = 100


@dataclass(frozen=True)
class AuditConfig:
    queries_uri: str | None = None
    queries_format: str = "auto"
    exclude: bool = False
    top_matches: int = 50
    max_queries: int = 200000
    baseline_rows: int = 10000


@dataclass(frozen=True)
class SparkConfig:
    master: str = "local[*]"
    driver_memory: str = "4g"
    conf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StorageConfig:
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_attempts: int = 8


@dataclass(frozen=True)
class RunConfig:
    work_dir: str | None = None
    keep_work: bool = False
    log_level: str = "INFO"
    claim_timeout: float = 600.0
    take_over: bool = False


@dataclass(frozen=True)
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    bucketing: BucketingConfig = field(default_factory=BucketingConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    keep: KeepConfig = field(default_factory=KeepConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, overrides: dict[str, Any]) -> JobConfig:
        """A copy with dotted-key overrides applied and validated."""
        merged = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(merged, key, value)
        return from_dict(merged)

    @property
    def work_uri(self) -> str:
        if self.run.work_dir:
            return self.run.work_dir
        return self.output.uri.rstrip("/") + "/_work"


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    if not name or section not in tree or not isinstance(tree[section], dict):
        raise ConfigError(f"unknown config key {key!r}; keys look like section.name, sections: {sorted(tree)}")
    if name not in tree[section] and section != "spark":
        raise ConfigError(f"unknown config key {key!r}; {section} has {sorted(tree[section])}")
    if section == "spark" and name.startswith("conf."):
        tree[section]["conf"] = {**tree[section]["conf"], name[len("conf."):]: str(value)}
    else:
        tree[section][name] = value


def _coerce(section: str, name: str, hint: Any, value: Any) -> Any:
    """Check (and gently coerce) one value against its annotated type."""
    where = f"{section}.{name}"
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be null")
    origin = typing.get_origin(base)
    if origin is list:
        if isinstance(value, str):  # "0.90,0.92" from the command line
            value = [yaml.safe_load(item) for item in value.split(",") if item.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item_hint = typing.get_args(base)[0]
        return [_coerce(section, name, item_hint, item) for item in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")  # pragma: no cover


def from_dict(tree: dict[str, Any]) -> JobConfig:
    """Build and validate a JobConfig from a (possibly partial) nested dict."""
    sections: dict[str, Any] = {}
    hints = typing.get_type_hints(JobConfig)
    unknown = set(tree) - set(hints)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; sections: {sorted(hints)}")
    for section, section_type in hints.items():
        given = tree.get(section) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        field_hints = typing.get_type_hints(section_type)
        bad = set(given) - set(field_hints)
        if bad:
            names = sorted(f"{section}.{b}" for b in bad)
            raise ConfigError(f"unknown config key(s) {names}; {section} has {sorted(field_hints)}")
        values = {name: _coerce(section, name, field_hints[name], given[name]) for name in given}
        sections[section] = section_type(**values)
    config = JobConfig(**sections)
    validate(config)
    return config


def validate(config: JobConfig) -> None:
    """Value checks that types alone do not catch."""
    checks = [
        (config.input.format in FORMATS, f"input.format must be one of {FORMATS}"),
        (config.output.pairs in PAIR_OUTPUTS, f"output.pairs must be one of {PAIR_OUTPUTS}"),
        (config.bucketing.method in BUCKETING_METHODS, f"bucketing.method must be one of {BUCKETING_METHODS}"),
        (config.bucketing.assign in ("auto", "flat", "hnsw"), "bucketing.assign must be auto, flat or hnsw"),
        (config.bucketing.training in ("auto", "flat", "two_level"), "bucketing.training must be auto, flat or two_level"),
        (config.bucketing.hnsw_min_k >= 1, "bucketing.hnsw_min_k must be >= 1"),
        (config.keep.order in ("max", "min"), "keep.order must be max or min"),
        (config.input.binary_dtype in ("float16", "float32"), "input.binary_dtype must be float16 or float32"),
        (0.0 < config.search.threshold <= 1.0, "search.threshold must be in (0, 1]"),
        (all(config.search.threshold <= t <= 1.0 for t in config.search.thresholds),
         f"search.thresholds must all lie in [search.threshold, 1] = [{config.search.threshold}, 1] (one search at "
         "search.threshold serves every higher threshold); lower search.threshold (--threshold) to calibrate below it"),
        (config.bucketing.rounds is None or config.bucketing.rounds >= 1, "bucketing.rounds must be >= 1"),
        (config.input.on_bad_shard in ("fail", "skip"), "input.on_bad_shard must be fail or skip"),
        (0.0 <= config.input.max_rejected_fraction <= 1.0, "input.max_rejected_fraction must be in [0, 1]"),
        (config.captions.policy in CAPTION_POLICIES, f"captions.policy must be one of {CAPTION_POLICIES}"),
        (config.captions.shingles in ("chars", "words"), "captions.shingles must be chars or words"),
        (config.captions.shingle_size >= 1, "captions.shingle_size must be >= 1"),
        (8 <= config.captions.num_perm <= 1024, "captions.num_perm must be in [8, 1024]"),
        (0.0 < config.captions.same_caption <= 1.0, "captions.same_caption must be in (0, 1]"),
        (config.captions.max_merged >= 1, "captions.max_merged must be >= 1"),
        (config.audit.queries_format in FORMATS, f"audit.queries_format must be one of {FORMATS}"),
        (config.audit.top_matches >= 0 and config.audit.max_queries >= 1 and config.audit.baseline_rows >= 0,
         "audit.top_matches and audit.baseline_rows must be >= 0, audit.max_queries >= 1"),
        (config.storage.s3_attempts >= 1, "storage.s3_attempts must be >= 1"),
        (config.run.claim_timeout > 0, "run.claim_timeout must be > 0"),
        (config.input.chunk_rows >= 1, "input.chunk_rows must be >= 1"),
        (config.input.dim is None or config.input.dim >= 1, "input.dim must be >= 1"),
        (config.bucketing.k is None or config.bucketing.k >= 1, "bucketing.k must be >= 1"),
        (config.bucketing.m >= 1, "bucketing.m must be >= 1"),
        (config.bucketing.margin is None or config.bucketing.margin >= 0, "bucketing.margin must be >= 0 or null"),
        (config.bucketing.merge_centroids is None or config.bucketing.merge_centroids >= 0,
         "bucketing.merge_centroids must be >= 0 or null"),
        (config.bucketing.points_per_centroid >= 1, "bucketing.points_per_centroid must be >= 1"),
        (config.bucketing.max_train_rows >= 1, "bucketing.max_train_rows must be >= 1"),
        (config.bucketing.kmeans_iterations >= 1, "bucketing.kmeans_iterations must be >= 1"),
        (config.search.max_task_rows is None or config.search.max_task_rows >= 2, "search.max_task_rows must be >= 2"),
        (config.search.pack_rows is None or config.search.pack_rows >= 0, "search.pack_rows must be >= 0"),
        (config.search.query_block_rows >= 1, "search.query_block_rows must be >= 1"),
        (config.group.max_rounds >= 1, "group.max_rounds must be >= 1"),
        (config.group.checkpoint_every >= 1, "group.checkpoint_every must be >= 1"),
        (config.group.local_edges >= 1, "group.local_edges must be >= 1"),
        (config.estimate.sample_rows >= 0, "estimate.sample_rows must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value: ``bucketing.m=3``, ``keep.expression=width*height``."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Defaults, then an optional YAML file, then dotted overrides."""
    config = JobConfig()
    if config_file is not None:
        try:
            tree = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise ConfigError(f"cannot read {config_file}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{config_file} is not a text file (expected YAML)") from None
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(f"{config_file} is not valid YAML{line}: {getattr(error, 'problem', None) or error}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{config_file}: expected a mapping of sections, like conf/default.yaml")
        base = config.to_dict()
        for section, values in tree.items():
            if section in base and isinstance(values, dict) and isinstance(base[section], dict):
                base[section].update(values)
            else:
                base[section] = values
        config = from_dict(base)
    if overrides:
        config = config.replace(overrides)
    return config

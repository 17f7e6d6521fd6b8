"""The configuration object: defaults documented in conf/default.yaml, overrides, validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dedup_spark import config

REPO = Path(__file__).resolve().parent.parent


def test_defaults_equal_conf_default_yaml():
    documented = yaml.safe_load((REPO / "conf" / "default.yaml").read_text())
    assert documented == config.JobConfig().to_dict()


def test_every_knob_has_a_comment_in_default_yaml():
    lines = (REPO / "conf" / "default.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        if line.startswith("  ") and not line.strip().startswith("#") and ":" in line:
            assert lines[index - 1].strip().startswith("#"), f"undocumented knob: {line.strip()}"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bucketing:\n  m: 3\nsearch:\n  threshold: 0.9\n")
    loaded = config.load(path, {"search.threshold": 0.97, "spark.conf.spark.sql.shuffle.partitions": 4})
    assert loaded.bucketing.m == 3 and loaded.search.threshold == 0.97
    assert loaded.spark.conf == {"spark.sql.shuffle.partitions": "4"}


@pytest.mark.parametrize("overrides,message", [
    ({"bucketing.nope": 1}, "unknown config key"),
    ({"nope.m": 1}, "unknown config key"),
    ({"bucketing.m": 0}, "bucketing.m"),
    ({"bucketing.m": "two"}, "must be an integer"),
    ({"search.threshold": 1.5}, "threshold"),
    ({"output.pairs": "some"}, "output.pairs"),
    ({"input.format": "csv"}, "input.format"),
])
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, overrides)


def test_parse_override_reads_yaml_values():
    assert config.parse_override("bucketing.k=128") == ("bucketing.k", 128)
    assert config.parse_override("keep.expression=width * height") == ("keep.expression", "width * height")
    assert config.parse_override("bucketing.k=null") == ("bucketing.k", None)


def test_cli_reports_configuration_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "dedup.py"), "--input", str(tmp_path),
                             "--output", str(tmp_path / "o"), "--set", "bucketing.m=0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "bucketing.m must be >= 1" in result.stderr and "Traceback" not in result.stderr


def test_k_minimises_the_cost_model_with_flat_training_and_without_it():
    from dedup_spark import bucket

    def cost(k: int, rows: int, m: int, training: int) -> float:
        # Multiply-adds over d: assignment N*K, k-means training T*K^2, in-bucket search m^2 N^2 / (2K).
        return rows * k + training * k * k + (m * rows) ** 2 / (2 * k)

    for rows in (20_000, 100_000, 1_000_000, 8_000_000):
        for m in (1, 2, 3):
            for overrides, training in (({}, 640), ({"bucketing.kmeans_iterations": 5}, 320),
                                        ({"bucketing.training": "two_level"}, 0), ({"bucketing.method": "lsh"}, 0)):
                settings = config.load(None, {"bucketing.m": m, **overrides})
                k = bucket.choose_k(rows, settings)
                best = min(range(max(1, k // 2), 2 * k + 2), key=lambda c: cost(c, rows, m, training))
                flat = training and best * settings.bucketing.points_per_centroid <= settings.bucketing.max_train_rows
                if flat or not training:
                    # Against a search over whole K: within one bucket of the cost model's minimum.
                    assert abs(k - min(best, rows // 8)) <= 1, (rows, m, overrides, k, best)
                else:
                    # A flat sample would not fit max_train_rows: training is two-level and the plain optimum holds.
                    assert k == round(m * (rows / 2) ** 0.5), (rows, m, overrides, k)
    # The training term matters at bench sizes and fades with N.
    defaults = config.JobConfig()
    assert bucket.choose_k(1_000_000, defaults) == 950 and bucket.choose_k(100_000, defaults) == 226
    assert bucket.choose_k(2_300_000_000, defaults) == round(2 * (2_300_000_000 / 2) ** 0.5)
    assert bucket.choose_k(1_000_000, config.load(None, {"bucketing.k": 1234})) == 1234


def test_a_k_means_sample_capped_below_points_per_centroid_is_named_only_when_the_cap_binds():
    from dedup_spark import bucket

    defaults = config.JobConfig()
    # 1M rows: K=950 and 64 x K = 60,800 rows fit under max_train_rows.
    assert bucket.starved_training(1_000_000, defaults) is None
    # Few rows: the data, not the cap, limits the sample; nothing to raise.
    assert bucket.starved_training(2_000, defaults) is None
    # LAION: a flat sample would be starved, so auto trains two-level and nothing is starved; the cells'
    # draw holds points_per_centroid rows a centroid. Asked for flat, the job says what it costs.
    assert bucket.training_method(2_300_000_000, defaults) == "two_level"
    assert bucket.starved_training(2_300_000_000, defaults) is None
    k = bucket.choose_k(2_300_000_000, defaults)
    assert bucket.cell_fraction(2_300_000_000, defaults) == pytest.approx(1.3 * 64 * k / 2_300_000_000)
    flat = config.load(None, {"bucketing.training": "flat"})
    flat_k = bucket.choose_k(2_300_000_000, flat)
    laion = bucket.starved_training(2_300_000_000, flat)
    assert laion is not None and f"K={flat_k:,}" in laion and f"{262_144 / flat_k:.1f} per centroid" in laion
    raised = config.load(None, {"bucketing.max_train_rows": 64 * flat_k, "bucketing.training": "flat"})
    assert bucket.starved_training(2_300_000_000, raised) is None
    assert bucket.training_method(2_300_000_000, config.load(None, {"bucketing.max_train_rows": 64 * k})) == "flat"
    assert bucket.training_method(1_000_000, defaults) == "flat" and bucket.cell_fraction(1_000_000, defaults) == 0
    assert bucket.starved_training(2_300_000_000, config.load(None, {"bucketing.method": "lsh"})) is None
    # One bucket (or m >= K): nothing is trained, so nothing is starved, whatever the cap.
    one_bucket = config.load(None, {"bucketing.k": 1, "bucketing.max_train_rows": 10})
    assert bucket.starved_training(1_000_000, one_bucket) is None
    assert bucket.starved_training(1_000_000, config.load(None, {"bucketing.k": 100, "bucketing.max_train_rows": 10,
                                                                 "bucketing.training": "flat"}))

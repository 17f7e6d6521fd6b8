"""Never lose or mix data: aliased paths, concurrent runs, interrupted publishes, --overwrite,
cross-filesystem work prefixes, identical rows at threshold 1.0, shards lacking a column,
unreadable config files, and the smaller edges of the command line.

Each case asserts that the input is intact, that the output is either one run's complete result
or nothing, and that an error is one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import make_sample, output_groups, read_table, run_job
from oracle import brute_force_pairs, groups_of, normalize

from dedup_spark import storage
from dedup_spark.faults import InjectedFault
from dedup_spark.publish import CLAIM, PUBLISHING, SUCCESS, Claim, OutputError, check_locations

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "jobs"))
import dedup as cli  # noqa: E402

from dedup_spark.pipeline import ENTRIES  # noqa: E402


def fingerprint(root: Path) -> dict[str, str]:
    """Every file under root with its content hash: an input must come out of every run as it went in."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, *args: str) -> int:
    """jobs/dedup.py in process, with what earlier tests left on the captured stderr cleared."""
    capsys.readouterr()
    return cli.main(list(args))


def one_line_error(capsys, code: int, expected_code: int = 2) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code and len(lines) == 1, lines
    assert lines[0].startswith("dedup.py: ") and "Traceback" not in lines[0], lines
    return lines[0]


def assert_complete_result(out: Path, work_kept: bool = False) -> dict:
    """The output is one run's complete result: _SUCCESS lists exactly the files there (beside the
    job's own _CLAIM/_PUBLISHING bookkeeping, which must be gone), and each table holds the rows
    its _table.json says."""
    listed = set(json.loads((out / SUCCESS).read_text())["files"])
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {SUCCESS}
    job_files = {name for name in present if name.split("/")[0] in ENTRIES}
    assert job_files == listed
    assert not (out / CLAIM).exists() and not (out / PUBLISHING).exists()
    assert (out / "_work").exists() == work_kept
    for table in [name for name in ("duplicates", "rejected", "pairs") if (out / name).exists()]:
        manifest = json.loads((out / table / "_table.json").read_text())
        assert read_table(out / table).num_rows == manifest["rows"], table
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    directory = tmp_path_factory.mktemp("integrity")
    return make_sample(directory, rows=1500, dim=16, seed=81, shard_rows=300)


# 1. Aliased paths -------------------------------------------------------------------------

def test_a_symlinked_output_that_holds_the_input_is_refused_and_the_input_survives(small, tmp_path, capsys):
    _, root = small
    parent = tmp_path / "par"
    shutil.copytree(root, parent / "in")
    (tmp_path / "parlink").symlink_to(parent)
    before = fingerprint(parent)
    code = run_cli(capsys, *["--input", str(parent / "in"), "--output", str(tmp_path / "parlink"), "--overwrite"])
    assert "is inside the output" in one_line_error(capsys, code)
    assert fingerprint(parent) == before


@pytest.mark.parametrize("alias", ["dotdot", "file-uri", "trailing-slash", "work-dir-symlink"])
def test_every_spelling_of_an_overlapping_location_is_refused(tmp_path, alias):
    data = tmp_path / "data"
    (data / "in").mkdir(parents=True)
    (tmp_path / "link").symlink_to(data / "in")
    output, work = str(tmp_path / "out"), str(tmp_path / "out" / "_work")
    if alias == "dotdot":
        output = str(data / "in" / "sub" / ".." / "..")
    elif alias == "file-uri":
        output = f"file://{data}/in/x"
    elif alias == "trailing-slash":
        output = f"{data}/in/"
    else:
        work = str(tmp_path / "link" / "work")
    with pytest.raises(OutputError):
        check_locations([str(data / "in")], output, work, True, ENTRIES)


def test_object_store_locations_compare_by_bucket_and_normalised_key():
    assert storage.canonical("s3://bucket/a//b/../c/") == "s3://bucket/a/c"
    assert storage.is_within("s3a://bucket/a/c/d", "s3://bucket/a/c/")
    assert not storage.is_within("s3://bucket/a/cd", "s3://bucket/a/c")
    assert not storage.is_within("s3://other/a/c", "s3://bucket/a/c")


# 2. Two runs on one output ------------------------------------------------------------------

def test_a_second_run_on_a_claimed_output_refuses_in_one_line_and_the_first_publishes_whole(
        spark, small, tmp_path, capsys):
    """Run A, a separate process, is held after its estimate stage; run B on the same output with
    another input must refuse naming A, and A must then publish its complete result."""
    sample, root = small
    other, other_root = make_sample(tmp_path, rows=700, dim=24, seed=82, shard_rows=350)
    out, hold = tmp_path / "out", tmp_path / "hold"
    before = fingerprint(root)
    faults = {"hold_after_stage": "estimate", "hold_file": str(hold)}
    env = {**os.environ, "DEDUP_SPARK_TEST_FAULTS": json.dumps(faults), "PYSPARK_PYTHON": sys.executable}
    first = subprocess.Popen([sys.executable, str(REPO / "jobs" / "dedup.py"), "--input", str(root), "--output",
                              str(out), "--set", "spark.master=local[1]", "--set", "estimate.sample_rows=0"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not Path(str(hold) + ".reached").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        holder = json.loads((out / CLAIM).read_text())
        code = run_cli(capsys, *["--input", str(other_root), "--output", str(out), "--overwrite"])
        line = one_line_error(capsys, code)
        assert "in use by run" in line and holder["run_id"] in line and str(holder["pid"]) in line
        hold.touch()
        _, errors = first.communicate(timeout=300)
    finally:
        hold.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, errors
    report = assert_complete_result(out)
    assert report["input"]["uri"] == str(root) and report["input"]["dim"] == 16
    assert sorted(p.name for p in (out / "dedup" / "img_emb").iterdir()) == sorted(
        p.name for p in (root / "img_emb").iterdir())
    assert fingerprint(root) == before


def test_a_run_that_loses_its_claim_stops_and_publishes_nothing(spark, small, tmp_path):
    _, root = small
    out, hold = tmp_path / "out", tmp_path / "hold"
    failure: list[BaseException] = []

    def held_run() -> None:
        try:
            run_job(spark, root, out, faults={"hold_after_stage": "search", "hold_file": str(hold)})
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            failure.append(error)

    thread = threading.Thread(target=held_run)
    thread.start()
    deadline = time.monotonic() + 300
    while not Path(str(hold) + ".reached").exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    # Another run took the output over (--take-over): the held run must notice before its next stage.
    (out / CLAIM).write_text(json.dumps({"run_id": "intruder", "host": "elsewhere", "pid": 1,
                                         "heartbeat_unix": time.time()}))
    hold.touch()
    thread.join(300)
    assert failure and isinstance(failure[0], OutputError) and "lost its claim" in str(failure[0])
    assert not (out / SUCCESS).exists() and not (out / "dedup").exists()


def test_a_dead_holders_claim_is_taken_over_and_a_live_one_only_when_asked(spark, small, tmp_path):
    _, root = small
    out = tmp_path / "out"
    out.mkdir()
    # A run on this host whose process has ended: taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / CLAIM).write_text(json.dumps({"run_id": "crashed", "host": socket.gethostname(),
                                         "pid": int(dead.stdout), "heartbeat_unix": time.time()}))
    run_job(spark, root, out, estimate__sample_rows=0)
    assert_complete_result(out)
    # A run on another host with a fresh heartbeat: refused, unless --take-over.
    (out / CLAIM).write_text(json.dumps({"run_id": "remote", "host": "node-7", "pid": 4242,
                                         "heartbeat_unix": time.time()}))
    with pytest.raises(OutputError, match="in use by run remote on host node-7"):
        run_job(spark, root, out, output__overwrite=True)
    assert json.loads((out / CLAIM).read_text())["run_id"] == "remote", "a refused run leaves the claim alone"
    run_job(spark, root, out, output__overwrite=True, run__take_over=True)
    assert_complete_result(out)
    # ... or once its heartbeat is older than run.claim_timeout.
    (out / CLAIM).write_text(json.dumps({"run_id": "remote", "host": "node-7", "pid": 4242,
                                         "heartbeat_unix": time.time() - 5}))
    with pytest.raises(OutputError, match="in use"):
        Claim([str(out)], timeout=60.0).acquire()
    with Claim([str(out)], timeout=2.0) as claim:
        assert json.loads((out / CLAIM).read_text())["run_id"] == claim.run_id
    assert not (out / CLAIM).exists()


# 3. An interrupted publish --------------------------------------------------------------------

def test_an_interrupted_publish_is_redone_by_the_next_run_even_after_the_input_changed(spark, tmp_path):
    sample, root = make_sample(tmp_path, rows=1200, dim=16, seed=83, shard_rows=100)
    out = tmp_path / "out"
    settings = {"run__keep_work": True, "estimate__sample_rows": 0}
    with pytest.raises(InjectedFault):
        run_job(spark, root, out, faults={"fail_after_published_files": 5}, **settings)
    assert (out / PUBLISHING).exists() and not (out / SUCCESS).exists()
    # A new shard arrives: every stage is recomputed, under new part names.
    extra, extra_root = make_sample(tmp_path, rows=100, dim=16, seed=84, shard_rows=100)
    shutil.copy(extra_root / "img_emb" / "img_emb_0.npy", root / "img_emb" / "img_emb_12.npy")
    shutil.copy(extra_root / "metadata" / "metadata_0.parquet", root / "metadata" / "metadata_12.parquet")
    report = run_job(spark, root, out, **settings)
    assert report["stages_reused"] == []
    assert report["accounting"]["input_rows"] == 1300
    assert_complete_result(out, work_kept=True)
    clean = tmp_path / "clean"
    run_job(spark, root, clean, estimate__sample_rows=0)
    assert output_groups(out) == output_groups(clean)
    # Interrupted again, then rerun unchanged: the same publish is finished.
    with pytest.raises(InjectedFault):
        run_job(spark, root, out, output__overwrite=True, faults={"fail_after_published_files": 3}, **settings)
    report = run_job(spark, root, out, output__overwrite=True, **settings)
    assert len(report["stages_reused"]) == 8
    assert_complete_result(out, work_kept=True)
    assert output_groups(out) == output_groups(clean)


# 4. --overwrite removes only what the job published ------------------------------------------

def test_overwrite_keeps_files_the_job_did_not_write_and_foreign_job_names_are_refused(spark, small, tmp_path,
                                                                                       capsys):
    _, root = small
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (out / "notes.txt").write_text("keep me")
    run_job(spark, root, out, output__overwrite=True, output__pairs="all")
    run_job(spark, root, out, output__overwrite=True, output__pairs="none")
    assert (out / "notes.txt").read_text() == "keep me" and (out / "photos" / "cat.jpg").exists()
    assert not (out / "pairs").exists(), "the first run's pairs/ belongs to the replaced result"
    assert_complete_result(out)
    # A folder of the job's name that no run published: refused before any work, kept as it is.
    foreign = tmp_path / "foreign"
    (foreign / "duplicates").mkdir(parents=True)
    (foreign / "duplicates" / "mine.parquet").write_bytes(b"user data")
    code = run_cli(capsys, *["--input", str(root), "--output", str(foreign), "--overwrite"])
    assert "which no run of this job published" in one_line_error(capsys, code)
    assert (foreign / "duplicates" / "mine.parquet").read_bytes() == b"user data"


# 5. A work prefix on another filesystem -----------------------------------------------------

def test_a_work_prefix_on_another_filesystem_publishes_by_copying(spark, small, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    _, root = small
    work = shm / f"dedup-work-{os.getpid()}-{time.monotonic_ns()}"
    try:
        report = run_job(spark, root, tmp_path / "out", run__work_dir=str(work))
        assert report["accounting"]["balanced"]
        assert_complete_result(tmp_path / "out")
        assert not work.exists()
        reference = run_job(spark, root, tmp_path / "reference")
        assert output_groups(tmp_path / "out") == output_groups(tmp_path / "reference")
        assert reference["accounting"] == report["accounting"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_moving_a_file_across_filesystems_copies_and_deletes(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    source = shm / f"dedup-move-{os.getpid()}-{time.monotonic_ns()}.bin"
    source.write_bytes(b"x" * 100_000)
    storage.move(str(source), str(tmp_path / "a" / "b.bin"))
    assert not source.exists() and (tmp_path / "a" / "b.bin").read_bytes() == b"x" * 100_000


# 6. Identical rows at threshold 1.0 ---------------------------------------------------------

def test_threshold_one_finds_every_group_of_identical_rows(spark, tmp_path):
    sample, root = make_sample(tmp_path, rows=2000, dim=32, seed=85)
    stored = normalize(sample.embeddings)
    out = tmp_path / "out"
    run_job(spark, root, out, search__threshold=1.0)
    identical = brute_force_pairs(stored, 1.0)
    found = output_groups(out)
    assert found == groups_of(identical)
    assert len({group for group in found.values()}) >= 20  # the sample plants bit-identical copies
    assert read_table(out / "duplicates").column("similarity_to_kept").to_numpy().max() <= 1.0


# 7. A metadata shard lacking a column ----------------------------------------------------------

def _drop_column(path: Path, column: str) -> None:
    table = pq.read_table(path)
    pq.write_table(table.drop_columns([column]), path)


def test_a_shard_without_an_optional_column_reads_it_as_nulls(spark, tmp_path):
    sample, root = make_sample(tmp_path, rows=900, dim=16, seed=86, shard_rows=300)
    _drop_column(root / "metadata" / "metadata_1.parquet", "url")
    _drop_column(root / "metadata" / "metadata_2.parquet", "caption")
    report = run_job(spark, root, tmp_path / "out", captions__column="auto", estimate__sample_rows=20)
    assert report["accounting"]["balanced"] and report["largest_groups"]
    clean, clean_root = make_sample(tmp_path / "clean", rows=900, dim=16, seed=86, shard_rows=300)
    run_job(spark, clean_root, tmp_path / "clean-out", captions__column="auto", estimate__sample_rows=20)
    assert output_groups(tmp_path / "out") == output_groups(tmp_path / "clean-out")


@pytest.mark.parametrize("case", ["keep expression", "id column"])
def test_a_shard_without_a_required_column_is_one_line_naming_it(tmp_path, capsys, case):
    if case == "keep expression":
        sample, root = make_sample(tmp_path, rows=900, dim=16, seed=87, shard_rows=300)
        bad = root / "metadata" / "metadata_2.parquet"
        _drop_column(bad, "width")
        extra = ["--set", "keep.expression=width * height"]
    else:
        sample, root = make_sample(tmp_path, rows=900, dim=16, seed=87, shard_rows=300, fmt="parquet",
                                   id_column="photo_id")
        bad = sorted(root.glob("*.parquet"))[1]
        _drop_column(bad, "photo_id")
        extra = ["--set", "input.id_column=photo_id"]
    code = run_cli(capsys, *["--input", str(root), "--output", str(tmp_path / "out"), *extra])
    line = one_line_error(capsys, code)
    assert str(bad) in line and ("width" in line or "photo_id" in line)
    assert not (tmp_path / "out" / "dedup").exists()


# 8. Config files that are not YAML --------------------------------------------------------------

@pytest.mark.parametrize("content", [b"bucketing: [unclosed\n", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", b"- a list\n"])
def test_a_config_file_that_is_not_yaml_is_a_one_line_configuration_error(tmp_path, capsys, content):
    path = tmp_path / "settings.yaml"
    path.write_bytes(content)
    code = run_cli(capsys, *["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--config", str(path)])
    line = one_line_error(capsys, code)
    assert "configuration error" in line and str(path) in line


def test_a_missing_config_file_is_a_one_line_configuration_error(tmp_path, capsys):
    code = run_cli(capsys, *["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--config",
                     str(tmp_path / "absent.yaml")])
    assert "cannot read" in one_line_error(capsys, code)


# 9. The smaller edges ----------------------------------------------------------------------------

def test_k_far_above_the_rows_is_warned_about(spark, small, tmp_path, caplog):
    _, root = small
    caplog.set_level("WARNING", logger="dedup_spark")
    run_job(spark, root, tmp_path / "out", bucketing__k=50_000)
    assert any("far above what 1500 valid rows support" in r.getMessage() and "clamped" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("target", ["regular file", "proc"])
def test_an_unusable_output_is_one_line_before_spark_starts(small, tmp_path, target):
    _, root = small
    if target == "regular file":
        output = tmp_path / "out.txt"
        output.write_text("not a directory")
    else:
        output = Path("/proc/dedup-output")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    started = subprocess.run([sys.executable, str(REPO / "jobs" / "dedup.py"), "--input", str(root), "--output",
                              str(output)], env=env, capture_output=True, text=True, timeout=300)
    lines = started.stderr.strip().splitlines()
    assert started.returncode == 2 and len(lines) == 1 and lines[0].startswith("dedup.py: "), started.stderr
    assert "Traceback" not in started.stderr and "SparkContext" not in started.stderr


def test_audit_queries_of_another_dimension_are_one_line_naming_both(small, tmp_path, capsys):
    _, root = small
    (tmp_path / "queries").mkdir()
    np.save(tmp_path / "queries" / "q.npy", np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32))
    import audit as audit_cli

    capsys.readouterr()
    code = audit_cli.main(["--queries", str(tmp_path / "queries"), "--train", str(root), "--output",
                           str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "24-d" in lines[0] and "16-d" in lines[0] and "input.dim" not in lines[0]


def test_a_claim_read_while_its_holder_rewrites_it_is_still_the_holders(tmp_path):
    """The heartbeat rewrites the claim file in place; a verify that reads it meanwhile can see it
    truncated or torn, and must read again rather than stop the run as if another had taken it."""
    location = str(tmp_path / "out")
    with Claim([location]) as claim:
        uri = storage.join(location, CLAIM)
        stop = threading.Event()

        def rewrite() -> None:
            lengths = 0
            while not stop.is_set():
                lengths += 1  # payloads of changing length, as heartbeat timestamps make them
                storage.write_bytes(uri, claim._payload()[:-1] + b" " * (lengths % 7) + b"}")

        writer = threading.Thread(target=rewrite)
        writer.start()
        try:
            for _ in range(300):
                claim.verify()
        finally:
            stop.set()
            writer.join()

"""S3 in and out through a real S3 endpoint on 127.0.0.1 (moto's threaded server),
on Spark local mode and on a real standalone cluster started with spark-class."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_sample
from oracle import brute_force_pairs, exact_jaccard, groups_of, normalize

REPO = Path(__file__).resolve().parent.parent
ACCESS_KEY = "AKIADEDUPSPARKTEST42"
SECRET_KEY = "dedup-spark-test-secret-0f9e8d7c6b5a"
BUCKET = "datasets"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": endpoint,
           "AWS_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                          region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield env, client
    server.stop()


@pytest.fixture(scope="module")
def s3_sample(s3_endpoint, tmp_path_factory):
    env, client = s3_endpoint
    sample, root = make_sample(tmp_path_factory.mktemp("s3"), rows=3000, dim=32, seed=21)
    for path in root.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"laion/{path.relative_to(root)}")
    return sample


def download(client, prefix: str, target: Path) -> list[Path]:
    files = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/"):
                continue
            local = target / item["Key"][len(prefix):].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(BUCKET, item["Key"], str(local))
            files.append(local)
    return files


def submit(env: dict, *args: str, master: str = "local[2]") -> subprocess.CompletedProcess:
    spark_submit = str(Path(sys.executable).parent / "spark-submit")
    full_env = {**os.environ, **env, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
                "SPARK_LOCAL_IP": "127.0.0.1"}
    command = [spark_submit, "--master", master, "--conf", "spark.ui.enabled=false",
               "--conf", f"spark.pyspark.python={sys.executable}", *args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=900)


def check_outputs(local_out: Path, sample) -> dict:
    oracle = brute_force_pairs(normalize(sample.embeddings), 0.95)
    duplicates = pq.read_table(sorted((local_out / "duplicates").glob("part-*.parquet")))
    groups = dict(zip(duplicates.column("row_id").to_pylist(), duplicates.column("group_id").to_pylist()))
    assert groups == groups_of(oracle)
    pairs = pq.read_table(sorted((local_out / "pairs").glob("part-*.parquet")))
    assert set(zip(pairs.column("row_id_a").to_pylist(), pairs.column("row_id_b").to_pylist())) == set(oracle)
    report = json.loads((local_out / "report.json").read_text())
    assert report["accounting"]["balanced"]
    kept = sum(pq.read_metadata(p).num_rows for p in (local_out / "dedup" / "metadata").glob("*.parquet"))
    assert kept == report["accounting"]["kept_rows"] == len(sample.embeddings) - sum(1 for r, g in groups.items() if r != g)
    success = json.loads((local_out / "_SUCCESS").read_text())
    assert "report.json" in success["files"] and all((local_out / f).exists() for f in success["files"])
    return report


def assert_no_credentials(texts: list[str], files: list[Path]) -> None:
    for text in texts:
        assert ACCESS_KEY not in text and SECRET_KEY not in text
    for path in files:
        payload = path.read_bytes()
        assert ACCESS_KEY.encode() not in payload and SECRET_KEY.encode() not in payload, path


@pytest.fixture(scope="module")
def clean_s3_run(s3_endpoint, s3_sample, tmp_path_factory):
    """One spark-submit run from S3 to S3, downloaded: the reference for the fault cases."""
    env, client = s3_endpoint
    result = submit(env, str(REPO / "jobs" / "dedup.py"), "--input", f"s3://{BUCKET}/laion",
                    "--output", f"s3://{BUCKET}/runs/local", "--set", "bucketing.k=1", "--set", "output.pairs=all")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path_factory.mktemp("clean-s3") / "out"
    return result, download(client, "runs/local/", out), out


def test_s3_in_and_out_with_spark_submit(s3_endpoint, s3_sample, clean_s3_run):
    env, _ = s3_endpoint
    result, files, out = clean_s3_run
    check_outputs(out, s3_sample)
    assert not any("_work" in str(p) for p in files), "the work prefix is removed after publishing"
    assert_no_credentials([result.stdout, result.stderr], files)
    assert f"rows in: {len(s3_sample.embeddings):,}" in result.stdout
    # Captions by default (policy ignore): every member's caption similarity to its kept row.
    duplicates = pq.read_table(sorted((out / "duplicates").glob("part-*.parquet"))).to_pylist()
    kept_of = {row["group_id"]: row["row_id"] for row in duplicates if row["is_kept"]}
    for row in duplicates:
        caption, kept_caption = s3_sample.captions[row["row_id"]], s3_sample.captions[kept_of[row["group_id"]]]
        exact = exact_jaccard(caption, kept_caption)
        assert abs(row["caption_similarity"] - exact) < 0.18 and row["caption_group"] is None, (row, exact)
    assert json.loads((out / "report.json").read_text())["captions"]["policy"] == "ignore"
    # One progress line per stage, with rows and seconds (spark-submit merges the
    # Python driver's stderr into its stdout).
    lines = (result.stdout + result.stderr).splitlines()
    for stage in ("read", "train", "assign", "search", "group", "estimate", "write"):
        assert any(f"stage {stage}:" in line and " s" in line and "rows" in line for line in lines), stage
    # A second run without --overwrite refuses to replace the published result, before starting Spark.
    again = subprocess.run([sys.executable, str(REPO / "jobs" / "dedup.py"), "--input", f"s3://{BUCKET}/laion",
                            "--output", f"s3://{BUCKET}/runs/local"], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def published_tables(out: Path) -> dict:
    """The outputs as comparable values (part files are named per run and attempt)."""
    import numpy as np

    values = {}
    for name in ("duplicates", "pairs", "rejected"):
        table = pq.read_table(sorted((out / name).glob("part-*.parquet")))
        values[name] = sorted(tuple(sorted(row.items())) for row in table.to_pylist())
    for path in sorted((out / "dedup").rglob("*.*")):
        key = str(path.relative_to(out))
        values[key] = np.load(path).tobytes() if path.suffix == ".npy" else pq.read_table(path).to_pylist()
    return values


def test_transient_s3_faults_leave_the_outputs_identical(s3_endpoint, s3_sample, clean_s3_run, tmp_path):
    from faultproxy import FaultProxy

    env, client = s3_endpoint
    with FaultProxy(env["AWS_ENDPOINT_URL"], fault_rate=0.02, seed=5) as proxy:
        result = submit({**env, "AWS_ENDPOINT_URL": proxy.url}, str(REPO / "jobs" / "dedup.py"),
                        "--input", f"s3://{BUCKET}/laion", "--output", f"s3://{BUCKET}/runs/faulty",
                        "--set", "bucketing.k=1", "--set", "output.pairs=all", master="local[2,4]")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert proxy.counts["slow_down"] >= 3 and proxy.counts["dropped"] >= 3, proxy.counts
    download(client, "runs/faulty/", tmp_path / "out")
    check_outputs(tmp_path / "out", s3_sample)
    assert published_tables(tmp_path / "out") == published_tables(clean_s3_run[2])


def test_persistent_s3_faults_fail_cleanly_and_publish_nothing(s3_endpoint, s3_sample):
    from faultproxy import FaultProxy

    env, client = s3_endpoint
    with FaultProxy(env["AWS_ENDPOINT_URL"], fault_rate=0.0, fail_all_after=120) as proxy:
        result = submit({**env, "AWS_ENDPOINT_URL": proxy.url}, str(REPO / "jobs" / "dedup.py"),
                        "--input", f"s3://{BUCKET}/laion", "--output", f"s3://{BUCKET}/runs/broken",
                        "--set", "bucketing.k=1", "--set", "storage.s3_attempts=2", master="local[2,2]")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    said = [line for line in output.splitlines() if line.startswith("dedup.py: ")]
    assert len(said) == 1, output[-5000:]
    assert "SlowDown" in said[0] or "storage error" in said[0] or "503" in said[0], said
    published = [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/broken/").get("Contents", [])]
    assert not any(key.endswith("_SUCCESS") or "/dedup/" in key and "/_work/" not in key for key in published), published


def test_unreachable_storage_and_bad_credentials_are_one_line_errors(s3_endpoint, s3_sample, monkeypatch, capsys):
    from moto import settings

    sys.path.insert(0, str(REPO / "jobs"))
    import dedup as cli

    from dedup_spark import storage

    env, _ = s3_endpoint
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage._filesystem.cache_clear()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    arguments = ["--input", f"s3://{BUCKET}/laion", "--output", f"s3://{BUCKET}/runs/never", "--set", "storage.s3_attempts=2"]
    assert cli.main(arguments) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # retry warnings, then the one-line error
    assert lines[-1].startswith("dedup.py: storage error: ") and not any("Traceback" in line for line in lines), lines
    monkeypatch.setenv("AWS_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks credentials
    storage._filesystem.cache_clear()
    assert cli.main(arguments) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("dedup.py: storage error: "), lines
    assert not any("transient storage error" in line for line in lines), "bad credentials are not retried"
    assert "ACCESS_DENIED" in lines[-1] or "InvalidAccessKeyId" in lines[-1] or "403" in lines[-1], lines
    assert "AKIANOTAREALKEY00000" not in lines[-1] and SECRET_KEY not in lines[-1]
    storage._filesystem.cache_clear()


@pytest.fixture
def standalone_cluster(tmp_path, s3_endpoint):
    """A Spark standalone master and one worker on 127.0.0.1, stopped whatever the outcome."""
    env, _ = s3_endpoint
    spark_class = str(Path(sys.executable).parent / "spark-class")
    master_port, master_ui, worker_ui = free_port(), free_port(), free_port()
    full_env = {**os.environ, **env, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
                "SPARK_WORKER_DIR": str(tmp_path / "worker"), "SPARK_LOG_DIR": str(tmp_path / "logs")}
    logs = tmp_path / "cluster-logs"
    logs.mkdir()
    processes = []
    try:
        processes.append(subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(master_port),
             "--webui-port", str(master_ui)],
            env=full_env, stdout=open(logs / "master.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
        master = f"spark://127.0.0.1:{master_port}"
        processes.append(subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "2",
             "--memory", "3g", "--webui-port", str(worker_ui), "--work-dir", str(tmp_path / "worker"), master],
            env=full_env, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{master_ui}/json/", timeout=5) as response:
                    state = json.load(response)
                if sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE") >= 1:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("standalone worker did not register: " + (logs / "worker.log").read_text()[-2000:])
            time.sleep(1)
        yield master, tmp_path
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def s3_parquet(s3_endpoint, tmp_path_factory):
    """Parquet shards (fixed-size float32 lists) on S3, and their sample."""
    env, client = s3_endpoint
    from dedup_spark.sample import SampleSpec, generate, write

    sample = generate(SampleSpec(rows=1500, dim=24, seed=22))
    local = tmp_path_factory.mktemp("pq") / "pq"
    write(sample, local, "parquet", shard_rows=500, dtype="float32", list_type="fixed_size_list")
    for path in local.glob("*.parquet"):
        client.upload_file(str(path), BUCKET, f"pq/{path.name}")
    return sample, local


def test_parquet_on_s3_on_a_standalone_cluster(s3_endpoint, s3_parquet, standalone_cluster, tmp_path):
    env, client = s3_endpoint
    sample, local = s3_parquet
    master, cluster_dir = standalone_cluster
    built = subprocess.run(["make", "-s", "zip"], cwd=REPO, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    result = submit(env, "--py-files", str(REPO / "dist" / "dedup_spark.zip"),
                    "--conf", "spark.executor.memory=2g", "--conf", "spark.driver.host=127.0.0.1",
                    str(REPO / "jobs" / "dedup.py"), "--input", f"s3://{BUCKET}/pq",
                    "--output", f"s3://{BUCKET}/runs/cluster", "--set", "bucketing.k=1", "--set", "output.pairs=all",
                    master=master)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    files = download(client, "runs/cluster/", out)
    oracle = brute_force_pairs(normalize(sample.embeddings.astype("float32")), 0.95)
    duplicates = pq.read_table(sorted((out / "duplicates").glob("part-*.parquet")))
    assert dict(zip(duplicates.column("row_id").to_pylist(), duplicates.column("group_id").to_pylist())) == groups_of(oracle)
    pairs = pq.read_table(sorted((out / "pairs").glob("part-*.parquet")))
    assert set(zip(pairs.column("row_id_a").to_pylist(), pairs.column("row_id_b").to_pylist())) == set(oracle)
    kept = pa.concat_tables([pq.read_table(p) for p in sorted((out / "dedup").glob("*.parquet"))])
    assert kept.num_rows == 1500 - sum(1 for r, g in groups_of(oracle).items() if r != g)
    assert pq.read_schema(out / "dedup" / "part_0.parquet") == pq.read_schema(local / "part_0.parquet")
    assert json.loads((out / "report.json").read_text())["accounting"]["balanced"]
    # The work ran on the cluster's executor, not in the driver.
    executor_logs = [p for p in (cluster_dir / "worker").rglob("stderr")]
    assert executor_logs, "no executor ran on the standalone worker"
    logs = [p.read_text(errors="replace") for p in executor_logs + list((cluster_dir / "cluster-logs").glob("*.log"))]
    assert_no_credentials([result.stdout, result.stderr, *logs], files)


def test_copy_and_move_on_s3(s3_endpoint, monkeypatch):
    """Publishing moves staged files, or copies them when the work prefix is kept (run.keep_work)."""
    from dedup_spark import storage

    env, client = s3_endpoint
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage._filesystem.cache_clear()
    try:
        payload = os.urandom(3 << 20)  # above one multipart chunk of some SDKs
        source = f"s3://{BUCKET}/copy-move/staged/part-0.parquet"
        storage.write_bytes(source, payload)
        storage.copy(source, f"s3://{BUCKET}/copy-move/out/copied.parquet")
        assert storage.read_bytes(source) == payload, "a copy keeps its source"
        assert storage.read_bytes(f"s3://{BUCKET}/copy-move/out/copied.parquet") == payload
        storage.move(source, f"s3://{BUCKET}/copy-move/out/moved.parquet")
        assert not storage.exists(source), "a move removes its source"
        assert storage.read_bytes(f"s3://{BUCKET}/copy-move/out/moved.parquet") == payload
    finally:
        storage._filesystem.cache_clear()


def test_a_claim_on_s3_is_created_exclusively_and_released(s3_endpoint, monkeypatch, tmp_path):
    """The S3 claim is a conditional PUT (If-None-Match: *): a second claimant is refused while the
    first holds it, and a work prefix on local disk publishes into S3 by copying."""
    from dedup_spark import storage
    from dedup_spark.publish import CLAIM, Claim, OutputError

    env, client = s3_endpoint
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage._filesystem.cache_clear()
    try:
        location = f"s3://{BUCKET}/claimed"
        assert storage.create_exclusive(f"{location}/probe", b"1") and not storage.create_exclusive(f"{location}/probe",
                                                                                                   b"2")
        assert storage.read_bytes(f"{location}/probe") == b"1", "the losing PUT must not overwrite"
        with Claim([location]) as first:
            with pytest.raises(OutputError, match=f"in use by run {first.run_id}"):
                Claim([location]).acquire()
            first.verify()
        assert not storage.exists(f"{location}/{CLAIM}")
        with Claim([location]) as second:
            assert json.loads(storage.read_bytes(f"{location}/{CLAIM}"))["run_id"] == second.run_id
        local = tmp_path / "staged.bin"
        local.write_bytes(b"local bytes")
        storage.move(str(local), f"{location}/from-local.bin")
        assert not local.exists() and storage.read_bytes(f"{location}/from-local.bin") == b"local bytes"
    finally:
        storage._filesystem.cache_clear()


def _cli_runs(env: dict, runs: list[list[str]]) -> tuple[list[int], str]:
    """``jobs/dedup.py`` runs one after another in one Python process (one JVM, local mode): their
    exit codes, and stderr with each run's lines."""
    script = (f"import sys; sys.path.insert(0, {str(REPO / 'jobs')!r}); import dedup\n"
              f"for arguments in {runs!r}:\n"
              "    print('EXIT', dedup.main(arguments), flush=True)\n")
    full_env = {**os.environ, **env, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=full_env, timeout=900)
    codes = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("EXIT ")]
    assert len(codes) == len(runs), done.stdout[-3000:] + done.stderr[-3000:]
    return codes, done.stderr


def test_incremental_runs_on_s3_chain_and_refuse_colliding_ids_and_unpublished_references(
        s3_endpoint, s3_sample, clean_s3_run, tmp_path):
    """New rows (near-copies of corpus rows, copies among themselves, fresh rows) against the clean
    run's S3 output: equal to the oracle over the kept corpus and the new rows, ids after the
    corpus's, an index manifest chaining the reference's S3 segment, the reference untouched. Then a
    corpus with an id column and its own ids again (a one-line error), and a reference without
    _SUCCESS (a one-line error before Spark starts)."""
    from test_incremental import _oracle

    from dedup_spark.sample import SampleSpec, generate, write

    env, client = s3_endpoint
    rng = np.random.default_rng(25)
    corpus_rows = len(s3_sample.embeddings)
    copies = (s3_sample.embeddings[rng.choice(corpus_rows, 60, replace=False)].astype(np.float32)
              + 0.02 * rng.standard_normal((60, 32)))
    fresh = rng.standard_normal((140, 32))
    new = np.concatenate([copies, fresh, fresh[:30] + 0.02 * rng.standard_normal((30, 32))]).astype(np.float16)
    np.save(tmp_path / "part-0.npy", new)
    client.upload_file(str(tmp_path / "part-0.npy"), BUCKET, "new/part-0.npy")
    write(generate(SampleSpec(rows=600, dim=24, seed=24)), tmp_path / "ids", "parquet", shard_rows=300,
          id_column="photo_id")
    for path in (tmp_path / "ids").glob("*.parquet"):
        client.upload_file(str(path), BUCKET, f"ids/{path.name}")
    before = {item["Key"]: item["ETag"] for item in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/local/")["Contents"]}
    ids = ["--set", "input.id_column=photo_id", "--set", "bucketing.k=1", "--set", "captions.column=null"]
    codes, stderr = _cli_runs(env, [
        ["--input", f"s3://{BUCKET}/new", "--output", f"s3://{BUCKET}/runs/step", "--reference",
         f"s3://{BUCKET}/runs/local"],
        ["--input", f"s3://{BUCKET}/ids", "--output", f"s3://{BUCKET}/chain/a", *ids],
        ["--input", f"s3://{BUCKET}/ids", "--output", f"s3://{BUCKET}/chain/again", "--reference",
         f"s3://{BUCKET}/chain/a", *ids]])
    assert codes == [0, 0, 2], stderr[-5000:]
    said = [line for line in stderr.splitlines() if line.startswith("dedup.py: ")]
    assert len(said) == 1 and "already has" in said[0] and "photo_id" in said[0], said

    out = tmp_path / "out"
    download(client, "runs/step/", out)
    reference = clean_s3_run[2]
    removed = {r for r, k in _table_rows(reference / "duplicates", "row_id", "is_kept") if not k}
    published = {r: g for r, g, k in _table_rows(reference / "duplicates", "row_id", "group_id", "is_kept") if k}
    stored = normalize(s3_sample.embeddings)
    corpus = {i: stored[i] for i in range(corpus_rows) if i not in removed}
    expected = _oracle(corpus, published, {corpus_rows + i: v for i, v in enumerate(normalize(new))})
    found = {r: (not k, g) for r, g, k in _table_rows(out / "duplicates", "row_id", "group_id", "is_kept")}
    assert found == expected
    assert sum(group < corpus_rows for _, group in expected.values()) >= 50, "copies join the corpus's groups"
    assert sum(group >= corpus_rows for _, group in expected.values()) >= 50, "new rows form groups of their own"
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    assert [s["uri"].startswith(f"s3://{BUCKET}/runs/local/index/") for s in manifest["segments"]] == [True, False]
    report = json.loads((out / "report.json").read_text())
    assert report["accounting"]["balanced"] and report["reference"]["uri"] == f"s3://{BUCKET}/runs/local"
    after = {item["Key"]: item["ETag"] for item in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/local/")["Contents"]}
    assert after == before, "an incremental run never changes its reference"
    assert_no_credentials([stderr], list(out.rglob("*.*")))
    unpublished = subprocess.run([sys.executable, str(REPO / "jobs" / "dedup.py"), "--input", f"s3://{BUCKET}/new",
                                  "--output", f"s3://{BUCKET}/runs/never", "--reference", f"s3://{BUCKET}/laion"],
                                 capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    lines = unpublished.stderr.strip().splitlines()
    assert unpublished.returncode == 2 and len(lines) == 1 and "not a published output" in lines[0], lines


def _table_rows(directory: Path, *columns: str) -> list[tuple]:
    table = pq.read_table(sorted(directory.glob("part-*.parquet")), columns=list(columns))
    return list(zip(*(table.column(name).to_pylist() for name in columns)))

"""End-to-end: the three jobs through the real engine (Ray replicas) on tiny random models.

One local Ray cluster for the module; jobs run in-process (their own pools), except the driver
that gets SIGKILLed, which is a subprocess connected to the same cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter

import psutil
import pytest

from pipeline.data.writer import committed_parts, read_manifest, read_output
from tests.jobs.conftest import PYTHON, REPO, TINY_DCA, job_env, write_corpus

COMMON = ["--max-input-tokens", "150", "--max-new-tokens", "6", "--no-progress"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _dca_config(tmp_path) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"dca": TINY_DCA, "max_error_fraction": 0.5}))
    return str(path)


def _by_key(table):
    return Counter((r["id"], r["question_index"]) for r in table.to_pylist())


def test_summarize_job_two_replicas(ray_local, tiny_chat_model, tmp_path):
    from jobs.summarize import main

    valid = write_corpus(str(tmp_path / "corpus"), 16)
    out = tmp_path / "out"
    main(["--input", str(tmp_path / "corpus"), "--output", str(out), "--model", tiny_chat_model,
          "--replicas", "2", "--config", _dca_config(tmp_path), *COMMON])
    table = read_output(str(out))
    rows = table.to_pylist()
    keys = _by_key(table)
    assert keys.pop(("doc0000", None)) == 2 and set(keys.values()) == {1}  # + the duplicate's error row
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["id"] for r in ok} == set(valid)
    assert all(isinstance(r["output"], str) and 1 <= r["output_tokens"] <= 6 for r in ok)
    assert all(r["prompt_tokens"] <= 150 and r["latency_s"] > 0 and r["peak_memory_bytes"] > 0 for r in ok)
    assert {r["replica"] for r in ok} <= {"replica-0", "replica-1"}
    assert all(r["memory_kind"] == "cpu_peak_rss" and r["gpu_time_s"] is None for r in ok)
    assert all(r["dca_enabled"] and r["dca_chunk_size"] == 48 for r in rows)
    assert {r["error_type"] for r in rows if r["status"] == "error"} == {"invalid_input", "duplicate_id"}
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["documents"]["ok"] == len(valid)
    assert metrics["device"]["cpu_seconds_all_ranks"] > 0 and metrics["device"]["gpu_seconds_all_ranks"] is None
    assert set(metrics["peak_memory"]["per_rank_bytes"]) <= {"replica-0/rank0", "replica-1/rank0"}
    assert set(metrics["engine"]) == {"replica-0", "replica-1"}
    assert sum(r["served"] for r in metrics["engine"].values()) == len(valid)
    assert (out / "_metrics.png").stat().st_size > 1000
    assert read_manifest(str(out))["complete"] is True
    # Both replicas ran DCA's torch backend (auto on CPU, no self-check): one record for the
    # engine, the same in the manifest, and on every row, the error rows no replica answered too.
    record = metrics["attention_backend"]
    assert (record["backend"], record["fallback"], record["requested"], record["replicas_agree"]) == (
        "torch", None, "auto", True)
    assert sorted(record["by_replica"]) == ["replica-0", "replica-1"]
    assert read_manifest(str(out))["attention_backend"] == record
    assert {(r["attention_backend"], r["attention_backend_fallback"]) for r in rows} == {("torch", None)}


@pytest.mark.slow
def test_qa_job_base_model_with_its_own_local_ray(tiny_base_model, tmp_path):
    """The CLI as a user runs it: no Ray given, so the job starts (and stops) a local one."""
    valid = write_corpus(str(tmp_path / "corpus"), 8, qa=True)
    out = tmp_path / "out"
    proc = subprocess.run(
        [PYTHON, "-m", "jobs.qa", "--input", str(tmp_path / "corpus"), "--output", str(out),
         "--model", tiny_base_model, "--config", _dca_config(tmp_path), *COMMON],
        cwd=REPO, env=job_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qa job qa-" in proc.stdout and "complete" in proc.stdout
    rows = read_output(str(out)).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["id"] for r in ok} == set(valid)
    per_doc = Counter(r["id"] for r in ok)
    assert max(per_doc.values()) > 1  # several questions share one request (one prefill)
    assert all(r["task"] == "qa" and r["question"] and r["question_index"] is not None for r in ok)
    keys = _by_key(read_output(str(out)))
    assert keys.pop(("doc0000", 0)) == 2 and set(keys.values()) == {1}


def test_nightly_is_incremental_and_partitioned_by_date(ray_local, tiny_chat_model, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.nightly import main

    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), 6, bad_rows=False, files=1)
    root = tmp_path / "summaries"
    args = ["--input", str(corpus), "--output", str(root), "--model", tiny_chat_model,
            "--config", _dca_config(tmp_path), *COMMON]
    main([*args, "--date", "2026-11-24"])
    first = read_output(str(root / "run_date=2026-11-24"))
    assert first.num_rows == 6
    # Next night: one document changed, one added.
    table = pq.read_table(corpus / "part0.parquet").to_pylist()
    table[2]["text"] = "w5 w6 w7 changed text"
    table.append({"id": "new-doc", "text": "w9 w10 w11 w12"})
    pq.write_table(pa.Table.from_pylist(table), corpus / "part0.parquet")
    main([*args, "--date", "2026-11-25"])
    second = read_output(str(root / "run_date=2026-11-25"))
    assert sorted(second["id"].to_pylist()) == ["doc0002", "new-doc"]
    metrics = json.loads((root / "run_date=2026-11-25" / "_metrics.json").read_text())
    assert metrics["documents"]["skipped"] == 5
    # Deterministic submission id per corpus and date, used as the job id of the rows.
    capsys.readouterr()
    main(["--input", str(corpus), "--date", "2026-11-25", "--print-submission-id"])
    submission = capsys.readouterr().out.strip()
    assert submission.startswith("nightly-") and submission.endswith("-2026-11-25")
    assert set(second["job_id"].to_pylist()) == {submission}
    # The whole history reads as one hive-partitioned dataset.
    import pyarrow.dataset as ds

    history = ds.dataset(str(root), format="parquet", partitioning="hive").to_table()
    assert history.num_rows == 8
    assert set(map(str, history["run_date"].to_pylist())) == {"2026-11-24", "2026-11-25"}


def _rank_worker_pids() -> list[int]:
    """RankWorker actor processes of this test process's own Ray cluster (its descendants)."""
    pids = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RankWorker" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        threading.Event().wait(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_replica_killed_mid_job_loses_and_duplicates_nothing(ray_local, tiny_chat_model, tmp_path):
    from pipeline.config.job import JobConfig
    from pipeline.config.model import ModelSpec
    from pipeline.job import run_job

    valid = write_corpus(str(tmp_path / "corpus"), 40, bad_rows=False, min_words=100, max_words=140)
    config = JobConfig(
        task="summarize", input_path=str(tmp_path / "corpus"), output_dir=str(tmp_path / "out"),
        model_spec=ModelSpec(model=tiny_chat_model, dca=TINY_DCA), replicas=2, max_input_tokens=150,
        max_new_tokens=24, max_in_flight=2, part_rows=1, progress=False, cpus_per_rank=1, max_batch_size=1,
    )
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(summary=run_job(config)), daemon=True)
    before = set(_rank_worker_pids())
    thread.start()
    _wait_for(lambda: len(committed_parts(config.output_dir)) >= 3, 120, "the first committed parts")
    workers = [p for p in _rank_worker_pids() if p not in before]
    assert workers  # this job's rank actors (one per replica)
    os.kill(workers[0], signal.SIGKILL)
    thread.join(timeout=180)
    assert not thread.is_alive() and "summary" in box
    rows = read_output(config.output_dir).to_pylist()
    assert Counter(r["id"] for r in rows) == Counter(valid)
    assert all(r["status"] == "ok" for r in rows), [r["error_message"] for r in rows if r["status"] != "ok"][:3]
    engine = box["summary"]["engine"]
    assert sum(r["failures"] + r["restarts"] for r in engine.values()) >= 1
    assert max(r["attempts"] for r in rows) >= 1


def test_driver_sigkill_then_rerun_answers_every_id_once(ray_local, tiny_chat_model, tmp_path):
    from jobs.summarize import main

    valid = write_corpus(str(tmp_path / "corpus"), 30, min_words=100, max_words=140)
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "corpus"), "--output", str(out), "--model", tiny_chat_model,
            "--config", _dca_config(tmp_path), "--max-input-tokens", "150", "--max-new-tokens", "16",
            "--part-rows", "1", "--max-in-flight", "1", "--no-progress"]
    env = job_env(tmp_path)
    env["RAY_ADDRESS"] = ray_local  # the module's cluster: no second Ray on the machine
    proc = subprocess.Popen([PYTHON, "-m", "jobs.summarize", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: len(committed_parts(str(out))) >= 5 or proc.poll() is not None, 180, "committed parts")
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    killed_at = read_output(str(out)).num_rows
    assert 0 < killed_at < 34
    main(args)
    table = read_output(str(out))
    ids = Counter(table["id"].to_pylist())
    expected = Counter(valid + ["bad-null-text", "bad-empty-text", "doc0000", None])
    assert ids == expected  # every id exactly once (doc0000 twice: its duplicate's error row)
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["documents"]["already_committed"] == killed_at
    assert read_manifest(str(out))["runs"] == 2


def test_schema_error_stops_before_model_work(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_corpus(str(tmp_path / "corpus"), 3, bad_rows=False, files=1)
    pq.write_table(pa.table({"id": ["x"], "body": ["no text column"]}), tmp_path / "corpus" / "zz.parquet")
    proc = subprocess.run(
        [PYTHON, "-m", "jobs.summarize", "--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"),
         "--model", "/nonexistent/model"],
        cwd=REPO, env=job_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "zz.parquet: column 'text' is missing" in proc.stderr and "--text-column" in proc.stderr
    assert not (tmp_path / "out").exists()

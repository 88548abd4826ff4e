"""`ray job submit --working-dir . -- python -m jobs.summarize ...` against a `ray start --head`
cluster with token authentication, as docs/ray-cluster.md shows it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import psutil
import pytest

from pipeline.data.writer import read_output
from tests.jobs.conftest import PYTHON, REPO, TINY_DCA, job_env
from tests.ray_auth import use_test_ray_auth

VENV_BIN = os.path.dirname(PYTHON)


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every socket is held open until all are chosen (a port given
    back at once can be handed out again by the next bind: `--port` and
    `--dashboard-agent-grpc-port` once got the same one, and `ray start` failed)."""
    held = []
    try:
        for _ in range(count):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the head started below: those naming its temp dir, and their descendants."""
    found: dict[int, psutil.Process] = {}
    me = os.getpid()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != me and temp_dir in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            pass
    return list(found.values())


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rjs")  # short: Ray's socket paths live under it
    env = job_env(tmp_path_factory.getbasetemp())
    env.pop("RAY_ADDRESS")
    env["PATH"] = VENV_BIN + os.pathsep + env["PATH"]  # the job's `python` is this venv's
    use_test_ray_auth(env)  # the head and every client below: the same explicit token
    # Every port explicit, free and distinct: other Ray clusters on this machine hold the defaults
    # (a job agent that cannot bind 52365 makes every submission fail with "No available agent").
    names = ("port", "object-manager-port", "node-manager-port", "ray-client-server-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "dashboard-port")
    chosen = dict(zip(names, _free_ports(len(names))))
    dashboard = chosen["dashboard-port"]
    ports = [f"--{name}={port}" for name, port in chosen.items()]
    subprocess.run(
        [os.path.join(VENV_BIN, "ray"), "start", "--head", *ports, "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, check=True, timeout=180, capture_output=True,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        procs = _cluster_processes(temp_dir)
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_summarize(ray_head, tiny_chat_model, tmp_path):
    address, env = ray_head
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"dca": TINY_DCA, "max_input_tokens": 150, "max_new_tokens": 4}))
    out = tmp_path / "out"
    begin = time.monotonic()
    for _ in range(30):  # a fresh head's job agent takes a few seconds to register
        proc = subprocess.run(
            [os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
             "python", "-m", "jobs.summarize", "--input", "examples/corpus", "--output", str(out),
             "--model", tiny_chat_model, "--config", str(config), "--no-progress"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        log = proc.stdout + proc.stderr
        if "No available agent" not in log:
            break
        time.sleep(2)
    assert proc.returncode == 0 and "succeeded" in log, log[-4000:]
    # Relative --input resolved inside the uploaded working dir; absolute --output where we asked.
    rows = read_output(str(out)).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted([
        "kjv-ruth", "kjv-esther", "kjv-mark", "alice-ch1-3", "as-you-like-it-act1", "loc-workshop-part1"])
    assert all(r["status"] == "ok" and r["truncated_tokens"] > 0 for r in rows)
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["ray_submission_id"].startswith("raysubmit_")
    assert time.monotonic() - begin < 240


@pytest.mark.slow
def test_ray_job_submit_qa_and_nightly_with_its_submission_id(ray_head, tiny_chat_model, tmp_path):
    """jobs.qa and jobs.nightly under the job API (submitted together), the nightly one with its
    deterministic submission id; a second submission of the same night is refused by Ray."""
    import subprocess as sp

    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_head
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"dca": TINY_DCA, "max_input_tokens": 150, "max_new_tokens": 4}))
    common = f"--model {tiny_chat_model} --config {config} --no-progress"
    submission = sp.run(
        [PYTHON, "-m", "jobs.nightly", "--input", "examples/corpus", "--date", "2026-11-25", "--print-submission-id"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=120,
    ).stdout.strip()
    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": REPO}
    jobs = {}
    for _ in range(30):  # wait for the job agent of a fresh head
        try:
            jobs["qa"] = client.submit_job(
                entrypoint=f"python -m jobs.qa --input examples/qa --output {tmp_path / 'qa'} {common}",
                runtime_env=runtime_env)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            time.sleep(2)
    jobs["nightly"] = client.submit_job(
        entrypoint=f"python -m jobs.nightly --input examples/corpus --output {tmp_path / 'nightly'} "
                   f"--date 2026-11-25 {common}",
        runtime_env=runtime_env, submission_id=submission)
    assert jobs["nightly"] == submission
    with pytest.raises(RuntimeError):
        client.submit_job(entrypoint="python -c pass", submission_id=submission)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        states = {k: client.get_job_status(v) for k, v in jobs.items()}
        if all(s in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) for s in states.values()):
            break
        time.sleep(1)
    assert states == {"qa": JobStatus.SUCCEEDED, "nightly": JobStatus.SUCCEEDED}, {
        k: client.get_job_logs(v)[-2000:] for k, v in jobs.items()}
    qa_rows = read_output(str(tmp_path / "qa")).to_pylist()
    assert len(qa_rows) == 7 and all(r["status"] == "ok" and r["question"] for r in qa_rows)
    nightly = read_output(str(tmp_path / "nightly" / "run_date=2026-11-25"))
    assert nightly.num_rows == 6 and set(nightly["job_id"].to_pylist()) == {submission}


def test_free_ports_are_distinct():
    """The head's nine ports: never one port twice (`ray start` exits 1 on that)."""
    for _ in range(50):
        ports = _free_ports(9)
        assert len(set(ports)) == 9 and all(1024 < p < 65536 for p in ports)


def test_a_client_agrees_with_the_head_on_auth_whatever_the_machine_carries(ray_head, tmp_path):
    """A shell with RAY_AUTH_MODE=disabled, a stale ~/.ray/auth_token and RAY_AUTH_TOKEN_PATH to
    another stale token: a client started there under the tests' conftest talks to the tests' head
    (before: "AuthenticationError: Missing authentication token")."""
    address, _ = ray_head
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0" * 64)
    (tmp_path / "other_token").write_text("1" * 64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN_PATH=str(tmp_path / "other_token"),
               PYTHONPATH=REPO)
    code = ("import tests.jobs.conftest\n"
            "from ray.job_submission import JobSubmissionClient\n"
            f"print('jobs:', len(JobSubmissionClient({address!r}).list_jobs()))\n")
    proc = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "jobs: " in proc.stdout, proc.stderr[-3000:]

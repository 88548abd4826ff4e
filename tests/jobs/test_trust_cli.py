"""The jobs as a careless user and a scheduler meet them: one-line errors with exit code 2 before
any model work, and a stop by SIGTERM / SIGINT that commits, writes its metrics, removes its
staging files and exits 128 + signal, after which the same command resumes exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest

from pipeline.data.writer import STAGING, committed_parts, read_manifest, read_output
from tests.jobs.conftest import PYTHON, REPO, TINY_DCA, job_env, write_corpus


def _run(args, tmp_path, timeout=120):
    return subprocess.run([PYTHON, "-m", "jobs.summarize", *args], cwd=REPO, env=job_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, last


def _case(name, tmp_path, model):
    """-> (arguments, expected words in the error line) of one misuse."""
    corpus = str(tmp_path / "corpus")
    base = ["--input", corpus, "--model", model, "--no-progress"]
    if name == "output_is_a_file":
        (tmp_path / "taken").write_text("x")
        return base + ["--output", str(tmp_path / "taken")], ["cannot be used as a directory", "taken"]
    if name == "output_under_a_file":
        (tmp_path / "taken").write_text("x")
        return base + ["--output", str(tmp_path / "taken" / "out")], ["cannot be used as a directory"]
    if name == "output_unwritable":
        return base + ["--output", "/proc/self/dca-out"], ["cannot be used as a directory"]
    if name == "broken_config_json":
        broken = tmp_path / "broken-model"
        broken.mkdir()
        (broken / "config.json").write_text('{"model_type": "llama", ')
        return ["--input", corpus, "--model", str(broken), "--output", str(tmp_path / "out")], \
            ["config.json cannot be read"]
    if name == "misspelt_dca_key":
        config = tmp_path / "job.yaml"
        config.write_text(json.dumps({"dca": {**TINY_DCA, "chunk_sise": 40}}))
        return base + ["--output", str(tmp_path / "out"), "--config", str(config)], ["chunk_sise", "dca"]
    if name == "tp_above_kv_heads":
        config = tmp_path / "job.yaml"
        config.write_text(json.dumps({"dca": TINY_DCA}))
        return base + ["--output", str(tmp_path / "out"), "--config", str(config), "--tp", "4"], \
            ["--tp 4", "2 key/value heads"]
    out = ["--output", str(tmp_path / "out")]
    if name == "config_yaml_error":
        config = tmp_path / "job.yaml"
        config.write_text("dca:\n  chunk_size: 48\n max_new_tokens: [4\n")
        return base + out + ["--config", str(config)], ["not valid YAML at line", "job.yaml"]
    if name == "max_error_fraction_string":
        config = tmp_path / "job.yaml"
        config.write_text(f"dca: {json.dumps(TINY_DCA)}\nmax_error_fraction: '0.5'\n")
        return base + out + ["--config", str(config)], ["max_error_fraction must be a number in [0, 1]", "'0.5'"]
    sampling = {"temperature_nan": ({"temperature": float("nan")}, "temperature must be a number > 0"),
                "temperature_zero": ({"do_sample": True, "temperature": 0}, "temperature must be a number > 0"),
                "top_p_zero": ({"top_p": 0}, "top_p must be a number in (0, 1]"),
                "top_p_nan": ({"top_p": float("nan")}, "top_p must be a number in (0, 1]")}
    if name in sampling:
        values, needle = sampling[name]
        config = tmp_path / "job.yaml"
        config.write_text(f"dca: {json.dumps(TINY_DCA)}\n" + "".join(
            f"{k}: {'.nan' if v != v else json.dumps(v)}\n" for k, v in values.items()))
        return base + out + ["--config", str(config)], [needle]
    if name == "max_input_tokens_beyond_the_device":  # its own plan: hundreds of GiB per rank
        return base + out + ["--device", "cpu", "--max-input-tokens", "2000000000"], \
            ["--max-input-tokens 2000000000 cannot fit", "the longest prompt that fits is"]
    if name == "repetition_penalty_nan":
        return base + out + ["--repetition-penalty", "nan"], ["repetition_penalty must be a number >= 1"]
    raise AssertionError(name)


# The default run keeps one case per layer that validates (output, config file, dca block, engine,
# sampling, memory plan); the other cases of a layer run with -m slow.
_MORE = pytest.mark.slow


@pytest.mark.parametrize("name", ["output_is_a_file", pytest.param("output_under_a_file", marks=_MORE),
                                  pytest.param("output_unwritable", marks=_MORE), "broken_config_json",
                                  "misspelt_dca_key", "tp_above_kv_heads", pytest.param("config_yaml_error", marks=_MORE),
                                  pytest.param("max_error_fraction_string", marks=_MORE), "temperature_nan",
                                  pytest.param("temperature_zero", marks=_MORE), pytest.param("top_p_zero", marks=_MORE),
                                  pytest.param("top_p_nan", marks=_MORE), pytest.param("repetition_penalty_nan", marks=_MORE),
                                  "max_input_tokens_beyond_the_device"])
def test_misuse_is_one_line_exit_2_before_model_work(tiny_chat_model, tmp_path, name):
    write_corpus(str(tmp_path / "corpus"), 3, bad_rows=False, files=1)
    args, needles = _case(name, tmp_path, tiny_chat_model)
    start = time.monotonic()
    proc = _run(args, tmp_path)
    _one_line_error(proc, *needles)
    assert time.monotonic() - start < 60  # found before Ray or a model start
    # Nothing was claimed: the corrected command is not refused as "a different job".
    assert not (tmp_path / "out" / "_manifest.json").exists()


def test_an_input_of_empty_files_is_one_line_exit_2(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   tmp_path / "corpus" / "empty.parquet")
    proc = _run(["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out")], tmp_path)
    _one_line_error(proc, "has no rows", "nothing to do")
    assert not (tmp_path / "out").exists()


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        threading.Event().wait(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _committed_rows(out) -> int:
    return read_output(str(out)).num_rows if committed_parts(str(out)) else 0


def _job_args(tmp_path, model, *, max_error_fraction, new_tokens, part_rows) -> tuple[list[str], object]:
    """Arguments of a job over tmp_path/corpus into tmp_path/out, one request at a time."""
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({"dca": TINY_DCA, "max_error_fraction": max_error_fraction}))
    return ["--input", str(tmp_path / "corpus"), "--output", str(out), "--model", model, "--config", str(config),
            "--max-input-tokens", "150", "--max-new-tokens", str(new_tokens), "--part-rows", str(part_rows),
            "--max-in-flight", "1", "--no-progress"], out


def _signal_once_committed(job: str, args, tmp_path, committed, signum) -> tuple[int, str, float]:
    """Starts `python -m jobs.JOB`, sends `signum` once committed() is true, waits for the exit.
    -> (exit code, stderr, seconds from the signal to the exit)."""
    proc = subprocess.Popen([PYTHON, "-m", f"jobs.{job}", *args], cwd=REPO, env=job_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: committed() or proc.poll() is not None, 240, "committed output")
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signum)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        return proc.returncode, stderr, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_stop_signal_commits_writes_metrics_and_resumes(tiny_chat_model, tmp_path, signum):
    """The job starts its own local Ray, as a user's does: ray.init installs a SIGTERM handler
    that kills the Ray processes and exits before anything is committed (exit 134 was seen)."""
    valid = write_corpus(str(tmp_path / "corpus"), 60, min_words=100, max_words=140)
    args, out = _job_args(tmp_path, tiny_chat_model, max_error_fraction=0.5, new_tokens=16, part_rows=1)
    code, stderr, seconds = _signal_once_committed("summarize", args, tmp_path, lambda: _committed_rows(out) >= 8,
                                                   signum)
    assert code == 128 + signum, stderr[-3000:]
    assert seconds < 30
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"job stopped by {signal.Signals(signum).name}" in stderr.strip().splitlines()[-1]
    assert not (out / STAGING).exists()
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["status"] == "stopped" and signal.Signals(signum).name in metrics["message"]
    committed = _committed_rows(out)
    assert metrics["documents"]["ok"] + metrics["documents"]["error"] == committed
    assert read_manifest(str(out))["complete"] is False

    rerun = subprocess.run([PYTHON, "-m", "jobs.summarize", *args], cwd=REPO, env=job_env(tmp_path),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    table = read_output(str(out))
    assert Counter((r["source_file"], r["source_row"]) for r in table.to_pylist()).most_common(1)[0][1] == 1
    assert table.num_rows == 64  # 60 documents + 4 bad rows, each once
    assert {r["id"] for r in table.to_pylist() if r["status"] == "ok"} == set(valid)
    resumed = json.loads((out / "_metrics.json").read_text())
    assert resumed["status"] == "complete" and resumed["documents"]["already_committed"] == committed


@pytest.mark.slow
def test_qa_job_with_null_and_repeated_ids_survives_sigkill_exactly_once(tiny_chat_model, tmp_path):
    """The QA job over documents of 2-3 questions whose ids are often null or repeated, committed
    in parts of 2 rows, SIGKILLed mid-run, then run again: every (input row, question) once."""
    from tests.pipeline.test_trust import _expected_keys, _keys, _write_messy_corpus

    per_row = _write_messy_corpus(str(tmp_path / "corpus"), 36, qa=True)
    args, out = _job_args(tmp_path, tiny_chat_model, max_error_fraction=1.0, new_tokens=8, part_rows=2)
    code, _, _ = _signal_once_committed("qa", args, tmp_path, lambda: len(committed_parts(str(out))) >= 5,
                                        signal.SIGKILL)
    assert code == -signal.SIGKILL
    killed = read_output(str(out))
    assert 0 < killed.num_rows < sum(per_row) and max(_keys(killed).values()) == 1

    rerun = subprocess.run([PYTHON, "-m", "jobs.qa", *args], cwd=REPO, env=job_env(tmp_path),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    table = read_output(str(out))
    assert table.num_rows == sum(per_row)
    assert _keys(table) == _expected_keys(per_row, 3, qa=True)
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["status"] == "complete"
    assert metrics["rows"]["ok"] + metrics["rows"]["error"] == table.num_rows - killed.num_rows

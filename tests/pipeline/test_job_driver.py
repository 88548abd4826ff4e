"""The job driver against a fake engine: rows, scheduling, failure budget, resume, metrics."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from pipeline.config.job import JobConfig
from pipeline.config.model import ModelSpec
from pipeline.data.writer import OutputError, read_output
from pipeline.job import run_job
from pipeline.runtime.stops import JobFailed
from tests.jobs.conftest import TINY_DCA, FakePool, load_tiny_tokenizer, tiny_chat_model, write_corpus  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    return load_tiny_tokenizer(tiny_chat_model)


def _config(tiny_chat_model, tmp_path, **kw):
    kw.setdefault("task", "summarize")
    kw.setdefault("input_path", str(tmp_path / "corpus"))
    kw.setdefault("output_dir", str(tmp_path / "out"))
    kw.setdefault("max_input_tokens", 120)
    kw.setdefault("progress", False)
    return JobConfig(model_spec=ModelSpec(model=tiny_chat_model, dca=TINY_DCA), **kw)


def test_qa_rows_errors_and_metrics(tiny_chat_model, tokenizer, tmp_path):
    valid = write_corpus(str(tmp_path / "corpus"), 12, qa=True)
    pool = FakePool(fail_ids={"doc0003"})
    config = _config(tiny_chat_model, tmp_path, task="qa", part_rows=4, max_error_fraction=1.0)
    summary = run_job(config, pool_factory=lambda c: pool, tokenizer=tokenizer)
    table = read_output(config.output_dir).to_pylist()
    keys = Counter((r["id"], r["question_index"]) for r in table)
    # Each (document, question) once; doc0000 also has the error row of its duplicate.
    assert keys.pop(("doc0000", 0)) == 2 and set(keys.values()) == {1}
    by_id = {}
    for r in table:
        by_id.setdefault(r["id"], []).append(r)
    assert set(valid) <= set(by_id)
    assert all(r["status"] == "error" and r["error_type"] == "out_of_memory" for r in by_id["doc0003"])
    partly = sorted(by_id["partly-bad-questions"], key=lambda r: r["question_index"])
    assert [r["status"] for r in partly] == ["ok", "error", "ok"] and "question 1 is null" in partly[1]["error_message"]
    assert by_id["bad-no-questions"][0]["error_type"] == "invalid_input"
    assert by_id[None][0]["error_message"].endswith("id is null")
    ok = [r for r in table if r["status"] == "ok"]
    assert all(r["prompt_tokens"] <= 120 and r["output"].startswith("answer") for r in ok)
    assert any(r["truncated_tokens"] > 0 for r in ok)
    assert all(r["dca_chunk_size"] == 48 and r["model"] == tiny_chat_model for r in table)
    assert pool.stopped

    metrics = json.loads(open(os.path.join(config.output_dir, "_metrics.json")).read())
    assert metrics["status"] == "complete" and metrics == json.loads(json.dumps(metrics))
    assert metrics["documents"]["error"] == summary["documents"]["error"] == 7  # 6 bad rows/documents + 1 OOM
    assert metrics["rows"]["error_types"]["duplicate_id"] == 1
    assert metrics["device"]["kind"] == "cpu" and metrics["device"]["gpu_seconds_all_ranks"] is None
    assert metrics["latency_by_prompt_tokens"][0]["latency_p95_s"] > 0
    assert metrics["peak_memory"]["per_rank_bytes"]["fake-0/rank0"] > 0
    assert os.path.getsize(os.path.join(config.output_dir, "_metrics.png")) > 1000


def test_longest_first_within_window_and_bounded_in_flight(tiny_chat_model, tokenizer, tmp_path):
    write_corpus(str(tmp_path / "corpus"), 20, bad_rows=False, max_words=100)
    pool = FakePool()
    config = _config(tiny_chat_model, tmp_path, max_in_flight=3, schedule_window=5, max_input_tokens=400)
    run_job(config, pool_factory=lambda c: pool, tokenizer=tokenizer)
    assert pool.max_seen_in_flight <= 3
    windows = [pool.prompt_tokens[i:i + 5] for i in range(0, 20, 5)]
    assert all(w == sorted(w, reverse=True) for w in windows)
    assert pool.prompt_tokens != sorted(pool.prompt_tokens, reverse=True)  # reordered per window only


def test_failure_budget_stops_the_job(tiny_chat_model, tokenizer, tmp_path):
    write_corpus(str(tmp_path / "corpus"), 30, bad_rows=False)
    pool = FakePool(fail_ids={f"doc{i:04d}" for i in range(0, 30, 2)})
    config = _config(tiny_chat_model, tmp_path, max_error_fraction=0.2, budget_min_documents=10,
                     part_rows=1, schedule_window=1, max_in_flight=1)
    with pytest.raises(JobFailed, match="failure budget exceeded.*out_of_memory"):
        run_job(config, pool_factory=lambda c: pool, tokenizer=tokenizer)
    assert len(pool.order) < 30
    metrics = json.loads(open(os.path.join(config.output_dir, "_metrics.json")).read())
    assert metrics["status"] == "failed" and "failure budget" in metrics["message"]
    assert read_output(config.output_dir).num_rows == metrics["documents"]["ok"] + metrics["documents"]["error"]


class _Crash(Exception):
    pass


def test_resume_after_crash_answers_each_document_once(tiny_chat_model, tokenizer, tmp_path):
    valid = write_corpus(str(tmp_path / "corpus"), 25)
    # 4 in flight (the default before continuous batching): the crash then comes after doc0000
    # was answered, so the id check below is not fooled by the committed error row of its
    # duplicate (the exactly-once key is the row's place, not its id).
    config = _config(tiny_chat_model, tmp_path, part_rows=2, max_error_fraction=1.0, max_in_flight=4)

    class CrashingPool(FakePool):
        def run(self, requests, max_in_flight):
            for n, results in enumerate(super().run(requests, max_in_flight)):
                if n == 10:
                    raise _Crash()
                yield results

    with pytest.raises(_Crash):
        run_job(config, pool_factory=lambda c: CrashingPool(), tokenizer=tokenizer)
    first = read_output(config.output_dir)
    assert 0 < first.num_rows < 29
    second_pool = FakePool()
    summary = run_job(config, pool_factory=lambda c: second_pool, tokenizer=tokenizer)
    assert summary["documents"]["already_committed"] == first.num_rows
    assert not set(second_pool.order) & set(first["id"].to_pylist())
    table = read_output(config.output_dir)
    assert table.num_rows == 29  # 25 documents + 4 bad rows
    ids = [i for i in table["id"].to_pylist() if i is not None]
    assert sorted(Counter(ids).items()) == sorted(Counter(valid + ["bad-null-text", "bad-empty-text", "doc0000"]).items())
    # Same job again: nothing to do. Another job on this output: refused.
    third_pool = FakePool()
    run_job(config, pool_factory=lambda c: third_pool, tokenizer=tokenizer)
    assert third_pool.order == [] and read_output(config.output_dir).num_rows == 29
    with pytest.raises(OutputError, match="different job"):
        run_job(_config(tiny_chat_model, tmp_path, max_new_tokens=7), pool_factory=lambda c: FakePool(), tokenizer=tokenizer)


def test_metrics_describe_the_whole_job_across_resumes(tiny_chat_model, tokenizer, tmp_path):
    write_corpus(str(tmp_path / "corpus"), 25)
    config = _config(tiny_chat_model, tmp_path, part_rows=2, max_error_fraction=1.0)
    path = os.path.join(config.output_dir, "_metrics.json")

    class CrashingPool(FakePool):
        def run(self, requests, max_in_flight):
            for n, results in enumerate(super().run(requests, max_in_flight)):
                if n == 10:
                    raise _Crash()
                yield results

    with pytest.raises(_Crash):
        run_job(config, pool_factory=lambda c: CrashingPool(), tokenizer=tokenizer)
    first = json.loads(open(path).read())
    assert first["run"] == 1 and first["job"]["status"] == "failed" and len(first["runs"]) == 1
    run_job(config, pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    second = json.loads(open(path).read())
    assert second["run"] == 2 and [r["status"] for r in second["runs"]] == ["failed", "complete"]
    job = second["job"]
    committed = read_output(config.output_dir).to_pylist()
    # The top level is this run; `job` sums the runs, and together they cover the output.
    assert second["documents"]["ok"] == second["runs"][1]["documents"]["ok"]
    assert job["documents"]["ok"] + job["documents"]["error"] == len(committed) == 29
    for key in ("ok", "error"):
        assert job["documents"][key] == sum(r["documents"][key] for r in second["runs"])
    assert job["tokens"]["output"] == sum(r["output_tokens"] or 0 for r in committed)
    assert job["device"]["cpu_seconds_all_ranks"] == pytest.approx(
        sum(r["device"]["cpu_seconds_all_ranks"] for r in second["runs"]), abs=1e-3)
    assert job["wall_s"] == pytest.approx(sum(r["wall_s"] for r in second["runs"]), abs=1e-2)
    # Latency buckets (and the plot) of the job cover every committed row with a latency.
    timed = [r for r in committed if r["latency_s"] is not None]
    assert sum(b["rows"] for b in job["latency_by_prompt_tokens"]) == len(timed)
    assert sum(b["rows"] for b in second["latency_by_prompt_tokens"]) < len(timed)
    # A third run with nothing left to do keeps the job's figures: never an empty overwrite.
    run_job(config, pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    third = json.loads(open(path).read())
    assert third["run"] == 3 and third["documents"]["ok"] == 0
    assert third["documents"]["already_committed"] == len(committed)
    assert third["job"]["documents"] == second["job"]["documents"]
    assert third["job"]["latency_by_prompt_tokens"] == job["latency_by_prompt_tokens"]
    assert os.path.getsize(os.path.join(config.output_dir, "_metrics.png")) > 1000

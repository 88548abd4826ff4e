"""The Ray Data processor: config validation, the same answers as the job through the same engine,
one row per (document, question), bad rows as error rows, tp 2, and a node removed mid-run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.processor import DCAProcessorConfig
from pipeline.data.schema import PROCESSOR_COLUMNS as OUTPUT_COLUMNS
from pipeline.dataflows.processor import build_processor
from tests.jobs.conftest import TINY_DCA, tiny_chat_model, write_corpus  # noqa: F401 (fixture)


def _config(model, **kw):
    kw.setdefault("dca", TINY_DCA)
    kw.setdefault("max_input_tokens", 150)
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("device", "cpu")
    return DCAProcessorConfig(model=model, **kw)


def test_config_is_validated_up_front(tiny_chat_model):
    with pytest.raises(ValueError, match="concurrency"):
        _config(tiny_chat_model, concurrency=(3, 1))
    with pytest.raises(ValueError, match=r"unknown dca field\(s\) \['chunk_sise'\]"):
        _config(tiny_chat_model, dca={"chunk_sise": 4})
    with pytest.raises(ValueError, match="task"):
        _config(tiny_chat_model, task="translate")
    with pytest.raises(ValueError, match=r"unknown DCAProcessorConfig field\(s\) \['modle'\]"):
        DCAProcessorConfig.from_dict({"modle": "x"})
    config = _config(tiny_chat_model, task="qa", concurrency=[1, 2])
    # The jobs' generation defaults for the task (stop, repetition guard): both answer alike.
    from pipeline.config.job import JobConfig
    from pipeline.config.model import ModelSpec

    job = JobConfig(task="qa", input_path="in", output_dir="out", model_spec=ModelSpec(model=tiny_chat_model),
                    max_new_tokens=6)
    assert config.sampling() == job.sampling() and config.sampling().no_repeat_ngram_size > 0
    with pytest.raises(ValueError, match="repetition_penalty"):
        _config(tiny_chat_model, repetition_penalty=0.5)
    assert config.question_column == "questions" and config.concurrency == (1, 2)
    assert DCAProcessorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError):
        build_processor(config.to_dict())


def test_driver_side_import_is_light():
    code = ("import sys, pipeline.dataflows.processor, pipeline.config.processor; "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray; yields the port of its Prometheus metrics endpoint."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield port
    ray.shutdown()


def _scrape(port: int, name: str, run: str, expected: dict[str, float], timeout_s: float = 60.0) -> dict[str, float]:
    """Sum of a metric of one run over the processes reporting it, per value of its `status` tag.
    Ray exports every ray.util.metrics metric with a `ray_` prefix, each process every few seconds,
    so a read may see part of the counts: reads until they equal `expected` or `timeout_s` passes,
    and returns the last read. (Other runs in this process, e.g. jobs of earlier tests, export
    theirs under their own `run`.)"""
    import re
    import time
    import urllib.request

    deadline, sums = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        sums = {}
        for line in text.splitlines():
            if line.startswith(f"ray_{name}{{") and f'run="{run}"' in line:
                status = re.search(r'status="([^"]*)"', line)
                key = status.group(1) if status else ""
                sums[key] = sums.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        if sums == expected:
            return sums
        time.sleep(1)
    return sums


def _read(ds) -> list[dict]:
    return ds.take_all()


@pytest.mark.slow
def test_qa_processor_answers_like_the_job(ray_local, tiny_chat_model, tmp_path):
    import ray

    from pipeline.config.job import JobConfig
    from pipeline.config.model import ModelSpec
    from pipeline.data.writer import read_output
    from pipeline.job import run_job

    write_corpus(str(tmp_path / "corpus"), 10, qa=True, max_words=120)
    config = _config(tiny_chat_model, task="qa", batch_size=3)
    processor = build_processor(config, postprocess=lambda row: {**row, "n_chars": len(row["output"] or "")})
    rows = _read(processor(ray.data.read_parquet(str(tmp_path / "corpus"))))
    assert processor.run_id != build_processor(config).run_id

    table = pa.concat_tables(pq.read_table(tmp_path / "corpus" / f) for f in sorted(os.listdir(tmp_path / "corpus")))
    expected = sum(max(1, len(q or [])) for q in table["questions"].to_pylist())
    assert len(rows) == expected  # one row per (document, question)
    assert set(OUTPUT_COLUMNS) | {"id", "text", "questions", "n_chars"} <= set(rows[0])
    assert Counter((r["id"], r["question_index"]) for r in rows if r["id"] is not None).most_common(1)[0][1] <= 2
    ok = [r for r in rows if r["status"] == "ok"]
    # (A tiny random model may stop at once: 0 tokens is an answer; the job comparison below checks them.)
    assert ok and all(0 <= r["output_tokens"] <= 6 and 0 < r["prompt_tokens"] <= 150 and r["dca_chunk_size"] == 48
                      for r in ok)
    assert sum(r["output_tokens"] for r in ok) > 0
    assert all(r["replica"].startswith("dca-") and r["memory_kind"] == "cpu_peak_rss" for r in ok)
    errors = {r["error_type"] for r in rows if r["status"] == "error"}
    assert errors == {"invalid_input"}  # null/empty text, empty questions list, a null question
    partly = sorted((r for r in rows if r["id"] == "partly-bad-questions"), key=lambda r: r["question_index"])
    assert [r["status"] for r in partly] == ["ok", "error", "ok"] and "question 1 is null" in partly[1]["error_message"]

    # Live metrics on Ray's Prometheus endpoint count the same rows and documents.
    by_status = Counter(r["status"] for r in rows)
    rows_by_status = {s: float(n) for s, n in by_status.items()}
    assert _scrape(ray_local, "dca_rows_total", processor.run_id, rows_by_status) == rows_by_status
    # Error documents: null text, empty text, null id, no questions, one null question. (A repeated
    # id is answered again: the processor maps rows, it does not deduplicate a dataset.)
    documents = {"ok": table.num_rows - 5, "error": 5}
    assert _scrape(ray_local, "dca_documents_total", processor.run_id, documents) == documents

    # The job on the same corpus, through the same engine: the same greedy answers.
    job = JobConfig(task="qa", input_path=str(tmp_path / "corpus"), output_dir=str(tmp_path / "out"),
                    model_spec=ModelSpec(model=tiny_chat_model, dca=TINY_DCA), max_input_tokens=150,
                    max_new_tokens=6, progress=False, max_error_fraction=1.0, device="cpu",
                    job_id=f"qa-{os.getpid()}-{id(tmp_path):x}")  # a run of its own (ids derive from content)
    summary = run_job(job)
    job_rows = read_output(job.output_dir).to_pylist()
    answers = {(r["id"], r["question_index"]): r["output"] for r in job_rows
               if r["status"] == "ok" and r["id"] != "doc0000"}
    # The job's live metrics: its own run, its own counts (the processor's above are unchanged).
    job_by_status = {s: float(n) for s, n in Counter(r["status"] for r in job_rows).items()}
    assert _scrape(ray_local, "dca_rows_total", summary["job_id"], job_by_status) == job_by_status
    mine = {(r["id"], r["question_index"]): r["output"] for r in ok if r["id"] != "doc0000"}
    assert mine == answers


def test_summaries_on_tp2_with_non_utf8_rows(ray_local, tiny_chat_model, tmp_path):
    import ray

    from tests.pipeline.test_trust import _bad_utf8_strings

    texts = _bad_utf8_strings([b"w5 w6 w7 w8", b"w9 \xff w10", b"w11 w12"])
    ds = ray.data.from_arrow(pa.table({"doc": ["a", "b", "c"], "body": texts}))
    config = _config(tiny_chat_model, tp_size=2, id_column="doc", text_column="body", batch_size=2)
    # The input column keeps its bytes as they were (not valid UTF-8): leave it out of Python rows.
    rows = {r["doc"]: r for r in _read(build_processor(config)(ds).drop_columns(["body"]))}
    assert rows["a"]["status"] == "ok" and rows["c"]["status"] == "ok"
    assert rows["b"]["error_type"] == "invalid_input" and "text is not valid UTF-8" in rows["b"]["error_message"]
    assert rows["a"]["question_index"] is None and len(rows) == 3


@pytest.mark.slow
def test_hierarchical_processor_answers_like_the_job(ray_local, tiny_chat_model, tmp_path):
    """truncation="hierarchical" in the processor: documents over the budget answered in sections,
    the same outputs, sections and calls as the job's (the processor keeps no response-prefix
    stripping difference here: split outputs are stripped the same way in both)."""
    import ray

    from pipeline.config.job import JobConfig
    from pipeline.config.model import ModelSpec
    from pipeline.data.writer import read_output
    from pipeline.job import run_job

    write_corpus(str(tmp_path / "corpus"), 6, qa=True, bad_rows=False, min_words=200, max_words=500)
    config = _config(tiny_chat_model, task="qa", batch_size=3, truncation="hierarchical", max_input_tokens=100)
    rows = _read(build_processor(config)(ray.data.read_parquet(str(tmp_path / "corpus"))))
    assert all(r["status"] == "ok" and r["sections"] > 1 and r["truncated_tokens"] == 0 for r in rows)
    job = JobConfig(task="qa", input_path=str(tmp_path / "corpus"), output_dir=str(tmp_path / "out"),
                    model_spec=ModelSpec(model=tiny_chat_model, dca=TINY_DCA), max_input_tokens=100,
                    max_new_tokens=6, progress=False, device="cpu", truncation="hierarchical",
                    job_id=f"qa-h-{os.getpid()}-{id(tmp_path):x}")
    run_job(job)
    fields = ("output", "sections", "levels", "calls", "prompt_tokens", "output_tokens")
    expected = {(r["id"], r["question_index"]): tuple(r[f] for f in fields) for r in read_output(job.output_dir).to_pylist()}
    got = {(r["id"], r["question_index"]): tuple(r[f] for f in fields) for r in rows}
    assert got == expected

"""The output viewer (python -m jobs.show): rows in corpus order with lengths, timings and output,
the job's metrics, error rows, nightly roots, and a clean exit code on a wrong directory."""

from __future__ import annotations

import os

import pytest

from jobs import show
from pipeline.data.writer import OutputWriter
from pipeline.metrics.job import JobMetrics

DCA_COLS = {"dca_enabled": True, "dca_pretraining_length": 8192, "dca_chunk_size": 6144, "dca_local_window": 1024,
            "dca_temperature_alpha": 0.0}


def _row(source_row, doc_id, *, prompt, output="A summary.", status="ok", **kw):
    row = {"id": doc_id, "source_file": "part-0.parquet", "source_row": source_row, "task": "summarize",
           "question_index": None, "question": None, "output": output if status == "ok" else None, "status": status,
           "prompt_tokens": prompt, "output_tokens": 12 if status == "ok" else None, "truncated_tokens": 0,
           "prefill_s": 1.5, "decode_s": 0.5, "latency_s": 2.0, "peak_memory_bytes": 1 << 30,
           "memory_kind": "cpu_peak_rss", "attempts": 1, "model": "smollm2", "content_hash": "h", "config_hash": "c",
           **DCA_COLS}
    row.update(kw)
    return row


def _write_output(directory: str, rows: list[dict]) -> None:
    writer = OutputWriter(directory, job_id="summarize-abc", fingerprint="f", config={})
    for row in rows:
        writer.add_document([row])
    writer.close(complete=True)
    metrics = JobMetrics(job_id="summarize-abc", task="summarize",
                         config={"prefill_block": "chunk", "kv_cache_dtype": "auto", "dca_in_effect": DCA_COLS},
                         total_input_rows=len(rows))
    for row in rows:
        metrics.add_document([row])
    metrics.write(directory, metrics.summary(status="complete"))


@pytest.fixture
def output(tmp_path):
    directory = str(tmp_path / "out")
    _write_output(directory, [
        _row(2, "long", prompt=12500, output="Alice falls down a rabbit hole and grows and shrinks."),
        _row(0, "short", prompt=1800, truncated_tokens=300),
        _row(1, "bad", prompt=None, status="error", error_type="invalid_input",
             error_message="part-0.parquet row 1: text is empty", latency_s=None),
    ])
    return directory


def test_rows_in_corpus_order_with_lengths_timings_and_metrics(output, capsys):
    assert show.main([output, "--width", "80"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("short  [ok]  prompt 1,800 tok, 300 dropped; 12 new tok; prefill 1.5 s, decode 0.5 s")
    assert lines[2].startswith("bad  [error]") and "invalid_input: part-0.parquet row 1: text is empty" in lines[3]
    assert lines[4].startswith("long  [ok]  prompt 12,500 tok (past P=8,192)")
    assert "Alice falls down a rabbit hole" in lines[5]
    assert "3 row(s)" in out and "ok 2, error 1" in out
    assert "summarize job summarize-abc: complete" in out and "documents: 3 in the input" in out
    assert "chunk_size S=6,144" in out and "chunk_len L=S-W=5,120" in out and "engine: prefill block chunk" in out
    assert "latency by prompt length" in out and os.path.join(output, "_metrics.json") in out


def test_filters_and_nightly_partitions(output, tmp_path, capsys):
    assert show.main([output, "--errors", "--no-metrics"]) == 0
    out = capsys.readouterr().out
    assert "bad  [error]" in out and "short" not in out and "1 shown" in out and "summarize job" not in out
    assert show.main([output, "--id", "long", "--no-metrics"]) == 0
    assert "long  [ok]" in capsys.readouterr().out
    root = tmp_path / "nightly"
    for date in ("2026-01-02", "2026-01-01"):
        _write_output(str(root / f"run_date={date}"), [_row(0, f"doc-{date}", prompt=100)])
    assert show.main([str(root), "--no-metrics"]) == 0
    out = capsys.readouterr().out
    assert out.index("== run_date=2026-01-01") < out.index("doc-2026-01-01") < out.index("== run_date=2026-01-02")


def test_not_an_output_directory(tmp_path, capsys):
    assert show.main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert show.main([str(tmp_path)]) == 2
    assert "no committed output" in capsys.readouterr().err


def test_metrics_file_is_optional(tmp_path, capsys):
    directory = str(tmp_path / "out")
    _write_output(directory, [_row(0, "only", prompt=10)])
    os.remove(os.path.join(directory, "_metrics.json"))
    assert show.main([directory]) == 0
    out = capsys.readouterr().out
    assert "only  [ok]" in out and "DCA on" in out  # the DCA settings come from the rows then


def test_control_characters_in_ids_and_outputs_are_shown_escaped(tmp_path):
    """An id or an output holding terminal escape sequences (colour, clear screen, a window title
    ended by BEL, a carriage return that overwrites the line, a bidi override) is printed with
    every control character escaped; the outputs' line breaks are still layout."""
    import subprocess
    import sys

    from tests.jobs.conftest import REPO, job_env

    directory = str(tmp_path / "out")
    hostile_id = "\x1b[31mred\x1b[0m\x1b[2J\rok\u202eevil\x9b"
    _write_output(directory, [
        _row(0, hostile_id, prompt=10, output="first line\nsecond \x1b]0;pwned\x07line\r\ttabbed"),
        _row(1, "bell\x07", prompt=None, status="error", error_type="invalid_input",
             error_message="row 1: question \x1b[8mhidden\x1b[0m is empty", latency_s=None),
    ])
    proc = subprocess.run([sys.executable, "-m", "jobs.show", directory, "--width", "200"], cwd=REPO,
                          env=job_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    raw = {c for c in out if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F or c == "\u202e"}
    assert not raw, sorted(map(hex, map(ord, raw)))
    lines = out.splitlines()
    assert lines[0].startswith(r"\x1b[31mred\x1b[0m\x1b[2J\rok\u202eevil\x9b  [ok]"), lines[0]
    # The output's newline and tab are whitespace of the layout; its controls are visible text.
    assert lines[1] == r"    first line second \x1b]0;pwned\x07line\r tabbed", lines[1]
    assert lines[2].startswith(r"bell\x07  [error]") and r"question \x1b[8mhidden\x1b[0m is empty" in lines[3]

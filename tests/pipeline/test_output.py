"""Output writer: typed schema, atomic parts + manifest, resume, refusal of another job, overwrite."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from pipeline.output import (
    MANIFEST, OUTPUT_SCHEMA, STAGING, CommittedIndex, OutputError, OutputWriter, committed_parts, read_output,
)


def _rows(doc_id, n=1, status="ok", error_type=None):
    return [{"id": doc_id, "task": "qa", "question_index": i, "status": status, "error_type": error_type,
             "output": "x" if status == "ok" else None} for i in range(n)]


def _writer(path, **kw):
    kw.setdefault("job_id", "job-1")
    kw.setdefault("fingerprint", "fp-1")
    kw.setdefault("config", {"a": 1})
    return OutputWriter(str(path), **kw)


def test_parts_are_typed_and_keep_documents_whole(tmp_path):
    w = _writer(tmp_path, part_rows=3)
    w.add_document(_rows("a", 2))
    w.add_document(_rows("b", 2))  # 4 rows >= 3: commit a and b together
    w.add_document(_rows("c", 1))
    w.close(complete=True)
    parts = committed_parts(str(tmp_path))
    assert parts == ["part-00000.parquet", "part-00001.parquet"]
    for part in parts:  # every part has the declared schema, error columns typed even when all null
        assert pq.read_schema(tmp_path / part).remove_metadata() == OUTPUT_SCHEMA.remove_metadata()
    table = read_output(str(tmp_path))
    assert table["id"].to_pylist() == ["a", "a", "b", "b", "c"]
    assert set(table["job_id"].to_pylist()) == {"job-1"}
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["complete"] and [p["rows"] for p in manifest["parts"]] == [4, 1]
    assert not (tmp_path / STAGING).exists()


def test_resume_skips_committed_and_recovers_unlisted_part(tmp_path):
    w = _writer(tmp_path, part_rows=1)
    w.add_document(_rows("a"))
    w.add_document(_rows("dup", status="error", error_type="duplicate_id"))
    w.add_document(_rows(None, status="error", error_type="invalid_input"))
    # Simulate a driver killed between the rename (commit) and the manifest update, and a part
    # still in staging (never committed).
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["parts"] = manifest["parts"][:1]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / STAGING / "part-00009.parquet").write_bytes(b"partial")
    w._lock.close()  # the process is gone: the kernel drops its lock

    w2 = _writer(tmp_path)
    c = w2.committed
    assert c.is_committed("a", 0) and not c.is_committed("b", 0)
    assert c.is_committed("dup", 1) and not c.is_committed("dup", 2)
    assert c.is_committed(None, 0) and not c.is_committed(None, 1)
    assert len(w2.manifest["parts"]) == 3 and w2.manifest["parts"][1].get("recovered")
    assert os.listdir(tmp_path / STAGING) == []
    w2.add_document(_rows("b"))
    w2.close(complete=True)
    assert committed_parts(str(tmp_path))[-1] == "part-00003.parquet"
    assert read_output(str(tmp_path)).num_rows == 4


def test_refuses_another_job_unless_overwrite(tmp_path):
    w = _writer(tmp_path)
    w.add_document(_rows("a"))
    w.close(complete=True)
    with pytest.raises(OutputError, match="different job.*--overwrite"):
        _writer(tmp_path, fingerprint="fp-2")
    (tmp_path / "notes.txt").write_text("user file")
    w = _writer(tmp_path, fingerprint="fp-2", overwrite=True)
    assert len(w.committed) == 0 and committed_parts(str(tmp_path)) == []
    assert (tmp_path / "notes.txt").exists()  # only the writer's own files are removed


def test_rejects_relative_remote_and_foreign_directories(tmp_path):
    with pytest.raises(OutputError, match="absolute"):
        OutputWriter("relative/out", job_id="j", fingerprint="f", config={})
    with pytest.raises(OutputError, match="local"):
        OutputWriter("s3://bucket/out", job_id="j", fingerprint="f", config={})
    (tmp_path / "part-00000.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match="no _manifest.json"):
        _writer(tmp_path)


def test_committed_index_counts():
    c = CommittedIndex.empty()
    c.add_rows(["a", "a", "b", None], [None, None, "duplicate_id", "invalid_input"])
    assert c.is_committed("a", 0) and not c.is_committed("b", 0) and c.is_committed("b", 1)
    assert len(c) == 3


def test_a_second_writer_on_the_same_output_is_refused(tmp_path):
    w = _writer(tmp_path)
    with pytest.raises(OutputError, match=r"being written by another job \(pid \d+"):
        _writer(tmp_path)
    w.close(complete=True)
    _writer(tmp_path).close(complete=True)  # released on close

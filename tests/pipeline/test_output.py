"""Output writer: typed schema, atomic parts + manifest, resume, refusal of another job, overwrite."""

from __future__ import annotations

import json
import os
import zlib

import pyarrow.parquet as pq
import pytest

from pipeline.data.schema import OUTPUT_SCHEMA
from pipeline.data.writer import (
    MANIFEST, STAGING, CommittedIndex, OutputError, OutputWriter, committed_parts, read_output,
)


def _rows(doc_id, n=1, status="ok", error_type=None, *, row=None, file="f.parquet"):
    """The n output rows (questions) of one input row; its source_row defaults to a number
    derived from the id, so tests can name documents by id."""
    row = row if row is not None else zlib.crc32(str(doc_id).encode())
    return [{"id": doc_id, "source_file": file, "source_row": row, "task": "qa", "question_index": i,
             "status": status, "error_type": error_type, "output": "x" if status == "ok" else None}
            for i in range(n)]


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
    # part-00000 is the empty part a fresh output starts with (the schema, readable at once).
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for part in parts:  # every part has the declared schema, error columns typed even when all null
        assert pq.read_schema(tmp_path / part).remove_metadata() == OUTPUT_SCHEMA.remove_metadata()
    table = read_output(str(tmp_path))
    assert table["id"].to_pylist() == ["a", "a", "b", "b", "c"]
    assert set(table["job_id"].to_pylist()) == {"job-1"}
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["complete"] and [p["rows"] for p in manifest["parts"]] == [0, 4, 1]
    assert not (tmp_path / STAGING).exists()


def test_resume_skips_committed_and_recovers_unlisted_part(tmp_path):
    w = _writer(tmp_path, part_rows=1)
    w.add_document(_rows("a", row=0))
    w.add_document(_rows("a", status="error", error_type="duplicate_id", row=1))
    w.add_document(_rows(None, 3, status="error", error_type="invalid_input", row=2))
    # Simulate a driver killed between the rename (commit) and the manifest update, and a part
    # still in staging (never committed).
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["parts"] = manifest["parts"][:2]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / STAGING / "part-00009.parquet").write_bytes(b"partial")
    w._lock.close()  # the process is gone: the kernel drops its lock

    w2 = _writer(tmp_path)
    c = w2.committed
    # One entry per input row, whatever its id and however many rows (questions) it has.
    assert [c.is_committed(("f.parquet", r)) for r in range(4)] == [True, True, True, False]
    assert not c.is_committed(("g.parquet", 0)) and len(c) == 3
    assert len(w2.manifest["parts"]) == 4 and w2.manifest["parts"][2].get("recovered")
    assert os.listdir(tmp_path / STAGING) == []
    w2.add_document(_rows("b", row=3))
    w2.close(complete=True)
    assert committed_parts(str(tmp_path))[-1] == "part-00004.parquet"
    assert read_output(str(tmp_path)).num_rows == 6


def test_refuses_another_job_unless_overwrite(tmp_path):
    w = _writer(tmp_path)
    w.add_document(_rows("a"))
    w.close(complete=True)
    with pytest.raises(OutputError, match="different job.*--overwrite"):
        _writer(tmp_path, fingerprint="fp-2")
    (tmp_path / "notes.txt").write_text("user file")
    w = _writer(tmp_path, fingerprint="fp-2", overwrite=True)
    assert len(w.committed) == 0 and read_output(str(tmp_path)).num_rows == 0
    assert (tmp_path / "notes.txt").exists()  # only the writer's own files are removed


def test_rejects_relative_remote_and_foreign_directories(tmp_path):
    with pytest.raises(OutputError, match="absolute"):
        OutputWriter("relative/out", job_id="j", fingerprint="f", config={})
    with pytest.raises(OutputError, match="local"):
        OutputWriter("s3://bucket/out", job_id="j", fingerprint="f", config={})
    (tmp_path / "part-00000.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match="no _manifest.json"):
        _writer(tmp_path)


def test_committed_index_counts_input_rows_not_output_rows():
    c = CommittedIndex.empty()
    # Three QA rows of input row 0, one of row 5, one of row 0 of another file.
    c.add_rows(["x.parquet"] * 4 + ["y.parquet"], [0, 0, 0, 5, 0])
    assert c.is_committed(("x.parquet", 0)) and c.is_committed(("x.parquet", 5))
    assert not c.is_committed(("x.parquet", 1)) and c.is_committed(("y.parquet", 0))
    assert len(c) == 3


def test_a_fresh_output_reads_as_an_empty_dataset_with_the_schema(tmp_path):
    import pyarrow.dataset as ds

    w = _writer(tmp_path / "out")
    for directory in (tmp_path / "out",):  # while the job runs, and after it ends with nothing
        dataset = ds.dataset(str(directory), format="parquet")
        assert dataset.schema.remove_metadata() == OUTPUT_SCHEMA.remove_metadata()
        assert dataset.to_table().num_rows == 0
    w.close(complete=True)
    assert ds.dataset(str(tmp_path / "out"), format="parquet").to_table().num_rows == 0
    assert read_output(str(tmp_path / "out")).schema.names == OUTPUT_SCHEMA.names


def test_output_that_is_a_file_or_under_one_or_unwritable_is_a_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(OutputError, match="cannot be used as a directory.*a-file"):
        _writer(tmp_path / "a-file")
    with pytest.raises(OutputError, match="cannot be used as a directory.*a-file"):
        _writer(tmp_path / "a-file" / "out")
    # Root ignores permission bits; /proc refuses new directories for everyone.
    with pytest.raises(OutputError, match="cannot be used as a directory"):
        _writer("/proc/self/dca-output")


def test_an_output_of_an_older_format_is_refused_not_mixed(tmp_path):
    w = _writer(tmp_path)
    w.close(complete=True)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["format"] = 1
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OutputError, match="another version.*--overwrite"):
        _writer(tmp_path)


def test_a_second_writer_on_the_same_output_is_refused(tmp_path):
    w = _writer(tmp_path)
    with pytest.raises(OutputError, match=r"being written by another job \(pid \d+"):
        _writer(tmp_path)
    w.close(complete=True)
    _writer(tmp_path).close(complete=True)  # released on close

"""Input: discovery (file, directory, glob), schema checks naming file and column, per-row errors."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.input import DUPLICATE_ID, InputError, InputSpec, check_input, iter_documents
from pipeline.engine.requests import INVALID_INPUT


def _write(path, **columns):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_directory_glob_and_file_discovery(tmp_path):
    _write(str(tmp_path / "c" / "b.parquet"), id=["2"], text=["two"])
    _write(str(tmp_path / "c" / "a.parquet"), id=["1"], text=["one"])
    _write(str(tmp_path / "c" / "sub" / "c.parquet"), id=["3"], text=["three"])
    _write(str(tmp_path / "c" / "_manifest" / "x.parquet"), id=["x"], text=["skipped"])
    _write(str(tmp_path / "c" / ".hidden.parquet"), id=["y"], text=["skipped"])
    ids = lambda p: [d.id for d in iter_documents(check_input(InputSpec(path=p)))]  # noqa: E731
    assert ids(str(tmp_path / "c")) == ["1", "2", "3"]
    assert ids(str(tmp_path / "c" / "*.parquet")) == ["1", "2"]
    assert ids(str(tmp_path / "c" / "**" / "*.parquet")) == ["1", "2", "3"]
    assert ids(str(tmp_path / "c" / "*" / "?.parquet")) == ["3"]
    assert ids(str(tmp_path / "c" / "b.parquet")) == ["2"]
    assert ids("file://" + str(tmp_path / "c" / "a.parquet")) == ["1"]
    assert check_input(InputSpec(path=str(tmp_path / "c"))).num_rows == 3


def test_missing_input_and_empty_glob(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_input(InputSpec(path=str(tmp_path / "nope")))
    with pytest.raises(InputError, match="matches no Parquet files"):
        check_input(InputSpec(path=str(tmp_path / "*.parquet")))


def test_schema_errors_name_file_and_column(tmp_path):
    _write(str(tmp_path / "a.parquet"), id=["1"], text=["fine"])
    _write(str(tmp_path / "b.parquet"), id=["2"], body=["no text column"])
    with pytest.raises(InputError) as info:
        check_input(InputSpec(path=str(tmp_path)))
    message = str(info.value)
    assert "b.parquet" in message and "'text' is missing" in message and "a.parquet" not in message

    _write(str(tmp_path / "b.parquet"), id=["2"], text=[3.5])
    with pytest.raises(InputError, match=r"b\.parquet: column 'text' has type double"):
        check_input(InputSpec(path=str(tmp_path)))

    _write(str(tmp_path / "b.parquet"), id=[[1]], text=["x"])
    with pytest.raises(InputError, match="column 'id' has type list"):
        check_input(InputSpec(path=str(tmp_path)))

    _write(str(tmp_path / "b.parquet"), id=["2"], text=["x"])
    with pytest.raises(InputError, match="column 'questions' is missing"):
        check_input(InputSpec(path=str(tmp_path), question_column="questions"))

    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="b.parquet: not a readable Parquet file"):
        check_input(InputSpec(path=str(tmp_path)))


def test_bad_rows_become_error_documents(tmp_path):
    _write(
        str(tmp_path / "a.parquet"),
        id=pa.array([1, 2, 3, 1, None, 4], pa.int64()),
        text=pa.array([b"one", b"", None, b"dup", b"no id", b"\xff\xfe"], pa.binary()),
    )
    docs = list(iter_documents(check_input(InputSpec(path=str(tmp_path)))))
    got = [(d.id, d.error_type) for d in docs]
    # Integer ids stay integers (the output keeps the input's id type).
    assert got == [(1, None), (2, INVALID_INPUT), (3, INVALID_INPUT), (1, DUPLICATE_ID),
                   (None, INVALID_INPUT), (4, INVALID_INPUT)]
    assert "row 1: text is empty" in docs[1].error_message
    assert "text is null" in docs[2].error_message
    assert "not valid UTF-8" in docs[5].error_message
    assert docs[3].occurrence == 1 and docs[0].content_hash and docs[0].text == "one"


def test_questions_string_and_list(tmp_path):
    _write(str(tmp_path / "a.parquet"), id=["1", "2", "3"], text=["t", "t", "t"],
           questions=pa.array([["q1", "q2"], [], ["ok", None, " "]], pa.list_(pa.string())))
    docs = list(iter_documents(check_input(InputSpec(path=str(tmp_path), question_column="questions"))))
    assert docs[0].questions == ["q1", "q2"] and docs[0].question_errors == [None, None]
    assert docs[1].question_errors == ["questions list is empty"]
    assert docs[2].questions == ["ok", None, None]
    assert docs[2].question_errors[1:] == ["question 1 is null", "question 2 is empty"]
    _write(str(tmp_path / "b" / "a.parquet"), id=["1"], text=["t"], question=["why?"])
    docs = list(iter_documents(check_input(InputSpec(path=str(tmp_path / "b"), question_column="question"))))
    assert docs[0].questions == ["why?"]


def test_streams_in_batches(tmp_path):
    """The reader holds one record batch, not the file: documents come out before the end is read."""
    _write(str(tmp_path / "a.parquet"), id=[str(i) for i in range(1000)], text=["x"] * 1000)
    plan = check_input(InputSpec(path=str(tmp_path), batch_rows=10))
    it = iter_documents(plan)
    assert next(it).id == "0"
    assert sum(1 for _ in it) == 999

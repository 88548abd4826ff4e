"""What a batch pipeline must never do, tried against the job driver with a fake engine: lose or
duplicate rows (null and repeated ids, QA documents of several questions, small parts, a crash
and a resume), stop on one bad value (non-UTF-8 bytes, a corrupt data page), trip the failure
budget on bad luck, resume a different corpus or model, or start a model for an empty input."""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.job import JobConfig
from pipeline.config.model import ModelSpec
from pipeline.data.input import InputError
from pipeline.data.writer import OutputError, committed_parts, read_output
from pipeline.job import run_job, run_nightly
from pipeline.runtime.stops import JobFailed
from tests.jobs.conftest import TINY_DCA, FakePool, load_tiny_tokenizer, tiny_chat_model, words  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    return load_tiny_tokenizer(tiny_chat_model)


def _config(model, tmp_path, **kw):
    kw.setdefault("task", "qa")
    kw.setdefault("input_path", str(tmp_path / "corpus"))
    kw.setdefault("output_dir", str(tmp_path / "out"))
    kw.setdefault("max_input_tokens", 120)
    kw.setdefault("progress", False)
    kw.setdefault("max_error_fraction", 1.0)
    return JobConfig(model_spec=ModelSpec(model=model, dca=TINY_DCA), **kw)


def _write_messy_corpus(path, n_docs: int, *, qa: bool, seed: int = 0, files: int = 3) -> list[int]:
    """Documents of 1-3 questions whose ids are often null or repeated; returns the number of
    output rows each input row must have (one per question; 1 for summaries), in reading order."""
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)
    rows = []
    for i in range(n_docs):
        doc_id = None if i % 13 == 5 else f"doc{i % 17:03d}"  # 1 in 13 null, ids repeat from row 17 on
        row = {"id": doc_id, "text": words(rng, rng.randint(10, 60))}
        if qa:
            row["questions"] = [words(rng, 3) for _ in range(rng.randint(2, 3))]
        rows.append(row)
    schema = pa.schema([("id", pa.string()), ("text", pa.string())]
                       + ([("questions", pa.list_(pa.string()))] if qa else []))
    per_file = -(-len(rows) // files)
    for f in range(files):
        table = pa.Table.from_pylist(rows[f * per_file:(f + 1) * per_file], schema=schema)
        pq.write_table(table, os.path.join(path, f"part{f}.parquet"))
    return [len(r["questions"]) if qa else 1 for r in rows]


def _keys(table) -> Counter:
    return Counter((r["source_file"], r["source_row"], r["question_index"]) for r in table.to_pylist())


def _expected_keys(per_row: list[int], files: int, qa: bool) -> Counter:
    per_file = -(-len(per_row) // files)
    return Counter(
        (f"part{i // per_file}.parquet", i % per_file, q if qa else None)
        for i, n in enumerate(per_row) for q in range(n)
    )


class _Crash(Exception):
    pass


class _CrashingPool(FakePool):
    def __init__(self, after: int, **kw) -> None:
        super().__init__(**kw)
        self.after = after

    def run(self, requests, max_in_flight):
        for n, results in enumerate(super().run(requests, max_in_flight)):
            if n == self.after:
                raise _Crash()
            yield results


def _assert_documents_whole(output_dir: str, per_key_rows: Counter) -> None:
    """Every input row's output rows sit in one part, all of them."""
    parts_of = defaultdict(set)
    rows_of = Counter()
    for part in committed_parts(output_dir):
        for r in pq.read_table(os.path.join(output_dir, part)).to_pylist():
            parts_of[(r["source_file"], r["source_row"])].add(part)
            rows_of[(r["source_file"], r["source_row"])] += 1
    assert all(len(parts) == 1 for parts in parts_of.values())
    assert all(rows_of[key] == per_key_rows[key] for key in rows_of)


@pytest.mark.parametrize("part_rows", [1, 2, 3, 5])
def test_qa_with_null_and_repeated_ids_answers_every_question_once(tiny_chat_model, tokenizer, tmp_path, part_rows):
    per_row = _write_messy_corpus(str(tmp_path / "corpus"), 60, qa=True)
    expected = _expected_keys(per_row, 3, qa=True)
    per_key_rows = Counter({(f, r): 0 for f, r, _ in expected})
    for f, r, _ in expected.elements():
        per_key_rows[(f, r)] += 1
    config = _config(tiny_chat_model, tmp_path, part_rows=part_rows, max_in_flight=3, schedule_window=4)

    # A fresh run that crashes part way: what is committed is whole documents, never a part of one.
    with pytest.raises(_Crash):
        run_job(config, pool_factory=lambda c: _CrashingPool(after=8), tokenizer=tokenizer)
    first = read_output(config.output_dir)
    assert 0 < first.num_rows < sum(per_row)
    assert max(_keys(first).values()) == 1
    _assert_documents_whole(config.output_dir, per_key_rows)

    summary = run_job(config, pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    table = read_output(config.output_dir)
    assert table.num_rows == sum(per_row)  # nothing lost: every (input row, question)
    assert _keys(table) == expected  # ... exactly once
    _assert_documents_whole(config.output_dir, per_key_rows)
    ids = Counter(r["id"] for r in table.to_pylist() if r["question_index"] == 0)
    assert ids[None] == sum(1 for i in range(60) if i % 13 == 5)
    errors = Counter(r["error_type"] for r in table.to_pylist())
    assert errors["duplicate_id"] > 0 and errors["invalid_input"] > 0
    documents = summary["documents"]
    assert documents["already_committed"] + documents["ok"] + documents["error"] == 60

    # A third run has nothing left to do.
    third = FakePool()
    run_job(config, pool_factory=lambda c: third, tokenizer=tokenizer)
    assert third.order == [] and read_output(config.output_dir).num_rows == sum(per_row)


def test_fresh_qa_run_loses_no_row_of_null_id_documents(tiny_chat_model, tokenizer, tmp_path):
    """The reported case, scaled down: documents of 3 questions, 3 null ids, small parts."""
    rng = random.Random(1)
    rows = [{"id": None if i in (3, 9, 21) else f"d{i}", "text": words(rng, 30),
             "questions": [words(rng, 3) for _ in range(3)]} for i in range(40)]
    os.makedirs(tmp_path / "corpus")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "c.parquet")
    config = _config(tiny_chat_model, tmp_path, part_rows=4)
    run_job(config, pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    table = read_output(config.output_dir)
    assert table.num_rows == 120
    assert Counter(r["id"] for r in table.to_pylist())[None] == 9


@pytest.mark.parametrize("nightly", [False, True])
def test_summaries_with_null_and_repeated_ids_exactly_once(tiny_chat_model, tokenizer, tmp_path, nightly):
    per_row = _write_messy_corpus(str(tmp_path / "corpus"), 50, qa=False, seed=3)
    config = _config(tiny_chat_model, tmp_path, task="summarize", part_rows=2)

    def run(pool):
        if nightly:
            return run_nightly(config, output_root=str(tmp_path / "out"), run_date="2026-11-27",
                               pool_factory=lambda c: pool, tokenizer=tokenizer)
        return run_job(config, pool_factory=lambda c: pool, tokenizer=tokenizer)

    with pytest.raises(_Crash):
        run(_CrashingPool(after=6))
    run(FakePool())
    output = str(tmp_path / "out" / "run_date=2026-11-27") if nightly else config.output_dir
    assert _keys(read_output(output)) == _expected_keys(per_row, 3, qa=False)


def _bad_utf8_strings(values: list[bytes]) -> pa.Array:
    """A `string` array holding arbitrary bytes (Parquet writers do produce these)."""
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    return pa.StringArray.from_buffers(
        len(values), pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1].to_pybytes()),
        pa.py_buffer(b"".join(values)),
    )


def test_non_utf8_bytes_in_string_columns_become_error_rows(tiny_chat_model, tokenizer, tmp_path):
    os.makedirs(tmp_path / "corpus")
    ids = _bad_utf8_strings([b"a", b"b\xff", b"c", b"d", b"e"])
    texts = _bad_utf8_strings([b"w5 w6 w7", b"w5 w6", b"w8 \xfe\xff w9", b"w10 w11", b"w12 w13"])
    questions = pa.array([["w3 w4"], ["w3"], ["w5"], [None], ["w6", "w7"]], pa.list_(pa.string()))
    pq.write_table(pa.table({"id": ids, "text": texts, "questions": questions}), tmp_path / "corpus" / "bad.parquet")
    bad_question = pq.read_table(tmp_path / "corpus" / "bad.parquet")
    # The question of row 3 is made invalid UTF-8 too, in a second file.
    qs = pa.ListArray.from_arrays(pa.array([0, 1], pa.int32()), _bad_utf8_strings([b"w9 \xc3"]))
    pq.write_table(pa.table({"id": ["f"], "text": ["w14 w15"], "questions": qs}), tmp_path / "corpus" / "q.parquet")
    assert bad_question.num_rows == 5

    config = _config(tiny_chat_model, tmp_path, part_rows=2)
    run_job(config, pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    rows = {(r["source_file"], r["source_row"], r["question_index"]): r for r in read_output(config.output_dir).to_pylist()}
    assert len(rows) == 7
    assert rows[("bad.parquet", 0, 0)]["status"] == "ok" and rows[("bad.parquet", 3, 0)]["status"] == "error"
    bad_id = rows[("bad.parquet", 1, 0)]
    assert bad_id["error_type"] == "invalid_input" and bad_id["id"] is None
    assert "bad.parquet row 1: id is not valid UTF-8" in bad_id["error_message"]
    bad_text = rows[("bad.parquet", 2, 0)]
    assert bad_text["id"] == "c" and "bad.parquet row 2: text is not valid UTF-8" in bad_text["error_message"]
    assert [rows[("bad.parquet", 4, q)]["status"] for q in (0, 1)] == ["ok", "ok"]
    bad_q = rows[("q.parquet", 0, 0)]
    assert bad_q["error_type"] == "invalid_input" and "question 0 is not valid UTF-8" in bad_q["error_message"]


def test_a_corrupt_data_page_costs_its_row_group_only(tiny_chat_model, tokenizer, tmp_path):
    os.makedirs(tmp_path / "corpus")
    table = pa.table({"id": [f"d{i}" for i in range(30)], "text": [f"w5 w6 w7 w{8 + i % 100} " * 20 for i in range(30)]})
    path = tmp_path / "corpus" / "a.parquet"
    pq.write_table(table, path, row_group_size=10, compression="zstd")
    pq.write_table(pa.table({"id": ["z"], "text": ["w9 w10"]}), tmp_path / "corpus" / "b.parquet")
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)  # the text of rows 10-19
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 20:start + column.total_compressed_size - 5] = b"\xab" * (column.total_compressed_size - 25)
    path.write_bytes(bytes(data))  # the footer is intact: the schema check passes

    config = _config(tiny_chat_model, tmp_path, task="summarize")
    summary = run_job(config, pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    rows = read_output(config.output_dir).to_pylist()
    assert len(rows) == 31
    unreadable = [r for r in rows if r["error_type"] == "unreadable_input"]
    assert sorted(r["source_row"] for r in unreadable) == list(range(10, 20))
    assert all(r["id"] == f"d{r['source_row']}" for r in unreadable)  # the id column still reads
    assert all("a.parquet row" in r["error_message"] and "row group 1 cannot be read" in r["error_message"]
               for r in unreadable)
    assert sum(r["status"] == "ok" for r in rows) == 21 and summary["status"] == "complete"


def _empty_text_corpus(path, n: int, empty_rows) -> None:
    rng = random.Random(0)
    os.makedirs(path, exist_ok=True)
    rows = [{"id": f"d{i}", "text": "" if i in empty_rows else words(rng, 20)} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(path, "c.parquet"))


def test_failure_budget_is_not_tripped_by_a_few_bad_rows_read_early(tiny_chat_model, tokenizer, tmp_path):
    _empty_text_corpus(str(tmp_path / "corpus"), 100, empty_rows={1, 2, 4})  # 3%, all at the start
    config = _config(tiny_chat_model, tmp_path, task="summarize", max_error_fraction=0.1)
    summary = run_job(config, pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    assert summary["status"] == "complete"
    assert summary["documents"]["ok"] == 97 and summary["documents"]["error"] == 3


def test_failure_budget_names_invalid_input_apart_from_model_failures(tiny_chat_model, tokenizer, tmp_path):
    _empty_text_corpus(str(tmp_path / "corpus"), 100, empty_rows=set(range(0, 100, 2)))  # half empty
    config = _config(tiny_chat_model, tmp_path, task="summarize", max_error_fraction=0.1)
    pool = FakePool()
    with pytest.raises(JobFailed, match=r"failure budget exceeded: \d+ of \d+ documents read had invalid input"):
        run_job(config, pool_factory=lambda c: pool, tokenizer=tokenizer)
    assert len(pool.order) < 50  # stopped early

    _empty_text_corpus(str(tmp_path / "corpus2"), 100, empty_rows=set())
    pool = FakePool(fail_ids={f"d{i}" for i in range(0, 100, 2)})
    config = _config(tiny_chat_model, tmp_path, task="summarize", max_error_fraction=0.1,
                     input_path=str(tmp_path / "corpus2"), output_dir=str(tmp_path / "out2"))
    with pytest.raises(JobFailed, match=r"documents sent to the model failed.*invalid input 0 of"):
        run_job(config, pool_factory=lambda c: pool, tokenizer=tokenizer)
    assert len(pool.order) < 100


def test_model_failures_are_counted_against_every_answered_document(tiny_chat_model, tokenizer, tmp_path):
    """25 of 100 documents fail in the model, one in four, budget 50%: the job completes (answered
    documents that succeed count in the rate's denominator), and every failure has its row."""
    _empty_text_corpus(str(tmp_path / "corpus"), 100, empty_rows=set())
    pool = FakePool(fail_ids={f"d{i}" for i in range(1, 100, 4)})
    config = _config(tiny_chat_model, tmp_path, task="summarize", max_error_fraction=0.5)
    summary = run_job(config, pool_factory=lambda c: pool, tokenizer=tokenizer)
    assert summary["status"] == "complete"
    assert summary["documents"]["ok"] == 75 and summary["documents"]["error"] == 25


def test_budget_counts_per_document():
    from pipeline.dataflows.budget import budget_counts

    ok, model, invalid = ({"status": "ok", "error_type": None}, {"status": "error", "error_type": "out_of_memory"},
                          {"status": "error", "error_type": "invalid_input"})
    # (input errors, documents answered by the model, model failures)
    assert budget_counts([ok]) == (0, 1, 0)
    assert budget_counts([model]) == (0, 1, 1)
    assert budget_counts([invalid]) == (1, 0, 0)
    assert budget_counts([ok, invalid, ok]) == (1, 1, 0)  # a QA document with one null question
    assert budget_counts([model, invalid]) == (1, 1, 1)


def test_resume_follows_the_corpus_content_not_its_path(tiny_chat_model, tokenizer, tmp_path):
    _write_messy_corpus(str(tmp_path / "corpus"), 20, qa=True)
    config = _config(tiny_chat_model, tmp_path)
    run_job(config, pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    rows = read_output(config.output_dir).num_rows

    # The same corpus at another path (Ray's working-dir copy after a cluster restart): resumes.
    shutil.copytree(tmp_path / "corpus", tmp_path / "copy")
    pool = FakePool()
    summary = run_job(_config(tiny_chat_model, tmp_path, input_path=str(tmp_path / "copy")),
                      pool_factory=lambda c: pool, tokenizer=tokenizer)
    assert pool.order == [] and summary["documents"]["already_committed"] == 20
    assert read_output(config.output_dir).num_rows == rows

    # A changed corpus at the same path: a different job, refused.
    _write_messy_corpus(str(tmp_path / "copy"), 20, qa=True, seed=9)
    with pytest.raises(OutputError, match="different job"):
        run_job(_config(tiny_chat_model, tmp_path, input_path=str(tmp_path / "copy")),
                pool_factory=lambda c: FakePool(), tokenizer=tokenizer)


def test_resume_refuses_changed_weights_at_the_same_model_path(tiny_chat_model, tokenizer, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)
    _write_messy_corpus(str(tmp_path / "corpus"), 10, qa=True)
    run_job(_config(str(model), tmp_path), pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # a "fine-tune" of the last tensor values, same shapes and size
    weights.write_bytes(bytes(data))
    with pytest.raises(OutputError, match="different job"):
        run_job(_config(str(model), tmp_path), pool_factory=lambda c: FakePool(), tokenizer=tokenizer)


def test_an_input_with_no_rows_stops_before_the_model_loads(tmp_path):
    os.makedirs(tmp_path / "corpus")
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                       tmp_path / "corpus" / name)
    config = _config("/nonexistent/model", tmp_path, task="summarize")
    with pytest.raises(InputError, match="has no rows.*2 Parquet file"):
        run_job(config, pool_factory=lambda c: pytest.fail("no engine for an empty input"))
    assert not (tmp_path / "out").exists()

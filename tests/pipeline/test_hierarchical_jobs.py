"""Jobs under truncation="hierarchical" against a fake engine: documents over the budget answered
in sections, every row once (also across a crash in a split document), sums that match."""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.job import JobConfig
from pipeline.config.model import ModelSpec
from pipeline.data.prompts import PromptBuilder, load_templates
from pipeline.data.writer import read_output
from pipeline.job import run_job
from tests.jobs.conftest import TINY_DCA, FakePool, load_tiny_tokenizer, tiny_chat_model, write_corpus  # noqa: F401

MAX_INPUT = 120


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    return load_tiny_tokenizer(tiny_chat_model)


def _config(model, tmp_path, **kw):
    kw.setdefault("task", "summarize")
    kw.setdefault("input_path", str(tmp_path / "corpus"))
    kw.setdefault("output_dir", str(tmp_path / "out"))
    kw.setdefault("max_input_tokens", MAX_INPUT)
    kw.setdefault("max_new_tokens", 8)
    kw.setdefault("truncation", "hierarchical")
    kw.setdefault("progress", False)
    kw.setdefault("max_error_fraction", 1.0)
    return JobConfig(model_spec=ModelSpec(model=model, dca=TINY_DCA), **kw)


def _calls_by_document(pool: FakePool) -> dict[str, list[int]]:
    """Prompt tokens of every call the engine saw, by document id (a split call's id is `id#...`)."""
    calls = defaultdict(list)
    for request_id, tokens in zip(pool.order, pool.prompt_tokens):
        calls[request_id.split("#")[0]].append(tokens)
    return calls


@pytest.mark.parametrize("task", ["summarize", "qa"])
def test_long_documents_are_answered_in_sections_once_each_with_sums_that_match(tiny_chat_model, tokenizer,
                                                                                 tmp_path, task, capsys):
    write_corpus(str(tmp_path / "corpus"), 16, qa=task == "qa", min_words=20, max_words=700)
    pool = FakePool()
    extra = {"question_column": "questions"} if task == "qa" else {}
    config = _config(tiny_chat_model, tmp_path, task=task, **extra)
    summary = run_job(config, pool_factory=lambda c: pool, tokenizer=tokenizer)
    rows = read_output(config.output_dir).to_pylist()
    # Every (input row, question) exactly once.
    keys = Counter((r["source_file"], r["source_row"], r["question_index"]) for r in rows)
    assert set(keys.values()) == {1}
    ok = [r for r in rows if r["status"] == "ok"]
    split = [r for r in ok if r["sections"] > 1]
    single = [r for r in ok if r["sections"] == 1]
    assert split and single  # the corpus has both kinds
    calls = _calls_by_document(pool)
    assert all(tokens <= MAX_INPUT for tokens in pool.prompt_tokens)  # no call over the budget
    for r in single:
        assert (r["levels"], r["calls"], r["truncated_tokens"], r["section_outputs"]) == (1, 1, 0, None)
    for r in split:
        assert r["truncated_tokens"] == 0 and r["levels"] >= 1
        outputs = r["section_outputs"]
        level0 = [o for o in outputs if o["level"] == 0]
        assert [o["index"] for o in level0] == list(range(r["sections"]))
        # The sections cover the document once, in order.
        assert level0[0]["first_token"] == 0
        assert all(a["end_token"] == b["first_token"] for a, b in zip(level0, level0[1:]))
        if task == "summarize":
            # The fake engine's answers are never "not found": map, then combine to one output.
            assert r["levels"] >= 2 and r["output"] == outputs[-1]["output"]
            assert outputs[-1]["first_token"] == 0 and outputs[-1]["end_token"] == level0[-1]["end_token"]
            # Tokens and times summed over every call made for the row: the engine's own calls.
            assert r["calls"] == len(calls[r["id"]]) == len(outputs) - _carried(outputs)
            assert r["prompt_tokens"] == sum(calls[r["id"]])
            assert r["output_tokens"] == 4 * r["calls"]
            # The fake engine's device-seconds per call: prompt x 1e-4 + 0.01 (tests/jobs/conftest.py).
            assert r["device_time_s"] == pytest.approx(sum(calls[r["id"]]) * 1e-4 + 0.01 * r["calls"])
    # Job totals are the sums of the rows (every call counted once, never twice).
    assert summary["tokens"]["output"] == sum(r["output_tokens"] or 0 for r in rows)
    assert summary["engine_calls"] == len(pool.order)
    assert summary["device"]["cpu_seconds_all_ranks"] == pytest.approx(
        sum(r["device_time_s"] or 0.0 for r in rows), abs=1e-3)
    assert summary["documents"]["split"] == len({r["id"] for r in split})
    if task == "summarize":
        assert summary["tokens"]["prompt"] == sum(pool.prompt_tokens) == sum(r["prompt_tokens"] or 0 for r in rows)
    metrics = json.loads(open(os.path.join(config.output_dir, "_metrics.json")).read())
    assert metrics["documents"]["split"] == summary["documents"]["split"]
    assert metrics["documents"]["truncated"] == 0
    # The start line names the documents that were split, in input order, with their sections.
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("long documents (truncation"))
    split_ids = list(dict.fromkeys(r["id"] for r in sorted(split, key=lambda r: (r["source_file"], r["source_row"]))))
    assert f": {len(split_ids)} of the " in line and " will be answered in sections: " in line
    named = re.findall(r"(\S+) \(([\d,]+) tokens, (\d+) sections\)", line)
    assert [doc_id for doc_id, _, _ in named] == split_ids[:8]
    sections_of = {r["id"]: r["sections"] for r in split}
    assert all(int(sections) == sections_of[doc_id] for doc_id, _, sections in named)
    assert all(int(tokens.replace(",", "")) > MAX_INPUT for _, tokens, _ in named)
    latency_rows = sum(r["latency_s"] or 0.0 for r in rows)
    assert latency_rows == pytest.approx(sum(tokens * 1e-4 + 0.01 for tokens in _result_tokens(pool, task)), rel=1e-6)


def _carried(outputs: list[dict]) -> int:
    """Section outputs carried up a level without a call (a group of one)."""
    seen = {(o["level"], o["first_token"], o["end_token"], o["output"]) for o in outputs}
    return sum((o["level"] - 1, o["first_token"], o["end_token"], o["output"]) in seen for o in outputs
               if o["level"] > 0)


def _result_tokens(pool: FakePool, task: str) -> list[int]:
    """The prompt tokens of every result FakePool returned (one per suffix; its wall_time_s is
    prompt * 1e-4 + 0.01)."""
    return [len(r.prefix_ids) + len(s) for r in pool.requests for s in r.suffix_ids]


def test_a_document_at_the_budget_is_one_call_and_one_token_more_is_two_sections(tiny_chat_model, tokenizer,
                                                                                tmp_path):
    builder = PromptBuilder(tokenizer, task="summarize", templates=load_templates(None), max_input_tokens=MAX_INPUT,
                            truncation="hierarchical")
    budget = builder.document_budget(builder.suffixes(None))
    rng = random.Random(0)
    rows = [{"id": "at-budget", "text": " ".join(f"w{rng.randrange(3, 120)}" for _ in range(budget))},
            {"id": "one-over", "text": " ".join(f"w{rng.randrange(3, 120)}" for _ in range(budget + 1))}]
    os.makedirs(tmp_path / "corpus")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "part0.parquet")
    pool = FakePool()
    config = _config(tiny_chat_model, tmp_path)
    run_job(config, pool_factory=lambda c: pool, tokenizer=tokenizer)
    by_id = {r["id"]: r for r in read_output(config.output_dir).to_pylist()}
    assert (by_id["at-budget"]["sections"], by_id["at-budget"]["calls"]) == (1, 1)
    assert by_id["at-budget"]["prompt_tokens"] == MAX_INPUT  # the whole budget, nothing truncated
    assert by_id["one-over"]["sections"] == 2 and by_id["one-over"]["levels"] == 2
    assert by_id["one-over"]["calls"] == 3  # two sections, one combination
    sections = [o for o in by_id["one-over"]["section_outputs"] if o["level"] == 0]
    assert sections[-1]["end_token"] == budget + 1


class CrashingPool(FakePool):
    """Answers `answers` results, then fails the way a killed engine does (the driver dies)."""

    def __init__(self, answers: int):
        super().__init__()
        self.left = answers

    def run(self, requests, max_in_flight):
        for results in super().run(requests, max_in_flight):
            if self.left == 0:
                raise RuntimeError("engine lost")
            self.left -= 1
            yield results


def test_a_crash_inside_a_split_document_redoes_that_document_and_nothing_twice(tiny_chat_model, tokenizer,
                                                                                 tmp_path):
    write_corpus(str(tmp_path / "corpus"), 10, bad_rows=False, min_words=300, max_words=500)
    config = _config(tiny_chat_model, tmp_path, max_in_flight=2, schedule_window=2, part_rows=1)
    crashing = CrashingPool(answers=24)
    with pytest.raises(RuntimeError, match="engine lost"):
        run_job(config, pool_factory=lambda c: crashing, tokenizer=tokenizer)
    first = read_output(config.output_dir).to_pylist()
    started = {request_id.split("#")[0] for request_id in crashing.order}
    assert first and len({r["id"] for r in first}) < len(started)  # a split document was cut short
    pool = FakePool()
    run_job(config, pool_factory=lambda c: pool, tokenizer=tokenizer)
    rows = read_output(config.output_dir).to_pylist()
    assert Counter(r["id"] for r in rows) == Counter(f"doc{i:04d}" for i in range(10))
    assert all(r["status"] == "ok" and r["sections"] > 1 for r in rows)
    redone = {request_id.split("#")[0] for request_id in pool.order}
    committed_first = {r["id"] for r in first}
    assert not redone & committed_first  # committed documents are not asked again
    assert redone == {f"doc{i:04d}" for i in range(10)} - committed_first


def test_templates_of_the_sections_are_overridable_and_part_of_the_config_hash(tiny_chat_model, tokenizer,
                                                                               tmp_path):
    write_corpus(str(tmp_path / "corpus"), 4, bad_rows=False, min_words=300, max_words=400)
    templates = tmp_path / "templates.yaml"
    templates.write_text("summarize_combine:\n  user: \"w90 w91 {document} w92\"\n")
    one = run_job(_config(tiny_chat_model, tmp_path, output_dir=str(tmp_path / "a")), pool_factory=lambda c: FakePool(),
                  tokenizer=tokenizer)
    two = run_job(_config(tiny_chat_model, tmp_path, output_dir=str(tmp_path / "b"), templates_file=str(templates)),
                  pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    middle = run_job(_config(tiny_chat_model, tmp_path, output_dir=str(tmp_path / "c"), truncation="middle"),
                     pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    assert len({one["config_hash"], two["config_hash"], middle["config_hash"]}) == 3
    with pytest.raises(ValueError, match="summarize_combine.user must contain {document} exactly once"):
        templates.write_text("summarize_combine:\n  user: \"no document\"\n")
        load_templates(str(templates))


def test_a_nightly_run_answers_long_documents_in_sections_and_skips_them_the_next_night(
        tiny_chat_model, tokenizer, tmp_path):
    """The nightly job under the hierarchical policy: night 1 answers every document (the long ones
    in sections, each call within the budget); night 2 over the same corpus sends nothing to the
    engine; a changed long document is answered again, in sections, alone."""
    from pipeline.job import run_nightly

    write_corpus(str(tmp_path / "corpus"), 8, bad_rows=False, files=1, min_words=20, max_words=700)
    first = FakePool()
    config = _config(tiny_chat_model, tmp_path, output_dir=str(tmp_path / "unused"))
    run_nightly(config, output_root=str(tmp_path / "nightly"), run_date="2026-12-01",
                pool_factory=lambda c: first, tokenizer=tokenizer)
    night1 = read_output(str(tmp_path / "nightly" / "run_date=2026-12-01")).to_pylist()
    split = [r for r in night1 if r["sections"] > 1]
    assert len(night1) == 8 and split and all(r["status"] == "ok" for r in night1)
    assert all(tokens <= MAX_INPUT for tokens in first.prompt_tokens)

    second = FakePool()
    run_nightly(config, output_root=str(tmp_path / "nightly"), run_date="2026-12-02",
                pool_factory=lambda c: second, tokenizer=tokenizer)
    assert second.order == []  # nothing new: no call

    table = pq.read_table(str(tmp_path / "corpus"))
    long_id = split[0]["id"]
    texts = [t + " A new closing sentence." if i == long_id else t
             for i, t in zip(table["id"].to_pylist(), table["text"].to_pylist())]
    for name in os.listdir(tmp_path / "corpus"):
        os.remove(tmp_path / "corpus" / name)
    pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts)),
                   str(tmp_path / "corpus" / "part-0.parquet"))
    third = FakePool()
    run_nightly(config, output_root=str(tmp_path / "nightly"), run_date="2026-12-03",
                pool_factory=lambda c: third, tokenizer=tokenizer)
    night3 = read_output(str(tmp_path / "nightly" / "run_date=2026-12-03")).to_pylist()
    assert [r["id"] for r in night3] == [long_id] and night3[0]["sections"] > 1
    assert {request_id.split("#")[0] for request_id in third.order} == {long_id}

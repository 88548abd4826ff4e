"""The hierarchical policy's calls: sections, reduce levels, not-found answers, failures, sums."""

from __future__ import annotations

import copy

import pytest

from pipeline.config.task import SamplingParams
from pipeline.data.long_documents import LongDocumentPrompts, SplitDocument, requests_with_follow_ups
from pipeline.data.prompts import DEFAULT_TEMPLATES, NOT_FOUND
from pipeline.engine.requests import GenerationResult
from tests.jobs.conftest import load_tiny_tokenizer, tiny_chat_model  # noqa: F401 (fixture)

TEMPLATES = copy.deepcopy(DEFAULT_TEMPLATES)


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    return load_tiny_tokenizer(tiny_chat_model)


def answer_in_rounds(documents, prompts, generate):
    """Drives split documents to the end: every call that can start goes to one `generate` (the
    sections of all documents together), then the calls their results make possible."""
    owner, waiting = {}, []
    for document in documents:
        for request in document.start(prompts):
            owner[request.request_id] = document
            waiting.append(request)
    while waiting:
        answers = generate(waiting)
        batch, waiting = waiting, []
        for request, results in zip(batch, answers):
            document = owner.pop(request.request_id)
            for follow in document.on_results(request.request_id, results, prompts):
                owner[follow.request_id] = document
                waiting.append(follow)


def document(n_paragraphs: int, words: int = 20, plant: int | None = None) -> str:
    paragraphs = []
    for p in range(n_paragraphs):
        body = [f"w{3 + (p * words + i) % 90}" for i in range(words)]
        if p == plant:
            body[words // 2] = "w120"  # the planted fact
        paragraphs.append(" ".join(body) + " w100")
    return "\n\n".join(paragraphs)


class FakeEngine:
    """Answers every call at once; records the calls. Section answers: qa finds w120 where it is."""

    def __init__(self, tokenizer, *, output_words: int = 3, fail_level0_index: int | None = None):
        self.tokenizer = tokenizer
        self.output_words = output_words
        self.fail = fail_level0_index
        self.calls: list = []

    def __call__(self, requests):
        out = []
        for request in requests:
            self.calls.append(request)
            level, index, _ = request.request_id.rsplit("#", 1)[1].split(".")
            prefix = self.tokenizer.decode(request.prefix_ids)
            results = []
            for i, suffix in enumerate(request.suffix_ids):
                prompt = len(request.prefix_ids) + len(suffix)
                if level == "0" and int(index) == self.fail:
                    results.append(GenerationResult.error(request.request_id, i, "out_of_memory", "fake OOM",
                                                          prompt_tokens=prompt, wall_time_s=0.5, gpu_time_s=0.25))
                    continue
                if "w120" in prefix.split() or level != "0":
                    text = "w120 " + " ".join(f"w{5 + k}" for k in range(self.output_words - 1))
                else:
                    text = NOT_FOUND if suffix else " ".join(f"w{5 + k}" for k in range(self.output_words))
                results.append(GenerationResult(
                    request_id=request.request_id, suffix_index=i, output=text, prompt_tokens=prompt,
                    output_tokens=self.output_words, prefill_s=0.1, decode_s=0.2, wall_time_s=0.3,
                    gpu_time_s=0.05, peak_memory_bytes=100 + prompt, memory_kind="cpu_peak_rss"))
            out.append(results)
        return out


def split(tokenizer, text, *, task, max_input_tokens, questions=None):
    prompts = LongDocumentPrompts(tokenizer, task=task, templates=TEMPLATES, max_input_tokens=max_input_tokens)
    ids, offsets = prompts.tokenize(text)
    sections = prompts.cut(text, offsets, prompts.section.suffixes(questions))
    document = SplitDocument(key="doc", doc_ids=ids, sections=sections, questions=questions,
                             sampling=SamplingParams(max_new_tokens=8))
    return document, sections, prompts


def test_summary_maps_every_section_then_reduces_to_one(tokenizer):
    doc, sections, prompts = split(tokenizer, document(12), task="summarize", max_input_tokens=80)
    engine = FakeEngine(tokenizer)
    answer_in_rounds([doc], prompts, engine)
    assert doc.finished
    (outcome,) = doc.outcomes
    assert outcome.status == "ok" and outcome.output
    assert outcome.sections == len(sections) >= 4
    level0 = [c for c in engine.calls if "#0." in c.request_id]
    assert len(level0) == len(sections)
    # Every call's prompt fits the budget, and the sections cover the document once.
    assert all(c.prompt_tokens <= 80 for c in engine.calls)
    assert sum(s.tokens for s in sections) == len(doc.doc_ids)
    # Tokens and device time are sums over every call made for the row.
    assert outcome.calls == len(engine.calls)
    assert outcome.prompt_tokens == sum(c.prompt_tokens for c in engine.calls)
    assert outcome.output_tokens == 3 * len(engine.calls)
    assert outcome.gpu_time_s == pytest.approx(0.05 * len(engine.calls))
    assert outcome.wall_time_s == pytest.approx(0.3 * len(engine.calls))
    assert outcome.levels == 1 + max(int(c.request_id.rsplit("#", 1)[1].split(".")[0]) for c in engine.calls)
    # The section outputs of every level are kept, in order, with what they cover.
    assert [p.index for p in outcome.section_outputs if p.level == 0] == list(range(len(sections)))
    top = [p for p in outcome.section_outputs if p.level == outcome.levels - 1]
    assert len(top) == 1 and (top[0].first_token, top[0].end_token) == (0, len(doc.doc_ids))
    # Combine calls also stop where a new "Part" line would start; section calls do not.
    for call in engine.calls:
        assert ("\nPart " in call.sampling.stop) == ("#0." not in call.request_id)
        assert set(doc.sampling.stop) <= set(call.sampling.stop)


def test_summaries_that_do_not_fit_one_reduce_are_combined_in_levels(tokenizer):
    # Long section summaries and a small budget: one reduce prompt cannot hold them all.
    doc, sections, prompts = split(tokenizer, document(40), task="summarize", max_input_tokens=120)
    engine = FakeEngine(tokenizer, output_words=12)
    answer_in_rounds([doc], prompts, engine)
    (outcome,) = doc.outcomes
    assert outcome.status == "ok", outcome.error_message
    assert outcome.levels >= 3
    assert all(c.prompt_tokens <= 120 for c in engine.calls)
    # Each level has fewer outputs than the one below, and the last has one.
    per_level = [len([p for p in outcome.section_outputs if p.level == k]) for k in range(outcome.levels)]
    assert per_level[0] == len(sections) and per_level[-1] == 1
    assert all(a > b for a, b in zip(per_level, per_level[1:]))


def test_qa_finds_the_planted_fact_and_says_not_found_without_a_reduce(tokenizer):
    doc, sections, prompts = split(tokenizer, document(12, plant=7), task="qa", max_input_tokens=80,
                          questions=["w30 w31", "w32"])
    engine = FakeEngine(tokenizer)
    answer_in_rounds([doc], prompts, engine)
    outcomes = doc.outcomes
    assert len(outcomes) == 2
    for outcome in outcomes:
        # Only the section holding w120 answered: that answer is the output, no reduce call.
        assert outcome.output.startswith("w120")
        assert outcome.calls == len(sections) and outcome.levels == 1
    # Each section is one call whose prefix is shared by both questions.
    assert len(engine.calls) == len(sections) and all(len(c.suffix_ids) == 2 for c in engine.calls)
    doc, _, prompts = split(tokenizer, document(12), task="qa", max_input_tokens=80, questions=["w30"])
    answer_in_rounds([doc], prompts, FakeEngine(tokenizer))
    assert doc.outcomes[0].output == NOT_FOUND


def test_a_failed_section_fails_the_row_after_every_call_returned(tokenizer):
    doc, sections, prompts = split(tokenizer, document(12), task="summarize", max_input_tokens=80)
    engine = FakeEngine(tokenizer, fail_level0_index=2)
    answer_in_rounds([doc], prompts, engine)
    (outcome,) = doc.outcomes
    assert outcome.status == "error" and outcome.error_type == "out_of_memory"
    assert "section 3" in outcome.error_message and "fake OOM" in outcome.error_message
    # No reduce was started, and the failed call's time is counted with the others.
    assert len(engine.calls) == len(sections)
    assert outcome.wall_time_s == pytest.approx(0.3 * (len(sections) - 1) + 0.5)


def test_documents_share_rounds(tokenizer):
    made = [split(tokenizer, document(10 + i), task="summarize", max_input_tokens=80) for i in range(3)]
    docs, prompts = [m[0] for m in made], made[0][2]
    for i, d in enumerate(docs):
        d.key = f"doc{i}"
    rounds = []

    def engine(requests):
        rounds.append({r.request_id.split("#")[0] for r in requests})
        return FakeEngine(tokenizer)(requests)

    answer_in_rounds(docs, prompts, engine)
    assert all(d.finished for d in docs)
    assert rounds[0] == {"doc0", "doc1", "doc2"}  # every document's sections in the first round


def _answers_everywhere(tokenizer, calls, confidence):
    """An engine whose every section answers (never NOT FOUND, as small models do): section i
    answers "w{40 + i}" with a mean log-probability of confidence(i); a combine call answers
    "w99"."""
    def generate(requests):
        out = []
        for request in requests:
            calls.append(request)
            level, index, _ = request.request_id.rsplit("#", 1)[1].split(".")
            results = []
            for i, suffix in enumerate(request.suffix_ids):
                text, logprob = ("w99", -1.0) if level != "0" else (f"w{40 + int(index)}", confidence(int(index)))
                results.append(GenerationResult(
                    request_id=request.request_id, suffix_index=i, output=text, output_ids=[7, 8],
                    cumulative_logprob=2 * logprob, prompt_tokens=len(request.prefix_ids) + len(suffix),
                    output_tokens=2, wall_time_s=0.3, gpu_time_s=0.05))
            out.append(results)
        return out
    return generate


@pytest.mark.parametrize("qa_combine", ["reduce", "confidence"])
def test_qa_combine_reduces_or_takes_the_most_confident_section_answer(tokenizer, qa_combine):
    text = document(12)
    prompts = LongDocumentPrompts(tokenizer, task="qa", templates=TEMPLATES, max_input_tokens=80,
                                  qa_combine=qa_combine)
    ids, offsets = prompts.tokenize(text)
    questions = ["w30", "w31"]
    sections = prompts.cut(text, offsets, prompts.section.suffixes(questions))
    doc = SplitDocument(key="doc", doc_ids=ids, sections=sections, questions=questions,
                        sampling=SamplingParams(max_new_tokens=8))
    best = len(sections) // 2
    calls = []
    # Section `best` is the most confident; the two sections after it tie just below it.
    answer_in_rounds([doc], prompts, _answers_everywhere(
        tokenizer, calls, lambda i: -0.1 if i == best else -0.5 if i in (best + 1, best + 2) else -2.0 - i))
    level0 = len(sections)
    for outcome in doc.outcomes:
        assert outcome.status == "ok"
        pieces = [p for p in outcome.section_outputs if p.level == 0]
        assert [p.mean_logprob for p in pieces][best] == pytest.approx(-0.1)
        if qa_combine == "reduce":  # a combine call answered
            assert outcome.output == "w99" and outcome.calls > level0 and outcome.levels >= 2
        else:  # the most confident section's answer, no further call
            assert outcome.output == f"w{40 + best}"
            assert outcome.calls == level0 and outcome.levels == 1
    assert (len(calls) == level0) == (qa_combine == "confidence")
    if qa_combine == "confidence":  # a tie goes to the earlier section
        doc = SplitDocument(key="tie", doc_ids=ids, sections=sections, questions=questions[:1],
                            sampling=SamplingParams(max_new_tokens=8))
        answer_in_rounds([doc], prompts, _answers_everywhere(tokenizer, [], lambda i: -0.5 if i in (2, 3) else -3.0))
        assert doc.outcomes[0].output == "w42"


def test_qa_combine_is_checked_and_only_for_hierarchical_qa(tokenizer, tmp_path):
    from pipeline.config.job import JobConfig
    from pipeline.config.processor import DCAProcessorConfig

    with pytest.raises(ValueError, match="qa_combine must be one of"):
        LongDocumentPrompts(tokenizer, task="qa", templates=TEMPLATES, max_input_tokens=80, qa_combine="vote")
    base = dict(input_path=str(tmp_path), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="qa_combine must be one of"):
        JobConfig(task="qa", truncation="hierarchical", qa_combine="vote", **base)
    for task, truncation in (("summarize", "hierarchical"), ("qa", "middle")):
        with pytest.raises(ValueError, match="is for the qa task with truncation='hierarchical'"):
            JobConfig(task=task, truncation=truncation, qa_combine="confidence", **base)
        with pytest.raises(ValueError, match="is for the qa task with truncation='hierarchical'"):
            DCAProcessorConfig(task=task, truncation=truncation, qa_combine="confidence")
    assert DCAProcessorConfig(task="qa", truncation="hierarchical", qa_combine="confidence").qa_combine == "confidence"
    # A job's outputs under one combine are not resumed under the other (the config hash differs);
    # "reduce", the default, leaves the hash of outputs made before the setting existed as it was.
    from pipeline.config.job import config_hash

    hashes = {c: config_hash(JobConfig(task="qa", truncation="hierarchical", qa_combine=c, **base), TEMPLATES, "chat",
                             "fp") for c in ("reduce", "confidence")}
    assert hashes["reduce"] != hashes["confidence"]


def test_confidence_ranks_the_real_engines_answers(tiny_chat_model, tokenizer):
    """Through the real engine (tiny model, continuous batching): each section answer carries the
    model's mean log-probability of its tokens, and "confidence" answers with the found one that
    has the highest."""
    import torch

    from pipeline.config.model import ModelSpec
    from pipeline.engine.continuous import generate_continuous
    from pipeline.engine.generation import RankContext
    from pipeline.engine.models import load_model
    from tests.jobs.conftest import TINY_DCA

    model = load_model(ModelSpec(model=tiny_chat_model, dca=TINY_DCA), "cpu")
    ctx = RankContext(model=model, device=torch.device("cpu"), tokenizer=tokenizer,
                      eos_token_ids=frozenset({tokenizer.eos_token_id}), pad_token_id=tokenizer.pad_token_id or 0)
    text = document(10)
    prompts = LongDocumentPrompts(tokenizer, task="qa", templates=TEMPLATES, max_input_tokens=80,
                                  qa_combine="confidence")
    ids, offsets = prompts.tokenize(text)
    questions = ["w30 w31", "w44"]
    sections = prompts.cut(text, offsets, prompts.section.suffixes(questions))
    doc = SplitDocument(key="doc", doc_ids=ids, sections=sections, questions=questions,
                        sampling=SamplingParams(max_new_tokens=5))
    answer_in_rounds([doc], prompts, lambda requests: generate_continuous(ctx, requests, max_rows=4))
    assert doc.finished and len(doc.outcomes) == 2
    for outcome in doc.outcomes:
        assert outcome.status == "ok" and outcome.calls == len(sections) >= 3
        found = [p for p in outcome.section_outputs if p.output and NOT_FOUND not in p.output]
        assert found and all(p.mean_logprob is not None and p.mean_logprob < 0 for p in found)
        best = max(found, key=lambda p: p.mean_logprob)
        assert outcome.output == best.output
    # The sections' answers differ, and the chosen one is not simply the first section's.
    assert any(len({p.output for p in o.section_outputs}) > 1 for o in doc.outcomes)
    assert any(o.output != min(o.section_outputs, key=lambda p: p.index).output for o in doc.outcomes)

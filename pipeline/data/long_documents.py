"""Documents longer than the prompt budget, answered in sections (the "hierarchical" policy).

Under `truncation="hierarchical"` a document whose prompt would need truncating is not cut: its
tokens are split into sections at natural boundaries (pipeline.data.sections), each as large as
the prompt budget allows, and it is answered in several engine calls:

- summarize: every section is summarised (map); the section summaries, in document order, are
  combined by a reduce prompt; when they do not fit one prompt, consecutive summaries are combined
  in groups first, level after level, until one summary remains.
- qa: every section is asked every question of the document (the section is the prefix its
  questions share, one suffix per question: sections of one document share nothing else), with
  an explicit way to say that the answer is not in it (NOT_FOUND). For each question the answers
  that were found are combined (`qa_combine`): "reduce" (default) by a reduce prompt that gives
  their positions in the document; "confidence": the answer the model was most confident of (the
  highest mean log-probability per output token; the earliest on a tie), with no reduce call. No
  answer found: the output is NOT_FOUND, with no reduce call; one answer: that answer.

A reduce prompt lets a model that reads well combine answers spread over several sections; a small
model given many sections' answers (most sections answer something rather than NOT_FOUND) is better
served by "confidence": a section that holds the answer copies it with a far higher log-probability
than one that makes an answer up (benchmarks/long_documents.py measures both).

A document that fits is one ordinary call, exactly as under the other policies.

`SplitDocument` is the state of one split document, plain picklable data (it travels from the
prompt stage to the engine stage of the Ray Data dataflows); the prompts it needs come from the
caller's `LongDocumentPrompts` (one per process, holding the tokenizer). `start()` gives its first
calls, `on_results()` takes one call's results and gives the calls that became possible, and once
`finished`, `outcomes` holds one `Outcome` per output row with tokens and times summed over every
call made for it. Each call's results go to exactly one outcome per suffix, so summed over a
job's rows the device time is the engine's, counted once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pipeline.config.task import CONFIDENCE, QA_COMBINES, REDUCE, SamplingParams
from pipeline.config.validate import check_choice
from pipeline.data.prompts import NOT_FOUND, PromptBuilder, PromptError
from pipeline.data.sections import Section, cut_sections
from pipeline.engine.attention_record import MIXED
from pipeline.engine.requests import INTERNAL, PROMPT_TOO_LONG, GenerationRequest, GenerationResult

# A combine prompt lists its inputs as "Part i of n: ..." lines; room kept per input for the label
# of the largest i and n (the size of a group is known only once it is packed).
_LABEL_SLACK_TOKENS = 8
# A combine call also stops where its output starts another "Part" line: a small model continues
# the list it was shown ("... Part 1 of 5: In the") instead of ending its summary.
COMBINE_STOP = "\nPart "


def answered_in_sections(builder: PromptBuilder, document_tokens: int, suffixes: list[list[int] | None]) -> bool:
    """The policy's rule: a document longer than what the task's prompt (with these question
    suffixes) leaves under max_input_tokens is answered in sections; shorter, in one prompt.
    The rows (pipeline.data.rows.prepare_document) and the start line's count both apply it."""
    return document_tokens > builder.document_budget(suffixes)


def is_not_found(text: str | None) -> bool:
    """A section's answer that says the answer is not in the section (or says nothing)."""
    return text is None or not text.strip() or NOT_FOUND.lower() in text.lower()


@dataclass(frozen=True)
class SectionOutput:
    """One call's output for one output row: level 0 answers a section of the document, level
    k >= 1 combines outputs of level k - 1; tokens [first_token, end_token) of the document are
    what it covers."""

    level: int
    index: int
    first_token: int
    end_token: int
    output: str | None
    mean_logprob: float | None = None

    def to_dict(self) -> dict:
        return {"level": self.level, "index": self.index, "first_token": self.first_token,
                "end_token": self.end_token, "output": self.output, "mean_logprob": self.mean_logprob}


@dataclass
class Outcome:
    """One output row of a split document (one per question for qa, one for summarize)."""

    status: str = "ok"
    output: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    sections: int = 0
    levels: int = 1
    calls: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    wall_time_s: float = 0.0
    gpu_time_s: float | None = None
    device_time_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None
    replica: str | None = None
    attempts: int = 1
    section_outputs: list[SectionOutput] = field(default_factory=list)
    # The attention backend of the replicas that answered its calls (pipeline.engine.
    # attention_record); "mixed" when they differ; None until a replica answers one.
    attention_backend: str | None = None
    attention_backend_fallback: str | None = None

    def add(self, result: GenerationResult) -> None:
        """Sums one call's result for this row into it."""
        self.calls += 1
        self.prompt_tokens += result.prompt_tokens or 0
        self.output_tokens += result.output_tokens or 0
        self.prefill_s += result.prefill_s or 0.0
        self.decode_s += result.decode_s or 0.0
        self.wall_time_s += result.wall_time_s or 0.0
        if result.gpu_time_s is not None:
            self.gpu_time_s = (self.gpu_time_s or 0.0) + result.gpu_time_s
        if result.device_seconds_all_ranks is not None:
            self.device_time_s = (self.device_time_s or 0.0) + result.device_seconds_all_ranks
        if result.peak_memory_bytes is not None:
            self.peak_memory_bytes = max(self.peak_memory_bytes or 0, result.peak_memory_bytes)
        self.memory_kind = self.memory_kind or result.memory_kind
        self.replica = self.replica or result.replica
        self.attempts = max(self.attempts, result.attempts or 1)
        if result.attention_backend is not None:
            pair = (result.attention_backend, result.attention_backend_fallback)
            if self.attention_backend is None:
                self.attention_backend, self.attention_backend_fallback = pair
            elif (self.attention_backend, self.attention_backend_fallback) != pair:
                self.attention_backend = MIXED
                self.attention_backend_fallback = ("its calls ran on replicas with different attention backends "
                                                   "(_metrics.json attention_backend.by_replica)")


class LongDocumentPrompts:
    """The section and combine prompts of one task for one tokenizer (one per process)."""

    def __init__(self, tokenizer, *, task: str, templates: dict, max_input_tokens: int,
                 use_chat_template: bool | None = None, qa_combine: str = REDUCE) -> None:
        def builder(kind: str) -> PromptBuilder:
            # Never asked to truncate: sections and combine inputs are cut to fit first.
            return PromptBuilder(tokenizer, task=task, templates={task: templates[f"{task}_{kind}"]},
                                 max_input_tokens=max_input_tokens, truncation="end",
                                 use_chat_template=use_chat_template)

        check_choice("qa_combine", qa_combine, QA_COMBINES)
        self.task = task
        self.qa_combine = qa_combine
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.section = builder("section")
        self.combine = builder("combine")

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """A document's token ids (the ids PromptBuilder.encode gives) and each token's character
        span, from one tokenisation."""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), list(encoded["offset_mapping"])

    def cut(self, text: str, offsets: list[tuple[int, int]], suffixes: list[list[int] | None]) -> list[Section]:
        """The document's sections under the section prompt's budget for these question suffixes."""
        budget = self.section.document_budget(suffixes)
        if budget < 16:
            raise PromptError(
                f"the section prompt{' and question' if self.task == 'qa' else ''} leave {max(budget, 0)} tokens for "
                f"the document under max_input_tokens={self.max_input_tokens}: raise --max-input-tokens")
        return cut_sections(offsets, text, budget)

    def listing(self, pieces: list[SectionOutput], with_positions: bool) -> list[int]:
        """The token ids of a combine prompt's document: its inputs as labelled lines."""
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            label = f"Part {i + 1} of {len(pieces)}"
            if with_positions:
                label += f" (document tokens {piece.first_token:,}-{piece.end_token:,})"
            ids += self.combine.encode(f"{label}: {(piece.output or '').strip()}\n")
        return ids


@dataclass
class _Call:
    level: int
    index: int
    first_token: int
    end_token: int
    rows: list[int]  # the output row of each suffix


class SplitDocument:
    """The calls of one document that does not fit the prompt budget, round by round."""

    def __init__(self, *, key: str, doc_ids: list[int], sections: list[Section], questions: list[str] | None,
                 sampling: SamplingParams) -> None:
        if len(sections) < 2:
            raise ValueError("a document that fits one prompt is answered by one ordinary call")
        self.key = key
        self.doc_ids = doc_ids
        self.sections = sections
        self.questions = questions
        self.sampling = sampling
        self.outcomes = [Outcome(sections=len(sections)) for _ in (questions or [None])]
        self.outstanding: dict[str, _Call] = {}
        self._collected: list[dict[int, SectionOutput]] = [{} for _ in self.outcomes]  # this level's outputs
        self._expected: list[int] = [len(sections)] * len(self.outcomes)
        self._done: list[bool] = [False] * len(self.outcomes)
        self._calls_made = 0
        # Every result of every call (the job metrics count the engine's work from them) and the
        # prompt tokens sent (each call's prefix once, every suffix).
        self.results: list[GenerationResult] = []
        self.tokens_sent = 0

    @property
    def finished(self) -> bool:
        return not self.outstanding and all(self._done)

    @property
    def document_tokens(self) -> int:
        return len(self.doc_ids)

    def start(self, prompts: LongDocumentPrompts) -> list[GenerationRequest]:
        """The map round: one call per section (qa: the section is the prefix of every question)."""
        suffixes = prompts.section.suffixes(self.questions)
        rows = list(range(len(self.outcomes)))
        return [self._request(_Call(0, s.index, s.first_token, s.end_token, rows),
                              prompts.section.build_from_ids(self.doc_ids[s.first_token:s.end_token],
                                                             suffixes=suffixes))
                for s in self.sections]

    def on_results(self, request_id: str, results: list[GenerationResult],
                   prompts: LongDocumentPrompts) -> list[GenerationRequest]:
        """One call's results (one per suffix) -> the calls that can start now."""
        call = self.outstanding.pop(request_id)
        self.results.extend(results)
        by_suffix = {r.suffix_index: r for r in results}
        builder = prompts.section if call.level == 0 else prompts.combine
        follow: list[GenerationRequest] = []
        for suffix, row in enumerate(call.rows):
            outcome = self.outcomes[row]
            result = by_suffix.get(suffix) or GenerationResult.error(
                request_id, suffix, INTERNAL, f"the engine returned no result for suffix {suffix}")
            outcome.add(result)
            if self._done[row]:  # failed earlier: its other calls are counted, not used
                continue
            if result.status != "ok":
                where = "section" if call.level == 0 else f"level-{call.level} combination"
                outcome.status, outcome.error_type = "error", result.error_type
                outcome.error_message = (f"{where} {call.index + 1} (document tokens {call.first_token:,}-"
                                         f"{call.end_token:,}): {result.error_message}")
                self._done[row] = True
                continue
            piece = SectionOutput(call.level, call.index, call.first_token, call.end_token,
                                  builder.output_text(result.output), result.mean_logprob)
            outcome.section_outputs.append(piece)
            self._collected[row][call.index] = piece
            if len(self._collected[row]) == self._expected[row]:
                follow += self._next_level(row, call.level, prompts)
        return follow

    # -- levels

    def _next_level(self, row: int, level: int, prompts: LongDocumentPrompts) -> list[GenerationRequest]:
        """Every output of `level` for this row is in: the next level's combine calls, or the
        row's final output."""
        outcome = self.outcomes[row]
        pieces = [self._collected[row][i] for i in sorted(self._collected[row])]
        self._collected[row] = {}
        qa = self.questions is not None
        if qa and level == 0:
            pieces = [p for p in pieces if not is_not_found(p.output)]
            if not pieces:
                return self._finish(row, NOT_FOUND)
            if prompts.qa_combine == CONFIDENCE:  # max keeps the first of equals: the earliest
                return self._finish(row, max(pieces, key=_confidence).output)
        if len(pieces) == 1 and (level > 0 or qa):
            return self._finish(row, pieces[0].output)
        suffixes = prompts.combine.suffixes([self.questions[row]] if qa else None)
        groups = _pack(pieces, [len(prompts.listing([p], qa)) + _LABEL_SLACK_TOKENS for p in pieces],
                       prompts.combine.document_budget(suffixes))
        if groups is None:
            outcome.status, outcome.error_type = "error", PROMPT_TOO_LONG
            outcome.error_message = (
                f"the {len(pieces)} outputs of level {level} do not fit a combine prompt two at a time under "
                f"max_input_tokens={prompts.max_input_tokens}: raise --max-input-tokens or lower --max-new-tokens")
            self._done[row] = True
            return []
        outcome.levels = level + 2
        self._expected[row] = len(groups)
        requests = []
        for index, group in enumerate(groups):
            if len(group) == 1:  # nothing to combine: carried up as it is
                piece = group[0]
                self._collected[row][index] = SectionOutput(level + 1, index, piece.first_token, piece.end_token,
                                                            piece.output, piece.mean_logprob)
                continue
            call = _Call(level + 1, index, group[0].first_token, group[-1].end_token, [row])
            requests.append(self._request(call, prompts.combine.build_from_ids(prompts.listing(group, qa),
                                                                             suffixes=suffixes),
                                          sampling=self._combine_sampling))
        return requests  # never empty: _pack puts two pieces together at least once

    def _finish(self, row: int, text: str | None) -> list[GenerationRequest]:
        self.outcomes[row].output = text
        self._done[row] = True
        return []

    @property
    def _combine_sampling(self) -> SamplingParams:
        stop = tuple(self.sampling.stop)
        return dataclasses.replace(self.sampling, stop=stop if COMBINE_STOP in stop else (*stop, COMBINE_STOP))

    def _request(self, call: _Call, prompt, sampling: SamplingParams | None = None) -> GenerationRequest:
        request_id = f"{self.key}#{call.level}.{call.index}.{self._calls_made}"
        self._calls_made += 1
        self.outstanding[request_id] = call
        self.tokens_sent += len(prompt.prefix_ids) + sum(len(s) for s in prompt.suffix_ids)
        return GenerationRequest(request_id=request_id, prefix_ids=prompt.prefix_ids, suffix_ids=prompt.suffix_ids,
                                 sampling=sampling or self.sampling)


def _confidence(piece: SectionOutput) -> float:
    return piece.mean_logprob if piece.mean_logprob is not None else float("-inf")


def _pack(pieces: list[SectionOutput], sizes: list[int], budget: int) -> list[list[SectionOutput]] | None:
    """Consecutive pieces packed greedily into groups of at most `budget` tokens; None when no
    two pieces fit together (the levels could not converge)."""
    if sum(sizes) <= budget:
        return [pieces]
    groups: list[list[SectionOutput]] = [[]]
    used = 0
    for piece, size in zip(pieces, sizes):
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(piece)
        used += size
    return None if all(len(g) == 1 for g in groups) else groups


def requests_with_follow_ups(first: Iterable[GenerationRequest], follow_ups: list[GenerationRequest],
                             waiting: Callable[[], bool]) -> Iterator[GenerationRequest | None]:
    """A request source for ReplicaPool.run that also sends the calls split documents make
    possible: follow-ups (appended to `follow_ups` by the caller as results come in) go first;
    once `first` is exhausted, None ("wait for a result") while `waiting()` says split documents
    still have calls outstanding."""
    for request in first:
        while follow_ups:
            yield follow_ups.pop(0)
        yield request
    while True:
        while follow_ups:
            yield follow_ups.pop(0)
        if not waiting():
            return
        yield None


@dataclass
class SplitCensus:
    """Which documents of a job's input will be answered in sections (`split_census`)."""

    looked_at: int = 0
    # (id, document tokens, sections) of each document over the budget; sections None when its
    # section prompt cannot be built (the row will say why).
    split: list[tuple[str | int, int, int | None]] = field(default_factory=list)
    # False: the census stopped at its time limit before the end of the input.
    complete: bool = True


def split_census(documents: Iterable, builder: PromptBuilder, prompts: LongDocumentPrompts, *,
                 seconds: float = 10.0) -> SplitCensus:
    """The documents (pipeline.data.input.Document, those the job will send) that are over the
    prompt budget, by the rule the job applies to each (pipeline.data.rows.prepare_document), for
    the start line. It tokenizes each document once more, so it stops after `seconds`: a large
    input gets a count of its first documents."""
    census = SplitCensus()
    start = time.perf_counter()
    for doc in documents:
        if time.perf_counter() - start > seconds:
            census.complete = False
            break
        census.looked_at += 1
        if doc.error_type or doc.text is None:
            continue
        questions = None
        if prompts.task == "qa":
            questions = [q for q, e in zip(doc.questions or [], doc.question_errors) if e is None]
            if not questions:
                continue
        ids, offsets = prompts.tokenize(doc.text)
        if not answered_in_sections(builder, len(ids), builder.suffixes(questions)):
            continue
        try:
            sections = len(prompts.cut(doc.text, offsets, prompts.section.suffixes(questions)))
        except PromptError:
            sections = None
        census.split.append((doc.id, len(ids), sections))
    return census


def describe_hierarchical(builder: PromptBuilder, prompts: LongDocumentPrompts, census: SplitCensus | None = None,
                          *, listed: int = 8) -> str:
    """The job's start line under the hierarchical policy: the rule, and which documents will be
    split (the first `listed` by id, then a count) when a census was taken."""
    question = " less each question's tokens" if prompts.task == "qa" else ""
    whole = builder.document_budget(builder.suffixes(["?"] if prompts.task == "qa" else None))
    section = prompts.section.document_budget(prompts.section.suffixes(["?"] if prompts.task == "qa" else None))
    rule = (f"a document over {whole:,} tokens{question} (what --max-input-tokens {prompts.max_input_tokens:,} leaves "
            f"beside the {prompts.task} prompt) is answered in sections of at most {section:,} tokens{question}, then "
            f"combined; shorter documents are one prompt")
    if census is None:
        return f"long documents (truncation hierarchical): {rule}"
    where = (f"of the {census.looked_at:,} documents to answer" if census.complete else
             f"of the first {census.looked_at:,} documents to answer (the rest were not counted: the count stops "
             f"after a few seconds)")
    if not census.split:
        return f"long documents (truncation hierarchical): none {where} is over the budget; {rule}"
    names = ", ".join(f"{doc_id} ({tokens:,} tokens, {sections if sections is not None else '?'} sections)"
                      for doc_id, tokens, sections in census.split[:listed])
    more = f" and {len(census.split) - listed:,} more" if len(census.split) > listed else ""
    return (f"long documents (truncation hierarchical): {len(census.split):,} {where} will be answered in sections: "
            f"{names}{more}; {rule}")

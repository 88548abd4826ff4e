"""The one row builder: documents -> requests -> output rows, ok and error, for every dataflow (the
driver, the ray-data units, the Ray Data processor). Plain functions over plain data.

    prepared = prepare_document(doc, task=..., builder=..., base=..., sampling=...)
    if prepared.request is None and prepared.pending is None:   # answered already: invalid input,
        emit(prepared.rows)                                      # prompt too long
    elif prepared.request is not None:              # send prepared.request to the engine, then
        emit(result_rows(prepared.pending, results, base=..., builder=...))
    else:                                           # split (hierarchical policy): drive
        ...                                         # prepared.pending.split's calls, then
        emit(split_rows(prepared.pending, base=...))

A row is `base` (the columns every row of the run shares: task, model, hashes, job id, the DCA
settings, the engine's attention backend; `job_columns`, `dca_columns`, `set_engine_attention`)
plus the document's own columns (`document_row`) plus what happened to it (the answering
replica's attention backend included). Every row has a subset of pipeline.data.schema.OUTPUT_SCHEMA's columns; a column
added there is filled here.

`RowRules` holds what the processor does differently from the jobs today (JOB_ROWS vs
PROCESSOR_ROWS). Each difference is a flag, so that making the processor's rows the jobs' is a
one-line change here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass

from pipeline.config.model import ModelError, ModelSpec, dca_config_for
from pipeline.config.task import SamplingParams
from pipeline.data.input import Document
from pipeline.data.long_documents import LongDocumentPrompts, SplitDocument, answered_in_sections
from pipeline.data.prompts import PromptBuilder, PromptError
from pipeline.engine.attention_record import columns_of
from pipeline.engine.requests import INTERNAL, INVALID_INPUT, PROMPT_TOO_LONG, GenerationRequest, GenerationResult

log = logging.getLogger("pipeline.job")


@dataclass(frozen=True, kw_only=True)
class RowRules:
    """How one dataflow writes its rows. JOB_ROWS is the jobs' (both dataflows); PROCESSOR_ROWS
    the Ray Data processor's, which differs from the jobs' in each flag set otherwise."""

    # Outputs as PromptBuilder.output_text gives them (the whitespace the model writes after the
    # prompt's response prefix, "Summary:", dropped); False: the generated text as it is.
    strip_response: bool = True
    # Engine errors prefixed with the row's source ("file row N: out of memory ..."); False: the
    # engine's message alone.
    source_in_engine_errors: bool = True
    # Put between the source and a PromptError's message ("row 3 of this batch: prompt: ...").
    prompt_error_prefix: str = ""
    # Rows answered without the model carry truncated_tokens (0 before a prompt was built, the
    # prompt's own count for a question rejected beside valid ones); False: null.
    truncated_tokens_on_rejected_rows: bool = False
    # A prompt that fails to build for another reason than its length (a tokenizer error) becomes
    # that document's internal_error rows; False: the error is raised.
    prompt_failure_is_internal_error: bool = True


JOB_ROWS = RowRules()
PROCESSOR_ROWS = RowRules(source_in_engine_errors=False, prompt_error_prefix="prompt: ",
                          truncated_tokens_on_rejected_rows=True, prompt_failure_is_internal_error=False)


@dataclass
class PendingDocument:
    """A document sent to the engine, waiting for its results: what its rows need then."""

    doc: Document  # without its text
    question_indices: list[int | None]  # output question_index of each suffix sent
    invalid_rows: list[dict]  # QA rows for questions that were not sent
    truncated_tokens: int
    prompt_tokens_sent: int
    # A document answered in sections (hierarchical policy): its calls' state; None for one call.
    split: SplitDocument | None = None


@dataclass
class PreparedDocument:
    """A document made ready for the engine (`request`, and `pending` for its results), split into
    sections (`request` None, `pending.split` the calls to make), or answered already (`request`
    and `pending` None, `rows` its error rows)."""

    rows: list[dict]
    request: GenerationRequest | None = None
    pending: PendingDocument | None = None


def dca_columns(spec: ModelSpec, model_config) -> dict:
    """The resolved DCA settings as output columns; ModelError for settings DCA rejects."""
    cols = {"dca_enabled": spec.dca is not None, "dca_pretraining_length": None, "dca_chunk_size": None,
            "dca_local_window": None, "dca_temperature_alpha": None}
    if spec.dca is None:
        return cols
    try:
        dca = dca_config_for(spec, model_config)
    except (TypeError, ValueError) as error:
        raise ModelError(f"DCA settings {spec.dca} (the dca: block of --config): {error}") from None
    cols.update(dca_pretraining_length=dca.pretraining_length, dca_chunk_size=dca.chunk_size,
                dca_local_window=dca.local_window, dca_temperature_alpha=dca.temperature_alpha)
    return cols


def job_columns(*, task: str, model: str, config_hash: str, job_id: str, dca: dict) -> dict:
    """The columns every row of a job shares (the `base` of its rows). The attention backend is
    null until the engine has started (`set_engine_attention`)."""
    return {"task": task, "model": model, "config_hash": config_hash, "job_id": job_id, **dca,
            **columns_of(None)}


def set_engine_attention(base: dict, engine_record: dict | None) -> dict:
    """Puts the engine's attention backend (pipeline.engine.attention_record.engine_record, once
    its replicas have started) into `base`, in place: what rows no replica answered carry (every
    answered row carries its own replica's). Returns `base`."""
    base.update(columns_of(engine_record))
    return base


def stamp_engine_attention(rows: list[dict], engine_record: dict | None) -> None:
    """Rows built before the engine started (a unit's or a batch's error rows, made in the prompt
    stage) get the engine's attention columns, as rows built after it do."""
    columns = columns_of(engine_record)
    for row in rows:
        row.update(columns)


def document_row(base: dict, doc: Document, **values) -> dict:
    """One output row of `doc`: the run's columns, the document's, then `values`."""
    row = dict(base)
    row.update(id=doc.id, source_file=doc.source_file, source_row=doc.source_row, content_hash=doc.content_hash,
               status="ok", question_index=None, question=None)
    row.update(values)
    return row


def error_rows(base: dict, doc: Document, task: str, error_type: str, message: str, **values) -> list[dict]:
    """The same error for every output row of `doc` (one per question for QA)."""
    questions = doc.questions if task == "qa" and doc.questions else [None]
    return [
        document_row(base, doc, status="error", error_type=error_type, error_message=message,
                     question_index=i if task == "qa" else None, question=q, **values)
        for i, q in enumerate(questions)
    ]


def prepare_document(doc: Document, *, task: str, builder: PromptBuilder, base: dict, sampling: SamplingParams,
                     rules: RowRules = JOB_ROWS, long_prompts: LongDocumentPrompts | None = None) -> PreparedDocument:
    """`doc` made ready for the engine: its request (the request id is the document id as a
    string: jobs send only documents with a unique id), its sections when it is over the budget
    and `long_prompts` is given (the hierarchical policy), or its error rows when it cannot be sent (a row error of
    the input, every question invalid, a prompt too long)."""
    rejected = {"truncated_tokens": 0} if rules.truncated_tokens_on_rejected_rows else {}
    if doc.error_type:
        return PreparedDocument(rows=error_rows(base, doc, task, doc.error_type, doc.error_message, **rejected))
    questions = doc.questions if task == "qa" else None
    valid = [i for i, e in enumerate(doc.question_errors) if e is None] if questions else []
    invalid_rows = [
        document_row(base, doc, status="error", error_type=INVALID_INPUT, error_message=f"{doc.source}: {e}",
                     question_index=i, question=questions[i], **rejected)
        for i, e in enumerate(doc.question_errors) if e is not None
    ] if questions else []
    if task == "qa" and not valid:
        return PreparedDocument(rows=invalid_rows)
    sent_questions = [questions[i] for i in valid] if questions else None
    try:
        if long_prompts is None:
            prompt = builder.build(doc.text, sent_questions)
        else:
            suffixes = builder.suffixes(sent_questions)
            ids, offsets = long_prompts.tokenize(doc.text)
            if answered_in_sections(builder, len(ids), suffixes):
                return _split_document(doc, ids, offsets, sent_questions, valid, invalid_rows, long_prompts,
                                       sampling)
            prompt = builder.build_from_ids(ids, suffixes=suffixes)
    except PromptError as e:
        return PreparedDocument(rows=error_rows(base, doc, task, PROMPT_TOO_LONG,
                                                f"{doc.source}: {rules.prompt_error_prefix}{e}", **rejected))
    except Exception as e:  # a tokenizer failure on one document must not stop the job
        if not rules.prompt_failure_is_internal_error:
            raise
        log.exception("building the prompt of %s failed", doc.source)
        return PreparedDocument(rows=error_rows(base, doc, task, INTERNAL,
                                                f"{doc.source}: could not build the prompt: {e!r}"))
    if rules.truncated_tokens_on_rejected_rows:
        for row in invalid_rows:
            row["truncated_tokens"] = prompt.truncated_tokens
    request = GenerationRequest(  # an integer id's digits: request ids are strings
        request_id=str(doc.id), prefix_ids=prompt.prefix_ids, suffix_ids=prompt.suffix_ids, sampling=sampling,
    )
    sent = len(prompt.prefix_ids) + sum(len(s) for s in prompt.suffix_ids)
    # The rows need the document's place, id, questions and hash, not its text: the pending copy
    # leaves it behind (it would travel to the engine stage and wait in memory for nothing).
    pending = PendingDocument(dataclasses.replace(doc, text=None), valid if questions else [None], invalid_rows,
                              prompt.truncated_tokens, sent)
    return PreparedDocument(rows=[], request=request, pending=pending)


def result_rows(pending: PendingDocument, results: list[GenerationResult], *, base: dict, builder: PromptBuilder,
                rules: RowRules = JOB_ROWS) -> list[dict]:
    """All output rows of an answered document, in question order: one per suffix sent (an ok row
    or the engine's error), and the rows of its questions that were not sent."""
    doc = pending.doc
    by_suffix = {r.suffix_index: r for r in results}
    rows = list(pending.invalid_rows)
    for suffix_index, question_index in enumerate(pending.question_indices):
        result = by_suffix.get(suffix_index)
        question = doc.questions[question_index] if question_index is not None else None
        if result is None:
            rows.append(document_row(base, doc, status="error", error_type=INTERNAL, question_index=question_index,
                                     question=question, truncated_tokens=pending.truncated_tokens,
                                     error_message=f"the engine returned no result for suffix {suffix_index}"))
            continue
        output = None
        if result.status == "ok":
            output = builder.output_text(result.output) if rules.strip_response else result.output
        error_message = result.error_message
        if rules.source_in_engine_errors:
            error_message = f"{doc.source}: {result.error_message}" if result.error_message else None
        rows.append(document_row(
            base, doc, question_index=question_index, question=question, output=output,
            status=result.status, error_type=result.error_type, error_message=error_message,
            prompt_tokens=result.prompt_tokens, output_tokens=result.output_tokens,
            truncated_tokens=pending.truncated_tokens, prefill_s=result.prefill_s, decode_s=result.decode_s,
            latency_s=result.wall_time_s, gpu_time_s=result.gpu_time_s,
            device_time_s=result.device_seconds_all_ranks,
            peak_memory_bytes=result.peak_memory_bytes, memory_kind=result.memory_kind,
            replica=result.replica, attempts=result.attempts, sections=1, levels=1, calls=1,
            **_attention_of(result),
        ))
    rows.sort(key=lambda r: -1 if r["question_index"] is None else r["question_index"])
    return rows


def _split_document(doc: Document, ids: list[int], offsets, questions: list[str] | None, valid: list[int],
                    invalid_rows: list[dict], long_prompts: LongDocumentPrompts,
                    sampling: SamplingParams) -> PreparedDocument:
    """A document over the budget under the hierarchical policy: its sections, ready to be driven."""
    sections = long_prompts.cut(doc.text, offsets, long_prompts.section.suffixes(questions))
    split = SplitDocument(key=str(doc.id), doc_ids=ids, sections=sections, questions=questions, sampling=sampling)
    pending = PendingDocument(dataclasses.replace(doc, text=None), valid if questions else [None], invalid_rows,
                              0, 0, split=split)
    return PreparedDocument(rows=[], request=None, pending=pending)


def split_rows(pending: PendingDocument, *, base: dict, rules: RowRules = JOB_ROWS) -> list[dict]:
    """All output rows of a document answered in sections, in question order: one per question
    sent (pending.split.outcomes, tokens and times summed over every call made for it), and the
    rows of its questions that were not sent."""
    doc, split = pending.doc, pending.split
    rows = list(pending.invalid_rows)
    for outcome, question_index in zip(split.outcomes, pending.question_indices):
        error_message = outcome.error_message
        if rules.source_in_engine_errors and error_message:
            error_message = f"{doc.source}: {error_message}"
        rows.append(document_row(
            base, doc, question_index=question_index,
            question=doc.questions[question_index] if question_index is not None else None,
            output=outcome.output if outcome.status == "ok" else None, status=outcome.status,
            error_type=outcome.error_type, error_message=error_message, prompt_tokens=outcome.prompt_tokens,
            output_tokens=outcome.output_tokens, truncated_tokens=0, prefill_s=outcome.prefill_s,
            decode_s=outcome.decode_s, latency_s=outcome.wall_time_s, gpu_time_s=outcome.gpu_time_s,
            device_time_s=outcome.device_time_s,
            peak_memory_bytes=outcome.peak_memory_bytes, memory_kind=outcome.memory_kind, replica=outcome.replica,
            attempts=outcome.attempts, sections=outcome.sections, levels=outcome.levels, calls=outcome.calls,
            section_outputs=[piece.to_dict() for piece in sorted(outcome.section_outputs,
                                                                  key=lambda p: (p.level, p.index))],
            **({"attention_backend": outcome.attention_backend,
                "attention_backend_fallback": outcome.attention_backend_fallback}
               if outcome.attention_backend is not None else {}),  # else the base's (the engine's)
        ))
    rows.sort(key=lambda r: -1 if r["question_index"] is None else r["question_index"])
    return rows


def _attention_of(result: GenerationResult) -> dict:
    """The answering replica's attention columns; none (the base's, the engine's) when no
    replica answered."""
    if result.attention_backend is None:
        return {}
    return {"attention_backend": result.attention_backend,
            "attention_backend_fallback": result.attention_backend_fallback}


class InFlight:
    """Documents sent to the engine, by request id, until their results come: each request is
    answered once (a second answer, or one for a request never sent, is dropped with a warning).
    Thread-safe."""

    def __init__(self) -> None:
        self._pending: dict[str, PendingDocument] = {}
        self._answered: set[str] = set()
        self._lock = threading.Lock()

    def add(self, request_id: str, pending: PendingDocument) -> None:
        with self._lock:
            self._pending[request_id] = pending

    def answer(self, results: list[GenerationResult]) -> PendingDocument | None:
        """The document `results` answer, taken out; None for a second or unknown answer."""
        if not results:
            return None
        request_id = results[0].request_id
        with self._lock:
            if request_id in self._answered:  # never twice into the output
                log.warning("dropping a second answer for request %s", request_id)
                return None
            pending = self._pending.pop(request_id, None)
            if pending is None:
                log.warning("dropping an answer for unknown request %s", request_id)
                return None
            self._answered.add(request_id)
        return pending

    def __len__(self) -> int:
        return len(self._pending)

"""The batch job driver: Parquet corpus -> prompts -> replica pool -> committed Parquet output.

    config = JobConfig(task="summarize", input_path="/data/corpus", output_dir="/data/out")
    summary = run_job(config)

Order of work, so that mistakes cost seconds, not GPU hours:
1. check the schema of every input file and that the model exists;
2. open the output (resume / refuse a different job / --overwrite);
3. load the tokenizer, start the replicas, stream documents through them.

Scheduling: documents are read as a stream; each window of `schedule_window` prompts is sent
longest first (long documents do not trail at the end of the job), and at most `max_in_flight`
requests are inside the engine at any time (backpressure: the reader waits for the engine). The
engine batches short prompts together inside a replica.

Exactly once: a document's rows are committed together by the output writer; a rerun skips
committed documents. The engine retries requests of a failed replica on another one and returns
one result list per request; the driver also drops a second answer for the same request.

Driver-side: no torch/deepspeed at import; transformers is imported when the tokenizer loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pipeline.config_files import TASK_GENERATION_DEFAULTS, settle_task_fields  # noqa: F401 (re-exported)
from pipeline.io import INPUT_ERROR_TYPES, INVALID_INPUT, Document, InputSpec, check_input, iter_documents
from pipeline.job_metrics import JobMetrics
from pipeline.models import ModelError, ModelSpec, load_model_config, model_fingerprint
from pipeline.output import DATAFLOWS, OutputWriter
from pipeline.prompts import PromptBuilder, PromptError, load_templates
from pipeline.requests import INTERNAL, PROMPT_TOO_LONG, GenerationRequest, GenerationResult, SamplingParams

log = logging.getLogger("pipeline.job")

# The engine's default rows per replica batch (pipeline.engine.EngineConfig.max_batch_size).
_ENGINE_MAX_BATCH_SIZE = 8
# Production defaults, shared with the memory planner's flags (jobs.plan) so that a plan is made
# for what a job runs: DCA on (pipeline.models.ModelSpec), the engine's "auto" prefill (one DCA
# chunk, at least 1024 tokens, per step of the continuous scheduler: activation memory set by
# DCA's chunk_len, not by the prompt), the model's own KV dtype.
DEFAULT_MAX_INPUT_TOKENS = 32768
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_PREFILL_BLOCK = "auto"
KV_CACHE_DTYPES = ("auto", "int8")



class JobFailed(RuntimeError):
    """The job stopped before finishing (failure budget, engine failure); committed output is kept."""


class JobStopped(BaseException):
    """SIGTERM or SIGINT: the job commits what is done, writes its metrics and exits 128 + signal.

    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way (a prompt that
    fails to build becomes an error row) mistakes a stop for one document's failure."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


class _StopSignals:
    """SIGTERM (`ray job stop`, schedulers) and SIGINT raise JobStopped in the main thread, except
    inside a critical section (a part being committed, a document's rows being counted), where
    the stop is raised at its end. A second signal while stopping is ignored: the cleanup runs
    to the end (commit, metrics, staging removed) within the few seconds `ray job stop` waits.

    Installed again after `ray.init`, which replaces the SIGTERM handler with its own (that one
    kills the local Ray processes and exits before anything is committed)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.closing = False  # cleanup has begun: never raise again
        self._critical = 0
        self._pending = False
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (library use in a thread)
        for sig in self.SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None or self.closing:
            log.warning("%s received while stopping: finishing the commit first", signal.Signals(signum).name)
            self.signum = self.signum or signum
            return
        self.signum = signum
        log.warning("%s received: committing finished documents, then stopping", signal.Signals(signum).name)
        if self._critical:
            self._pending = True
            return
        raise JobStopped(signum)

    @contextmanager
    def critical(self):
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self._pending and not self._critical and not self.closing:
            self._pending = False
            raise JobStopped(self.signum)


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything a batch job needs. Loadable from a YAML/JSON file via jobs.common."""

    # "summarize" | "qa".
    task: str
    # Parquet file, directory or glob (local or s3://, gs://...).
    input_path: str
    # Local (or mounted shared) directory; must be absolute (jobs.common resolves CLI paths).
    output_dir: str
    # Input column names. question_column: QA only; "question" (string) or "questions" (list<string>).
    id_column: str = "id"
    text_column: str = "text"
    question_column: str | None = None
    # Which model, dtype and DCA settings (pipeline.models.ModelSpec).
    model_spec: ModelSpec = field(default_factory=ModelSpec)
    # Ranks per replica (tensor parallelism) and number of replicas.
    tp: int = 1
    replicas: int = 1
    # Longest prompt sent to the model (tokens): longer documents are truncated (see truncation).
    max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS
    # Tokens generated per output row at most.
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    # "middle": keep beginning and end of the document; "end": keep the beginning only.
    truncation: str = "middle"
    # YAML/JSON file overriding the prompt templates (pipeline.prompts.DEFAULT_TEMPLATES).
    templates_file: str | None = None
    # None: the tokenizer's chat template when it has one; False: always the base template.
    use_chat_template: bool | None = None
    # Sampling: greedy unless do_sample; seed makes sampling reproducible.
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    # Generation stops at the first of these strings (cut from the output). None: the task's
    # default (pipeline.config_files.TASK_GENERATION_DEFAULTS).
    stop: tuple[str, ...] | None = None
    # Repetition guard on the tokens generated so far (prompt tokens are not penalised: a summary
    # may reuse the document's names): their logits are divided by repetition_penalty (> 1), and
    # no n-gram of no_repeat_ngram_size tokens is generated twice. None: the task's default.
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    # Requests inside the engine at once (backpressure) and the longest-first reordering window.
    max_in_flight: int | None = None  # None: 2 x max_batch_size per replica
    schedule_window: int | None = None  # None: 4 x max_in_flight
    # Engine limits (None: the engine's defaults). scheduler: "continuous" or "static"
    # (pipeline.engine.EngineConfig.scheduler).
    scheduler: str | None = None
    max_batch_tokens: int | None = None
    max_batch_size: int | None = None
    max_restarts: int | None = None
    request_retries: int | None = None
    device: str | None = None
    # KV cache storage "auto" (the model dtype) | "int8", and prompt tokens per prefill forward:
    # "auto" (the engine's: one DCA chunk, at least 1024 tokens, per continuous-batching step; one
    # shot with the static scheduler or without DCA), "chunk" one DCA chunk of chunk_len L tokens
    # (one shot when DCA is off), None (or "none") one shot, or a number. docs/memory.md says
    # what each buys.
    kv_cache_dtype: str = "auto"
    prefill_block: int | str | None = DEFAULT_PREFILL_BLOCK
    # CPUs (and torch threads) per rank. None: on a local Ray, this machine's cores shared evenly
    # between all ranks; on a cluster, the engine's default (1).
    cpus_per_rank: int | None = None
    # Autoscaling clusters (device "cuda", GPU workers scaled from 0): how long to wait for the
    # autoscaler to bring up the GPUs of all replicas before giving up.
    scale_up_timeout_s: float = 1800.0
    # Failure budget: stop when error documents exceed this fraction of max(done, budget_min_documents).
    max_error_fraction: float = 0.1
    budget_min_documents: int = 20
    # Output commit cadence: a part every part_rows rows or part_seconds seconds, whichever first.
    part_rows: int = 256
    part_seconds: float = 30.0
    # Replace an output directory that holds another job's results.
    overwrite: bool = False
    # Label written to every row; None: "<task>-<fingerprint>" (stable across resumes).
    job_id: str | None = None
    # Progress bar on stderr (documents done/total, tokens/s, ETA).
    progress: bool = True
    # Ray: None = RAY_ADDRESS if set (ray job submit sets it), else start a local Ray.
    ray_address: str | None = None
    # Rows per input record batch.
    input_batch_rows: int = 64
    # "driver": one driver process reads, tokenises, schedules and commits every document.
    # "ray-data": a Ray Data dataflow (pipeline.ray_data_job): reading and prompts in Ray tasks and
    # CPU actors, the engine in one actor per replica, one committed part per work unit of at most
    # unit_rows rows; the driver lists files and footers, plans units and sums per-unit counts.
    dataflow: str = "driver"
    unit_rows: int = 64
    # ray-data: CPU actors that check rows and build prompts (1 CPU and a tokenizer each).
    prompt_actors: int = 1

    def __post_init__(self) -> None:
        settle_task_fields(self)
        if self.dataflow not in DATAFLOWS:
            raise ValueError(f"dataflow must be one of {', '.join(DATAFLOWS)}, got {self.dataflow!r}")
        for name in ("tp", "replicas", "max_input_tokens", "max_new_tokens", "budget_min_documents", "part_rows",
                     "unit_rows", "prompt_actors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_in_flight", "schedule_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be in [0, 1], got {self.max_error_fraction}")
        if self.prefill_block in ("none", "one-shot"):
            object.__setattr__(self, "prefill_block", None)
        block = self.prefill_block
        if not (block is None or block in ("auto", "chunk")
                or (isinstance(block, int) and not isinstance(block, bool) and block > 0)):
            raise ValueError(f"prefill_block must be 'auto', 'chunk', 'none' (one shot) or a positive int, got {block!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if isinstance(self.model_spec, dict):
            object.__setattr__(self, "model_spec", ModelSpec.from_dict(self.model_spec))

    @property
    def in_flight(self) -> int:
        # Enough to fill every replica's running batch and have as many waiting to join it.
        return self.max_in_flight or 2 * (self.max_batch_size or _ENGINE_MAX_BATCH_SIZE) * self.replicas

    @property
    def window(self) -> int:
        return self.schedule_window or 4 * self.in_flight

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            max_new_tokens=self.max_new_tokens, stop=self.stop, repetition_penalty=float(self.repetition_penalty),
            no_repeat_ngram_size=self.no_repeat_ngram_size,
        )

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["model_spec"] = self.model_spec.to_dict()
        values["stop"] = list(self.stop)
        return values


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def config_hash(config: JobConfig, templates: dict, template_kind: str, model_fp: str) -> str:
    """What determines a document's output besides its text: model (its content fingerprint, not
    its path), prompt, generation settings."""
    spec = {k: v for k, v in config.model_spec.to_dict().items() if k != "model"}
    return _hash({
        "task": config.task, "model_spec": spec, "model_fingerprint": model_fp, "templates": templates[config.task],
        "template_kind": template_kind, "max_input_tokens": config.max_input_tokens,
        "truncation": config.truncation, "sampling": dataclasses.asdict(config.sampling()),
    })[:16]


def job_fingerprint(config: JobConfig, cfg_hash: str, input_identity: str) -> str:
    """Identity of a job's output: the config hash plus the corpus content (resume only the same
    job). Paths are left out on purpose: under `ray job submit` the input lives in a copy of the
    working dir whose path changes when the cluster restarts; the content does not."""
    return _hash({
        "config_hash": cfg_hash, "input": input_identity, "id": config.id_column,
        "text": config.text_column, "question": config.question_column,
    })[:16]


def dca_columns(spec: ModelSpec, model_config) -> dict:
    """The resolved DCA settings as output columns; ValueError for settings DCA rejects."""
    cols = {"dca_enabled": spec.dca is not None, "dca_pretraining_length": None, "dca_chunk_size": None,
            "dca_local_window": None, "dca_temperature_alpha": None}
    if spec.dca is None:
        return cols
    from pipeline.models import dca_config_for

    try:
        dca = dca_config_for(spec, model_config)
    except (TypeError, ValueError) as error:
        raise ModelError(f"DCA settings {spec.dca} (the dca: block of --config): {error}") from None
    cols.update(dca_pretraining_length=dca.pretraining_length, dca_chunk_size=dca.chunk_size,
                dca_local_window=dca.local_window, dca_temperature_alpha=dca.temperature_alpha)
    return cols


def check_parallelism(config: JobConfig, model_config) -> None:
    """Tensor parallelism splits the KV heads between ranks: more ranks than KV heads cannot work."""
    heads = getattr(model_config, "num_key_value_heads", None) or getattr(model_config, "num_attention_heads", None)
    if heads and config.tp > heads:
        raise ModelError(
            f"--tp {config.tp} is larger than the {heads} key/value heads of {config.model_spec.model}: "
            f"tensor parallelism splits the heads between ranks; use --tp {heads} or fewer"
        )


def check_devices(config: JobConfig) -> None:
    """On a Ray this job started itself (no autoscaler), the GPUs it has are all it will get."""
    import ray

    if config.device != "cuda":
        return
    need, have = config.tp * config.replicas, ray.cluster_resources().get("GPU", 0)
    if have < need:
        raise ModelError(
            f"--device cuda needs {need} GPU(s) (--tp {config.tp} x --replicas {config.replicas}) and this machine "
            f"has {have:g}; lower --tp/--replicas or submit the job to a cluster with GPUs"
        )


def under_ray_job() -> bool:
    """True inside the entrypoint of `ray job submit` (the job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def ray_submission_id() -> str | None:
    """The submission id of the `ray job submit` running this process, else None."""
    try:
        metadata = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("metadata", {})
        return metadata.get("job_submission_id")
    except (KeyError, ValueError, AttributeError):
        return None


def ensure_ray(config: JobConfig) -> JobConfig:
    """Connects to the cluster in --ray-address / RAY_ADDRESS (set by `ray job submit`), else
    starts a local Ray sized so that tp x replicas ranks fit on this machine. Returns the config
    with cpus_per_rank filled in for a local Ray."""
    import ray

    address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
    local = not address or address == "local"
    ranks = config.tp * config.replicas
    cpus = os.cpu_count() or 1
    if local and config.cpus_per_rank is None:
        config = dataclasses.replace(config, cpus_per_rank=max(1, cpus // ranks))
    if ray.is_initialized():
        return config
    if not local:
        ray.init(address=address, log_to_driver=True)
    else:
        need = ranks * (config.cpus_per_rank or 1)
        if config.dataflow == "ray-data":  # logical CPUs for the prompt actors and the read/write tasks
            need += config.prompt_actors + 1
            cpus += config.prompt_actors + 1
        _quiet_local_ray_notice()
        ray.init(address="local", num_cpus=max(cpus, need), include_dashboard=False, log_to_driver=True)
    return config


class _DropRayAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def _quiet_local_ray_notice() -> None:
    """Ray 2.60 warns at every start of a local cluster that token authentication is on (its
    default, and what the private cluster of a job should have): one warning per job run in every
    log, about nothing to act on. A filter on that logger drops exactly that message."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropRayAuthNotice) for f in logger.filters):
        logger.addFilter(_DropRayAuthNotice())


# ------------------------------------------------------------------------------------- driver


@dataclass
class _Pending:
    doc: Document
    question_indices: list[int]  # output question_index of each suffix sent
    invalid_rows: list[dict]  # QA rows for questions that were not sent
    truncated_tokens: int
    prompt_tokens_sent: int


class _Driver:
    def __init__(self, config: JobConfig, *, builder: PromptBuilder, writer: OutputWriter, metrics: JobMetrics,
                 base_row: dict, skip: Callable[[Document], bool] | None, progress, committed=None,
                 stopper: _StopSignals | None = None) -> None:
        self.config = config
        self.stopper = stopper or _StopSignals()
        self.committed = committed
        self.builder = builder
        self.writer = writer
        self.metrics = metrics
        self.base_row = base_row
        self.skip = skip
        self.progress = progress
        self.pending: dict[str, _Pending] = {}
        self.answered: set[str] = set()
        self.lock = threading.Lock()
        self.stop_reason: str | None = None
        self.sampling = config.sampling()
        # Failure budget counts (this run): see _check_budget.
        self.documents_read = 0
        self.input_errors = 0
        self.model_decided = 0
        self.model_errors = 0
        from pipeline.live_metrics import LiveMetrics

        self.live = LiveMetrics(run=metrics.job_id)

    # -- rows

    def _row(self, doc: Document, **values) -> dict:
        row = dict(self.base_row)
        row.update(id=doc.id, source_file=doc.source_file, source_row=doc.source_row, content_hash=doc.content_hash,
                   status="ok", question_index=None, question=None)
        row.update(values)
        return row

    def _error_rows(self, doc: Document, error_type: str, message: str, **values) -> list[dict]:
        questions = doc.questions if self.config.task == "qa" and doc.questions else [None]
        return [
            self._row(doc, status="error", error_type=error_type, error_message=message,
                      question_index=i if self.config.task == "qa" else None, question=q, **values)
            for i, q in enumerate(questions)
        ]

    def _emit(self, rows: list[dict], results: list[GenerationResult] | None = None, prompt_tokens: int = 0) -> None:
        """All rows of one document: committed, counted and budgeted as one step (a stop signal
        waits for its end, so a document is never half counted or half committed)."""
        with self.lock, self.stopper.critical():
            self.writer.add_document(rows)
            self.metrics.add_document(rows, results, prompt_tokens)
            self.live.document(rows)
            input_errors, model_decided, model_errors = budget_counts(rows)
            self.input_errors += input_errors
            self.model_decided += model_decided
            self.model_errors += model_errors
            self._update_progress()
            self._check_budget()

    def _update_progress(self) -> None:
        if self.progress is None:
            return
        self.progress.update(1)
        wall = max(self.metrics.serving_s, 1e-9)
        self.progress.set_postfix(
            ok=self.metrics.documents_ok, err=self.metrics.documents_error,
            tok_s=f"{(self.metrics.prompt_tokens + self.metrics.output_tokens) / wall:.0f}",
            out_tok_s=f"{self.metrics.output_tokens / wall:.1f}", refresh=False,
        )

    def _check_budget(self) -> None:
        """Stops the job when its documents fail too often. Two rates, each counted like against
        like: documents the input made unusable (null/empty/non-UTF-8 text, duplicate or null id,
        unreadable rows), decided as they are read, over the documents read; and documents the
        model failed, decided as they are answered, over the documents answered. (Counting the
        first kind against answered documents let them race ahead of good documents still
        waiting in the scheduling window.) A rate is judged once budget_min_documents of its
        documents are decided, and trips when the lower end of its 95% confidence interval
        (Wilson) is above max_error_fraction: 3 empty texts among the first 20 rows of a corpus
        with 3% of them is bad luck, 10 of 20 is a broken corpus."""
        if self.stop_reason is not None:
            return
        self.stop_reason = budget_stop_reason(
            self.config, input_errors=self.input_errors, documents_read=self.documents_read,
            model_errors=self.model_errors, model_decided=self.model_decided, error_types=self.metrics.error_types,
            first_errors=self.metrics.first_errors)

    # -- requests

    def requests(self, documents: Iterable[Document]) -> Iterator[GenerationRequest]:
        """Prompts in windows, longest first; error rows go straight to the writer."""
        window: list[tuple[GenerationRequest, _Pending]] = []
        for doc in documents:
            if self.stop_reason:
                return
            if self.committed is not None and self.committed.is_committed(doc.key):
                self.metrics.documents_resumed += 1  # not in the progress total
                continue
            if self.skip is not None and self.skip(doc):
                self.metrics.documents_skipped += 1
                if self.progress is not None:
                    self.progress.update(1)
                continue
            self.documents_read += 1
            item = self._prepare(doc)
            if item is None:
                continue
            window.append(item)
            if len(window) >= self.config.window:
                yield from self._release(window)
                window = []
        yield from self._release(window)

    def _release(self, window) -> Iterator[GenerationRequest]:
        window.sort(key=lambda item: item[0].prompt_tokens, reverse=True)
        for request, pending in window:
            if self.stop_reason:
                return
            with self.lock:
                self.pending[request.request_id] = pending
            self.live.queued(1)
            yield request

    def _prepare(self, doc: Document):
        if doc.error_type:
            self._emit(self._error_rows(doc, doc.error_type, doc.error_message))
            return None
        questions = doc.questions if self.config.task == "qa" else None
        valid = [i for i, e in enumerate(doc.question_errors) if e is None] if questions else []
        invalid_rows = [
            self._row(doc, status="error", error_type=INVALID_INPUT, error_message=f"{doc.source}: {e}",
                      question_index=i, question=questions[i])
            for i, e in enumerate(doc.question_errors) if e is not None
        ] if questions else []
        if self.config.task == "qa" and not valid:
            self._emit(invalid_rows)
            return None
        try:
            prompt = self.builder.build(doc.text, [questions[i] for i in valid] if questions else None)
        except PromptError as e:
            self._emit(self._error_rows(doc, PROMPT_TOO_LONG, f"{doc.source}: {e}"))
            return None
        except Exception as e:  # a tokenizer failure on one document must not stop the job
            log.exception("building the prompt of %s failed", doc.source)
            self._emit(self._error_rows(doc, INTERNAL, f"{doc.source}: could not build the prompt: {e!r}"))
            return None
        request = GenerationRequest(
            request_id=doc.id, prefix_ids=prompt.prefix_ids, suffix_ids=prompt.suffix_ids, sampling=self.sampling,
        )
        sent = len(prompt.prefix_ids) + sum(len(s) for s in prompt.suffix_ids)
        return request, _Pending(doc, valid if questions else [None], invalid_rows, prompt.truncated_tokens, sent)

    # -- results

    def on_results(self, results: list[GenerationResult]) -> None:
        if not results:
            return
        request_id = results[0].request_id
        with self.lock:
            if request_id in self.answered:  # never twice into the output
                log.warning("dropping a second answer for request %s", request_id)
                return
            pending = self.pending.pop(request_id, None)
            if pending is None:
                log.warning("dropping an answer for unknown request %s", request_id)
                return
            self.answered.add(request_id)
        self.live.answered(results)
        doc = pending.doc
        by_suffix = {r.suffix_index: r for r in results}
        rows = list(pending.invalid_rows)
        for suffix_index, question_index in enumerate(pending.question_indices):
            result = by_suffix.get(suffix_index)
            question = doc.questions[question_index] if question_index is not None else None
            if result is None:
                rows.append(self._row(doc, status="error", error_type=INTERNAL, question_index=question_index,
                                      question=question, truncated_tokens=pending.truncated_tokens,
                                      error_message=f"the engine returned no result for suffix {suffix_index}"))
                continue
            rows.append(self._row(
                doc, question_index=question_index, question=question,
                output=self.builder.output_text(result.output) if result.status == "ok" else None,
                status=result.status, error_type=result.error_type,
                error_message=(f"{doc.source}: {result.error_message}" if result.error_message else None),
                prompt_tokens=result.prompt_tokens, output_tokens=result.output_tokens,
                truncated_tokens=pending.truncated_tokens, prefill_s=result.prefill_s, decode_s=result.decode_s,
                latency_s=result.wall_time_s, gpu_time_s=result.gpu_time_s,
                peak_memory_bytes=result.peak_memory_bytes, memory_kind=result.memory_kind,
                replica=result.replica, attempts=result.attempts,
            ))
        rows.sort(key=lambda r: -1 if r["question_index"] is None else r["question_index"])
        self._emit(rows, results, pending.prompt_tokens_sent)


def budget_counts(rows: list[dict]) -> tuple[int, int, int]:
    """One document's (input error, answered by the model, model failure), each 0 or 1, for the
    failure budget. A document answered by the model counts in the model rate's denominator
    whether it succeeded or not; a QA document with one invalid question and the others answered
    is both an input error and an answered document."""
    input_failed = any(r["status"] != "ok" and r["error_type"] in INPUT_ERROR_TYPES for r in rows)
    model_failed = any(r["status"] != "ok" and r["error_type"] not in INPUT_ERROR_TYPES for r in rows)
    answered = model_failed or any(r["status"] == "ok" for r in rows)
    return int(input_failed), int(answered), int(model_failed)


def budget_stop_reason(config: JobConfig, *, input_errors: int, documents_read: int, model_errors: int,
                       model_decided: int, error_types, first_errors: dict) -> str | None:
    """The failure budget's verdict (see _Driver._check_budget): None while within budget, else
    the message the job stops with. Shared by both dataflows."""
    fraction, floor = config.max_error_fraction, config.budget_min_documents
    rates = (("input", input_errors, documents_read), ("model", model_errors, model_decided))
    tripped = [(kind, errors, n) for kind, errors, n in rates
               if n >= floor and _wilson_lower_bound(errors, n) > fraction]
    if not tripped:
        return None
    common = error_types.most_common(3)
    detail = "; ".join(f"{t} x{n} (e.g. {first_errors.get(t, '')[:200]})" for t, n in common)
    return (
        "failure budget exceeded: "
        + "; ".join(f"{errors} of {n} documents {'read had invalid input' if kind == 'input' else 'sent to the model failed'}"
                    for kind, errors, n in tripped)
        + f" (invalid input {input_errors} of {documents_read} read, model failures "
        f"{model_errors} of {model_decided} answered; max_error_fraction {fraction:g}, counted over at "
        f"least {floor} documents). Most common: {detail}. Committed results are kept; "
        + ("fix the input (or the --id-column/--text-column choice)" if tripped[0][0] == "input" else
           "see the errors above")
        + " (or raise --max-error-fraction) and rerun the same command to resume."
    )


def _wilson_lower_bound(errors: int, n: int, z: float = 1.96) -> float:
    """Lower end of the Wilson score interval of a rate (95% for z = 1.96); 0 for no trials."""
    if n <= 0:
        return 0.0
    p = errors / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def _progress_bar(config: JobConfig, total: int):
    if not config.progress:
        return None
    import sys

    from tqdm import tqdm

    # In job logs (no terminal) a line every 30 s instead of a redraw every second.
    interval = 1.0 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, unit="doc", desc=config.task, mininterval=interval, maxinterval=max(interval, 10.0),
                smoothing=0.1, dynamic_ncols=True)


def wait_for_gpus(config: JobConfig) -> bool:
    """With device "cuda" on a cluster that has fewer GPUs than tp x replicas (GPU workers scaled
    from 0), asks the autoscaler for one node-sized bundle per replica and waits for the GPUs.
    Returns True when a request was made (release it with `release_gpu_request`)."""
    import ray

    if config.device != "cuda":
        return False
    need = config.tp * config.replicas
    if ray.cluster_resources().get("GPU", 0) >= need:
        return False
    from ray.autoscaler.sdk import request_resources

    cpus = config.cpus_per_rank or 1
    request_resources(bundles=[{"GPU": config.tp, "CPU": config.tp * cpus}] * config.replicas)
    log.info("waiting for the autoscaler: %d GPU(s) in groups of %d (have %g)", need, config.tp,
             ray.cluster_resources().get("GPU", 0))
    deadline = time.monotonic() + config.scale_up_timeout_s
    while ray.cluster_resources().get("GPU", 0) < need:
        if time.monotonic() > deadline:
            release_gpu_request()
            raise JobFailed(
                f"the cluster did not reach {need} GPUs within scale_up_timeout_s={config.scale_up_timeout_s:.0f} s "
                f"(has {ray.cluster_resources().get('GPU', 0):g}); check the autoscaler (`ray status`, "
                "`ray monitor cluster.yaml`) and the GPU quota of your cloud project"
            )
        time.sleep(5)
    return True


def release_gpu_request() -> None:
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
    except Exception:  # best effort: the idle timeout scales down anyway
        log.debug("could not clear the autoscaler request", exc_info=True)


def log_memory_plan(config: JobConfig, engine_config) -> None:
    """Prints the memory planner's estimate for this job's longest request on one line (a GPU plan
    where the job runs on GPUs; on CPU the same components, without a device limit), with the
    jobs.plan command that prints the full table: the planner takes the job's own flags."""
    import shlex
    import sys

    import ray

    from pipeline.memory_plan import COMPONENTS, MemoryPlan, ModelShape, ServingConfig, fmt_bytes

    try:
        device = "cuda" if config.device == "cuda" or (
            config.device in (None, "auto") and ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        ) else "cpu"
        dtype = config.model_spec.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        shape = ModelShape.load(config.model_spec.model)
        chunk_len = None
        if config.model_spec.dca is not None:
            from pipeline.models import dca_config_for, load_model_config

            chunk_len = dca_config_for(config.model_spec, load_model_config(config.model_spec)).chunk_len
        # "auto" is one shot with the static scheduler (pipeline.engine.worker).
        block = engine_config.prefill_block
        block = None if block == "auto" and engine_config.scheduler == "static" else block
        serving = ServingConfig(
            tp_size=config.tp, weight_dtype=dtype, kv_cache_dtype=engine_config.kv_cache_dtype,
            prefill_block=block, device=device, chunk_len=chunk_len,
            attention_backend="flash" if device == "cuda" else "torch",
        )
        estimate = MemoryPlan(shape, serving).estimate(config.max_input_tokens, config.max_new_tokens)
    except Exception as error:  # the plan is advice: a model the planner cannot read still runs
        log.warning("no memory plan for %s: %s", config.model_spec.model, error)
        return
    parts = ", ".join(f"{c.replace('_', ' ')} {fmt_bytes(getattr(estimate, c))}" for c in COMPONENTS
                      if getattr(estimate, c))
    flags = ["--model", config.model_spec.model, "--tp", str(config.tp), "--max-input-tokens",
             str(config.max_input_tokens), "--max-new-tokens", str(config.max_new_tokens), "--dtype", dtype,
             "--kv-cache-dtype", engine_config.kv_cache_dtype, "--prefill-block",
             "none" if block is None else str(block), "--device", device]
    for key in ("pretraining_length", "chunk_size", "local_window"):
        if (config.model_spec.dca or {}).get(key) is not None:
            flags += [f"--dca-{key.replace('_', '-')}", str(config.model_spec.dca[key])]
    print(f"memory plan: {fmt_bytes(estimate.total)} per rank for the longest request "
          f"({config.max_input_tokens} + {config.max_new_tokens} tokens): {parts}; {serving.describe()}\n"
          f"  (python -m jobs.plan {shlex.join(flags)} for the table)", file=sys.stderr, flush=True)


def effective_prefill_block(config: JobConfig) -> int | str | None:
    """The engine's prefill_block for a job: "chunk" means one shot when DCA is off."""
    if config.prefill_block == "chunk" and config.model_spec.dca is None:
        return None
    return config.prefill_block


def make_pool(config: JobConfig):
    """A started ReplicaPool for this job (the engine of pipeline.engine)."""
    from pipeline.engine import EngineConfig, ReplicaPool

    engine_kwargs = {k: getattr(config, k) for k in (
        "scheduler", "max_batch_tokens", "max_batch_size", "max_restarts", "request_retries", "device",
        "cpus_per_rank", "kv_cache_dtype") if getattr(config, k) is not None}
    # "chunk" is one DCA chunk: without DCA there is none, and the prompt goes in one shot.
    engine_kwargs["prefill_block"] = effective_prefill_block(config)
    engine_config = EngineConfig(
        model_spec=config.model_spec, tp_size=config.tp, replicas=config.replicas,
        max_input_tokens=config.max_input_tokens, **engine_kwargs,
    )
    log_memory_plan(config, engine_config)
    pool = ReplicaPool(engine_config)
    pool.start()
    return pool


def run_job(
    config: JobConfig, *, pool_factory: Callable[[JobConfig], object] | None = None, tokenizer=None,
    skip_factory: Callable[[str], Callable[[Document], bool]] | None = None, extra_summary: dict | None = None,
    engine_stage: type | None = None,
) -> dict:
    """Runs (or resumes) one job and returns its metrics summary. Raises JobFailed when it stops
    early, JobStopped on SIGTERM/SIGINT (after committing what is done and writing the metrics);
    InputError / OutputError / ModelError / FileNotFoundError before any model work on bad input
    or settings. Everything that can be checked is checked before the output is claimed, so a
    corrected rerun is never refused as a different job.

    skip_factory(config_hash) -> predicate: documents to leave out (nightly: already summarised).
    engine_stage: with dataflow "ray-data", the engine stage's class (a stand-in for benchmarks
    and tests, see pipeline.ray_data_job._UnitEngineStage); pool_factory is for the driver dataflow.
    """
    stopper = _StopSignals()
    stopper.install()
    try:
        return _run_job(config, stopper, pool_factory=pool_factory, tokenizer=tokenizer,
                        skip_factory=skip_factory, extra_summary=extra_summary, engine_stage=engine_stage)
    finally:
        stopper.restore()


def _run_job(config: JobConfig, stopper: _StopSignals, *, pool_factory, tokenizer, skip_factory,
             extra_summary, engine_stage=None) -> dict:
    metrics_extra = {"ray_submission_id": ray_submission_id(), **(extra_summary or {})}
    plan = check_input(InputSpec(
        path=config.input_path, id_column=config.id_column, text_column=config.text_column,
        question_column=config.question_column, batch_rows=config.input_batch_rows,
    ))
    model_config = load_model_config(config.model_spec)  # also checks that the model exists
    check_parallelism(config, model_config)
    dca_cols = dca_columns(config.model_spec, model_config)
    templates = load_templates(config.templates_file)
    if tokenizer is None:
        from pipeline.models import load_tokenizer

        tokenizer = load_tokenizer(config.model_spec)
    builder = PromptBuilder(tokenizer, task=config.task, templates=templates, max_input_tokens=config.max_input_tokens,
                          truncation=config.truncation, use_chat_template=config.use_chat_template)
    cfg_hash = config_hash(config, templates, builder.template_kind, model_fingerprint(config.model_spec.model))
    fingerprint = job_fingerprint(config, cfg_hash, plan.identity)
    job_id = config.job_id or f"{config.task}-{fingerprint[:12]}"
    writer = OutputWriter(
        config.output_dir, job_id=job_id, fingerprint=fingerprint, config=config.to_dict(),
        overwrite=config.overwrite, part_rows=config.part_rows, part_seconds=config.part_seconds,
        dataflow=config.dataflow,
    )
    # The resolved DCA settings next to the job's (the metrics plot marks P; jobs.show prints them).
    metrics = JobMetrics(job_id=job_id, task=config.task, config={**config.to_dict(), "dca_in_effect": dca_cols},
                         total_input_rows=plan.num_rows)
    if writer.manifest.get("runs", 1) > 1:  # a resumed job: its metrics cover the earlier runs too
        metrics.resume(config.output_dir, runs_before=writer.manifest["runs"] - 1)
    metrics_extra.update(template_kind=builder.template_kind, config_hash=cfg_hash, output_dir=config.output_dir,
                         resumed_from_committed_rows=len(writer.committed) if writer.resumed else 0,
                         dataflow=config.dataflow)
    base_row = {"task": config.task, "model": config.model_spec.model, "config_hash": cfg_hash, "job_id": job_id,
                **dca_cols}

    driver = _Driver(config, builder=builder, writer=writer, metrics=metrics, base_row=base_row,
                     skip=skip_factory(cfg_hash) if skip_factory is not None else None, progress=None,
                     committed=writer.committed, stopper=stopper)
    pool = progress = None
    requested_gpus = started_ray = False
    status, message, engine_stats = "failed", None, None
    try:
        if pool_factory is None or config.dataflow == "ray-data":
            import ray

            started_ray = not ray.is_initialized()
            local = config.ray_address in (None, "local") and os.environ.get("RAY_ADDRESS") in (None, "", "local")
            config = ensure_ray(config)
            stopper.install()  # ray.init replaced the SIGTERM handler with its own
            if local and started_ray:
                check_devices(config)
            requested_gpus = wait_for_gpus(config)
            if config.dataflow == "driver":
                pool = make_pool(config)
        else:
            pool = pool_factory(config)
        metrics.mark_serving()
        if config.dataflow == "ray-data":
            from pipeline.ray_data_job import run_dataflow

            message, engine_stats = run_dataflow(
                config, plan=plan, writer=writer, metrics=metrics, base_row=base_row,
                skip=skip_factory(cfg_hash) if skip_factory is not None else None, engine_stage=engine_stage)
            metrics_extra["resumed_from_committed_rows"] = metrics.documents_resumed
            status = "complete" if message is None else "failed"
        else:
            progress = driver.progress = _progress_bar(config, max(plan.num_rows - len(writer.committed), 0))
            for results in pool.run(driver.requests(iter_documents(plan)), config.in_flight):
                driver.on_results(results)
                if driver.stop_reason:
                    break
            if driver.stop_reason:
                message = driver.stop_reason
            elif driver.pending:
                message = f"the engine finished without answering {len(driver.pending)} request(s)"
            else:
                status = "complete"
    except JobStopped as e:
        status = "stopped"
        message = (f"stopped by {e} after committing the finished documents; "
                   "rerun the same command to resume")
        raise
    except BaseException as e:  # record what happened, keep what is committed, then re-raise
        message = f"{type(e).__name__}: {e}"
        raise
    finally:
        stopper.closing = True
        # The output first: `ray job stop` sends SIGKILL a few seconds after SIGTERM.
        if progress is not None:
            progress.close()
        try:
            if pool is not None and hasattr(pool, "stats"):
                engine_stats = pool.stats()
        except Exception as e:  # stats are best effort when the pool is broken
            engine_stats = {"error": str(e)}
        summary = metrics.summary(status=status, message=message, engine_stats=engine_stats, extra=metrics_extra)
        try:
            writer.flush()  # the last documents, before the metrics that count them
            summary["metrics_files"] = metrics.write(config.output_dir, summary, plot=False)
        finally:
            writer.close(complete=status == "complete", summary={
                k: summary[k] for k in ("status", "message", "wall_s", "documents", "started_at")})
            if pool is not None and hasattr(pool, "shutdown"):
                try:
                    pool.shutdown()
                except Exception:
                    log.exception("pool shutdown failed")
            if requested_gpus:
                release_gpu_request()
            if started_ray:  # disconnect (and stop a local Ray) cleanly, also on SIGTERM
                import ray

                ray.shutdown()
            summary["metrics_files"].update(metrics.write_plot(config.output_dir))
    if status != "complete":
        raise JobFailed(message)
    return summary


# ------------------------------------------------------------------------------------ nightly


def nightly_submission_id(input_path: str, run_date: str) -> str:
    """Deterministic id of the nightly run of one corpus on one date (a Ray submission id)."""
    return f"nightly-{hashlib.sha256(input_path.encode()).hexdigest()[:10]}-{run_date}"


def nightly_partition(output_root: str, run_date: str) -> str:
    return os.path.join(output_root, f"run_date={run_date}")


def summarised_before(output_root: str, run_date: str, cfg_hash: str) -> set[tuple[str, str]]:
    """(id, content_hash) of documents summarised OK in earlier partitions with this config hash."""
    import pyarrow.compute as pc

    from pipeline.output import committed_parts, read_output

    done: set[tuple[str, str]] = set()
    if not os.path.isdir(output_root):
        return done
    for name in sorted(os.listdir(output_root)):
        if not name.startswith("run_date=") or name >= f"run_date={run_date}":
            continue
        directory = os.path.join(output_root, name)
        if not committed_parts(directory):
            continue
        table = read_output(directory, columns=["id", "content_hash", "config_hash", "status"])
        keep = pc.and_(pc.equal(table["status"], "ok"), pc.equal(table["config_hash"], cfg_hash))
        table = table.filter(keep)
        done.update(zip(table["id"].to_pylist(), table["content_hash"].to_pylist()))
    return done


def run_nightly(config: JobConfig, *, output_root: str, run_date: str, **kwargs) -> dict:
    """Incremental summarisation into OUTPUT_ROOT/run_date=DATE: documents already summarised
    (same id, same content hash, same model/prompt/generation config) in an earlier partition
    are skipped. Rerunning on the same date resumes that date's partition."""
    def skip_factory(cfg_hash: str):
        done = summarised_before(output_root, run_date, cfg_hash)
        return lambda doc: (doc.id, doc.content_hash) in done

    config = dataclasses.replace(
        config, output_dir=nightly_partition(output_root, run_date),
        job_id=config.job_id or nightly_submission_id(config.input_path, run_date),
    )
    return run_job(config, skip_factory=skip_factory,
                   extra_summary={"run_date": run_date, "output_root": output_root}, **kwargs)

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
from dataclasses import dataclass

from pipeline.config.job import JobConfig, check_parallelism, config_hash, job_fingerprint
from pipeline.config.model import ModelError, ModelSpec
from pipeline.engine.models import load_model_config, model_fingerprint
from pipeline.engine.requests import INTERNAL, PROMPT_TOO_LONG, GenerationRequest, GenerationResult
from pipeline.io import INPUT_ERROR_TYPES, INVALID_INPUT, Document, InputSpec, check_input, iter_documents
from pipeline.job_metrics import JobMetrics
from pipeline.output import OutputWriter
from pipeline.prompts import PromptBuilder, PromptError, load_templates

log = logging.getLogger("pipeline.job")


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


def dca_columns(spec: ModelSpec, model_config) -> dict:
    """The resolved DCA settings as output columns; ValueError for settings DCA rejects."""
    cols = {"dca_enabled": spec.dca is not None, "dca_pretraining_length": None, "dca_chunk_size": None,
            "dca_local_window": None, "dca_temperature_alpha": None}
    if spec.dca is None:
        return cols
    from pipeline.config.model import dca_config_for

    try:
        dca = dca_config_for(spec, model_config)
    except (TypeError, ValueError) as error:
        raise ModelError(f"DCA settings {spec.dca} (the dca: block of --config): {error}") from None
    cols.update(dca_pretraining_length=dca.pretraining_length, dca_chunk_size=dca.chunk_size,
                dca_local_window=dca.local_window, dca_temperature_alpha=dca.temperature_alpha)
    return cols


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

    from pipeline.config.resolve import (
        planned_attention_backend, planned_device, planned_weight_dtype, static_prefill_block,
    )
    from pipeline.engine.memory_plan import COMPONENTS, MemoryPlan, ModelShape, ServingConfig, fmt_bytes

    try:
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        device = planned_device(config.device, gpus)
        dtype = planned_weight_dtype(config.model_spec.dtype, device)
        shape = ModelShape.load(config.model_spec.model)
        chunk_len = None
        if config.model_spec.dca is not None:
            from pipeline.config.model import dca_config_for

            chunk_len = dca_config_for(config.model_spec, load_model_config(config.model_spec)).chunk_len
        # "auto" is one shot with the static scheduler (pipeline.engine.worker).
        block = engine_config.prefill_block
        block = static_prefill_block(block) if engine_config.scheduler == "static" else block
        serving = ServingConfig(
            tp_size=config.tp, weight_dtype=dtype, kv_cache_dtype=engine_config.kv_cache_dtype,
            prefill_block=block, device=device, chunk_len=chunk_len,
            attention_backend=planned_attention_backend(device),
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


def make_pool(config: JobConfig):
    """A started ReplicaPool for this job (the engine of pipeline.engine)."""
    from pipeline.config.engine import EngineConfig
    from pipeline.config.resolve import prefill_block_for_dca
    from pipeline.engine import ReplicaPool

    engine_kwargs = {k: getattr(config, k) for k in (
        "scheduler", "max_batch_tokens", "max_batch_size", "max_restarts", "request_retries", "device",
        "cpus_per_rank", "kv_cache_dtype") if getattr(config, k) is not None}
    # "chunk" is one DCA chunk: without DCA there is none, and the prompt goes in one shot.
    engine_kwargs["prefill_block"] = prefill_block_for_dca(config.prefill_block, config.model_spec.dca is not None)
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
        from pipeline.engine.models import load_tokenizer

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

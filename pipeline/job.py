"""A batch job, orchestrated: Parquet corpus -> prompts -> replica pool -> committed Parquet output.

    config = JobConfig(task="summarize", input_path="/data/corpus", output_dir="/data/out")
    summary = run_job(config)

Order of work, so that mistakes cost seconds, not GPU hours:
1. check the schema of every input file, the model and the settings; the job's identity;
2. decide what is to be done: a job found complete in its output, or a nightly run whose
   documents were all summarised before, finishes without Ray, tokenizer or model (one line
   says so; the metrics count the documents skipped or committed);
3. load the tokenizer, open the output (resume / refuse a different job / --overwrite), start Ray
   (a local start is retried; when Ray cannot start, the output is given back as it was) and
   the engine, stream documents through the job's dataflow;
4. whatever happens: commit what is done, write the metrics, release the output and the cluster.

The dataflow is a strategy (pipeline.dataflows): `driver` (this process reads, prompts, schedules
and commits every document) or `ray-data` (work units through Ray Data; this process only plans
and adds up). Both build their rows with pipeline.data.rows and judge the same failure budget.

Driver-side: no torch/deepspeed at import; transformers is imported when the tokenizer loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Callable

from pipeline.config.job import JobConfig, check_parallelism, config_hash, job_fingerprint
from pipeline.config.task import HIERARCHICAL
from pipeline.data.input import (
    Document, InputSpec, check_input, check_output_apart, file_digests, iter_documents, plan_units,
)
from pipeline.data.long_documents import LongDocumentPrompts, describe_hierarchical, split_census
from pipeline.data.prompts import PromptBuilder, load_templates
from pipeline.data.rows import dca_columns, job_columns
from pipeline.data.writer import (
    MANIFEST, OutputError, OutputWriteError, OutputWriter, read_manifest, write_json_atomic,
)
from pipeline.dataflows.context import JobRun
from pipeline.dataflows.driver import DriverDataflow
from pipeline.dataflows.units import UnitsDataflow, committed_unit_ranges
from pipeline.engine.models import load_model_config, load_tokenizer, model_fingerprint, template_kind_from_files
from pipeline.metrics.job import JobMetrics
from pipeline.runtime.cluster import (
    RayStartError, check_devices, ensure_ray, ray_submission_id, release_gpu_request, wait_for_gpus,
)
from pipeline.runtime.pool import check_plan_fits
from pipeline.runtime.stops import JobFailed, JobStopped, StopSignals

log = logging.getLogger(__name__)


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
    pool_factory(config): a stand-in for the engine of the driver dataflow (tests, benchmarks;
    then no Ray is started). engine_stage: with dataflow "ray-data", the engine stage's class (a
    stand-in, see pipeline.dataflows.units.UnitEngineStage).
    """
    stopper = StopSignals()
    stopper.install()
    try:
        return _run_job(config, stopper, pool_factory=pool_factory, tokenizer=tokenizer,
                        skip_factory=skip_factory, extra_summary=extra_summary, engine_stage=engine_stage)
    finally:
        stopper.restore()


@dataclasses.dataclass
class _Checked:
    """Step 1 of a job: its input, model and settings checked, and its identity (config hash,
    fingerprint, job id), before any output is claimed."""

    plan: object
    dca_cols: dict
    templates: dict
    template_kind: str
    builder: PromptBuilder | None
    cfg_hash: str
    fingerprint: str
    job_id: str
    skip: Callable[[Document], bool] | None


def _check_job(config: JobConfig, *, tokenizer, skip_factory) -> _Checked:
    """Step 1: every check that needs no output, then the job's identity. The config hash needs
    the prompt's template kind: read from the model's files without the tokenizer when they tell
    (pipeline.engine.models.template_kind_from_files), else the tokenizer's own; whenever the
    tokenizer is loaded, its kind is the one used (see _with_tokenizer)."""
    check_output_apart(config.input_path, config.output_dir)  # before anything is read, written or removed
    plan = check_input(InputSpec(
        path=config.input_path, id_column=config.id_column, text_column=config.text_column,
        question_column=config.question_column, batch_rows=config.input_batch_rows,
    ))
    model_config = load_model_config(config.model_spec)  # also checks that the model exists
    check_parallelism(config, model_config)
    check_plan_fits(config)  # a --max-input-tokens the device cannot hold is refused here
    dca_cols = dca_columns(config.model_spec, model_config)
    templates = load_templates(config.templates_file)
    kind = None if tokenizer is not None else template_kind_from_files(config.model_spec, config.use_chat_template)
    if kind is None:  # given a tokenizer, or a model whose files do not tell (GGUF): the tokenizer's
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model_spec)
    builder = None if tokenizer is None else _builder(config, tokenizer, templates)
    kind = builder.template_kind if builder is not None else kind
    return _identify(config, plan, dca_cols, templates, kind, builder, skip_factory)


def _builder(config: JobConfig, tokenizer, templates: dict) -> PromptBuilder:
    return PromptBuilder(tokenizer, task=config.task, templates=templates, max_input_tokens=config.max_input_tokens,
                         truncation=config.truncation, use_chat_template=config.use_chat_template)


def _identify(config, plan, dca_cols, templates, kind, builder, skip_factory) -> _Checked:
    cfg_hash = config_hash(config, templates, kind, model_fingerprint(config.model_spec.model))
    fingerprint = job_fingerprint(config, cfg_hash, plan.identity)
    job_id = config.job_id or f"{config.task}-{fingerprint[:12]}"
    skip = skip_factory(cfg_hash) if skip_factory is not None else None
    return _Checked(plan=plan, dca_cols=dca_cols, templates=templates, template_kind=kind, builder=builder,
                    cfg_hash=cfg_hash, fingerprint=fingerprint, job_id=job_id, skip=skip)


def _with_tokenizer(config: JobConfig, checked: _Checked, skip_factory) -> _Checked:
    """The job's identity with its tokenizer loaded (the engine will run): the template kind is
    the tokenizer's own; when the model's files told otherwise, the hash, the fingerprint and
    the skip decision are made again from it (what was decided without the tokenizer only ever
    led here: a kind read wrongly gives a hash no earlier run recorded, so nothing is skipped)."""
    if checked.builder is not None:
        return checked
    builder = _builder(config, load_tokenizer(config.model_spec), checked.templates)
    if builder.template_kind == checked.template_kind:
        return dataclasses.replace(checked, builder=builder)
    log.warning("the template kind read from %s's files (%s) is not its tokenizer's (%s): using the tokenizer's",
                config.model_spec.model, checked.template_kind, builder.template_kind)
    return _identify(config, checked.plan, checked.dca_cols, checked.templates, builder.template_kind, builder,
                     skip_factory)


def _nothing_to_do(config: JobConfig, checked: _Checked) -> str | None:
    """Whether this run can finish without Ray or a model, decided before either starts: -> the
    line that says why, or None (the engine is needed).

    Nothing is to be done when the output holds this job complete (a resumed job with every
    document committed), or when the skip decision (nightly: summarised before) leaves no
    document for the model. Documents the input made unusable still get their error rows (the
    driver dataflow writes them without an engine); the ray-data dataflow writes rows only in
    Ray tasks, so there every document must be skipped."""
    manifest = read_manifest(config.output_dir) if os.path.isdir(config.output_dir) else None
    if (manifest is not None and not config.overwrite and manifest.get("complete")
            and manifest.get("fingerprint") == checked.fingerprint
            and manifest.get("dataflow", "driver") == config.dataflow):
        return f"nothing to do: job {checked.job_id} is complete in {config.output_dir} (every document committed)"
    skip = checked.skip
    to_model, to_answer = getattr(skip, "to_model", None), getattr(skip, "to_answer", None)
    if to_model is None or to_model > 0 or (config.dataflow == "ray-data" and to_answer):
        return None
    line = f"nothing to do: {skip.skipped} of {checked.plan.num_rows} document(s) summarised before"
    return line + (f", {to_answer} unusable input row(s) get error rows" if to_answer else "")


class _NoEngine:
    """The engine of a run that needs none (see _nothing_to_do): answers no request. A request
    reaching it means the decision was wrong: the run fails instead of answering without a model."""

    def run(self, requests, max_in_flight):
        for request in requests:
            raise RuntimeError(f"request {getattr(request, 'request_id', None)} needs the model, but this run "
                               "decided that no document does; rerun the same command")
        return iter(())

    def stats(self):
        return None

    def shutdown(self):
        pass


class _NoWorkDataflow:
    """--dataflow ray-data with nothing to do: no unit runs (no Ray); the units already committed
    and the documents skipped are counted."""

    needs_ray = False

    def __init__(self, job: JobRun) -> None:
        self.job = job
        self.resumed_rows: int | None = None

    def start(self, config: JobConfig) -> None:
        pass

    def run(self):
        job = self.job
        # Committed rows from the parts' names, whatever --unit-rows cut them (as UnitsDataflow resumes).
        ranges = committed_unit_ranges(job.config.output_dir, job.plan, job.writer.committed_units)
        todo = sum(u.num_rows for u in plan_units(job.plan, job.config.unit_rows, ranges))
        job.metrics.documents_resumed += job.plan.num_rows - todo
        job.metrics.documents_skipped += todo
        self.resumed_rows = job.metrics.documents_resumed
        return None, None

    def engine_stats(self, stats):
        return stats

    def shutdown(self) -> None:
        pass


def _claim_output(config: JobConfig, checked: _Checked, stopper: StopSignals) -> tuple[JobRun, dict]:
    """Step 2: the output claimed (resumed, fresh, or refused as a different job)."""
    # The input files' content digests, read again only for files whose size or mtime moved since
    # the output recorded them (a resume only stats its files).
    try:
        recorded = (read_manifest(config.output_dir) or {}).get("input_files") if not config.overwrite else None
    except (OSError, ValueError, OutputError):  # the writer says what is wrong with it
        recorded = None
    writer = OutputWriter(
        config.output_dir, job_id=checked.job_id, fingerprint=checked.fingerprint, config=config.to_dict(),
        overwrite=config.overwrite, part_rows=config.part_rows, part_seconds=config.part_seconds,
        dataflow=config.dataflow, id_type=checked.plan.id_type, input_files=file_digests(checked.plan, recorded),
    )
    # The resolved DCA settings next to the job's (the metrics plot marks P; jobs.show prints them).
    metrics = JobMetrics(job_id=checked.job_id, task=config.task,
                         config={**config.to_dict(), "dca_in_effect": checked.dca_cols},
                         total_input_rows=checked.plan.num_rows)
    if writer.manifest.get("runs", 1) > 1:  # a resumed job: its metrics cover the earlier runs too
        metrics.resume(config.output_dir, runs_before=writer.manifest["runs"] - 1)
    extra = dict(template_kind=checked.template_kind, config_hash=checked.cfg_hash, output_dir=config.output_dir,
                 resumed_from_committed_rows=len(writer.committed) if writer.resumed else 0, dataflow=config.dataflow)
    base = job_columns(task=config.task, model=config.model_spec.model, config_hash=checked.cfg_hash,
                       job_id=checked.job_id, dca=checked.dca_cols)
    return JobRun(config=config, plan=checked.plan, builder=checked.builder, writer=writer, metrics=metrics,
                  base=base, skip=checked.skip, stopper=stopper,
                  long_prompts=_long_prompts(config, checked, writer)), extra


def _long_prompts(config: JobConfig, checked: _Checked, writer: OutputWriter) -> LongDocumentPrompts | None:
    """The prompts of documents answered in sections (truncation hierarchical), for a run whose
    engine will run (its tokenizer is loaded); None otherwise (a run with nothing to do sends no
    document to a model). Says on stderr which documents this run will split."""
    if config.truncation != HIERARCHICAL or checked.builder is None:
        return None
    long_prompts = LongDocumentPrompts(checked.builder.tokenizer, task=config.task, templates=checked.templates,
                                       max_input_tokens=config.max_input_tokens,
                                       use_chat_template=config.use_chat_template, qa_combine=config.qa_combine)
    committed = writer.committed  # (None for a fresh output, and for the ray-data dataflow's units)
    to_answer = (doc for doc in iter_documents(checked.plan)
                 if not (committed is not None and committed.is_committed(doc.key))
                 and not (checked.skip is not None and checked.skip(doc)))
    census = split_census(to_answer, checked.builder, long_prompts)
    print(describe_hierarchical(checked.builder, long_prompts, census), file=sys.stderr, flush=True)
    return long_prompts


class _Claim:
    """What the output looked like before this run claimed it, to give it back as it was when Ray
    cannot start (nothing of the run is left: no manifest, part, lock or directory it made)."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.existed = os.path.isdir(output_dir)
        self.manifest = read_manifest(output_dir) if self.existed else None
        self.names = set(os.listdir(output_dir)) if self.existed else set()

    def give_back(self, writer: OutputWriter) -> None:
        """The lock released, then everything this run made removed and the manifest an earlier run
        left written back. (With --overwrite, the earlier results this run cleared stay cleared.)"""
        writer.close(complete=False)
        try:
            for name in set(os.listdir(self.output_dir)) - self.names:
                path = os.path.join(self.output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            if self.manifest is not None:
                write_json_atomic(os.path.join(self.output_dir, MANIFEST), self.manifest)
            elif not self.existed:
                os.rmdir(self.output_dir)
        except OSError:
            log.warning("could not give back %s as it was", self.output_dir, exc_info=True)


def _run_job(config: JobConfig, stopper: StopSignals, *, pool_factory, tokenizer, skip_factory,
             extra_summary, engine_stage=None) -> dict:
    metrics_extra = {"ray_submission_id": ray_submission_id(), **(extra_summary or {})}
    checked = _check_job(config, tokenizer=tokenizer, skip_factory=skip_factory)
    idle = _nothing_to_do(config, checked)
    if idle is None:
        checked = _with_tokenizer(config, checked, skip_factory)
    claim = _Claim(config.output_dir)
    job, extra = _claim_output(config, checked, stopper)
    metrics_extra.update(extra)
    writer, metrics = job.writer, job.metrics
    if idle is not None:
        print(f"{idle}; Ray and the model are not started", file=sys.stderr, flush=True)
        dataflow = _NoWorkDataflow(job) if config.dataflow == "ray-data" else DriverDataflow(
            job, pool_factory=lambda _config: _NoEngine())
    elif config.dataflow == "ray-data":
        dataflow = UnitsDataflow(job, engine_stage=engine_stage)
    else:
        dataflow = DriverDataflow(job, pool_factory=pool_factory)
    metrics_extra["engine_started"] = False
    requested_gpus = started_ray = False
    status, message, engine_stats = "failed", None, None
    write_error: OutputWriteError | None = None
    summary: dict = {}
    try:
        if dataflow.needs_ray:
            import ray

            started_ray = not ray.is_initialized()
            local = config.ray_address in (None, "local") and os.environ.get("RAY_ADDRESS") in (None, "", "local")
            try:  # stop handlers again as soon as ray.init returns: it replaced the SIGTERM handler
                config = ensure_ray(config, on_started=stopper.install)
            except RayStartError:
                claim.give_back(writer)
                writer = None
                raise
            if local and started_ray:
                check_devices(config)
            requested_gpus = wait_for_gpus(config)
        if idle is None:
            metrics_extra["engine_started"] = True
        dataflow.start(config)
        metrics.mark_serving()
        message, engine_stats = dataflow.run()
        if dataflow.resumed_rows is not None:
            metrics_extra["resumed_from_committed_rows"] = dataflow.resumed_rows
        status = "complete" if message is None else "failed"
    except JobStopped as e:
        status = "stopped"
        message = (f"stopped by {e} after committing the finished documents; "
                   "rerun the same command to resume")
        raise
    except OutputWriteError as e:  # the output's storage is full (or failing): one line, exit 1
        write_error, message = e, str(e)
    except BaseException as e:  # record what happened, keep what is committed, then re-raise
        message = f"{type(e).__name__}: {e}"
        raise
    finally:
        stopper.closing = True
        if writer is None:  # Ray did not start: the output was given back as it was
            if started_ray:
                _shutdown_ray()
        else:
            summary, write_error = _finish(config, job, dataflow, status, message, engine_stats, metrics_extra,
                                           requested_gpus=requested_gpus, started_ray=started_ray,
                                           write_error=write_error)
            status, message = summary["status"], summary["message"]
    if write_error is not None:
        raise write_error
    if status != "complete":
        raise JobFailed(message)
    return summary


def _finish(config, job: JobRun, dataflow, status, message, engine_stats, metrics_extra, *, requested_gpus,
            started_ray, write_error: OutputWriteError | None = None) -> tuple[dict, OutputWriteError | None]:
    """Step 4, whatever happened: the output first (`ray job stop` sends SIGKILL a few seconds
    after SIGTERM), then the metrics, the manifest, the engine and Ray. Each step runs whatever
    the one before it did: after a failed write (a full disk) the metrics, the manifest, the
    staging directory, the engine and Ray are still seen to. write_error: the run's own (a part
    that could not be written). -> (the summary, the write error to report in the job's one line,
    or None)."""
    writer, metrics = job.writer, job.metrics
    engine_stats = dataflow.engine_stats(engine_stats)
    not_written: list[str] = []

    def attempt(what: str, step) -> None:
        nonlocal write_error
        try:
            step()
        except OutputWriteError as error:  # reported in the job's one line, not as a traceback
            write_error = write_error or error
            not_written.append(what)

    summary = metrics.summary(status=status, message=message, engine_stats=engine_stats, extra=metrics_extra)
    summary["metrics_files"] = {}
    attempt("the last part", writer.flush)  # the last documents, before the metrics that count them
    if write_error is not None and status != "stopped":
        status, message = "failed", str(write_error)
        summary.update(status=status, message=message)
    attempt("_metrics.json", lambda: summary.__setitem__(
        "metrics_files", metrics.write(config.output_dir, summary, plot=False)))
    try:
        attempt(MANIFEST, lambda: writer.close(complete=status == "complete", summary={
            k: summary[k] for k in ("status", "message", "wall_s", "documents", "started_at")}))
    finally:
        dataflow.shutdown()
        if requested_gpus:
            release_gpu_request()
        if started_ray:  # disconnect (and stop a local Ray) cleanly, also on SIGTERM
            _shutdown_ray()
        if write_error is None:
            try:
                summary["metrics_files"].update(metrics.write_plot(config.output_dir))
            except OSError as error:  # the plot is a picture of _metrics.json: never the job's failure
                log.warning("_metrics.png not written in %s: %s", config.output_dir, error)
    if write_error is not None:
        unwritten = [w for w in not_written if w != "the last part"]
        write_error = OutputWriteError(str(write_error) + (f" ({' and '.join(unwritten)} could not be written "
                                                           "either)" if unwritten else ""))
    return summary, write_error


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


# ------------------------------------------------------------------------------------ nightly


def normalize_run_date(run_date) -> str:
    """A run date as YYYY-MM-DD (a datetime.date, or a string ISO 8601 reads as a date: also
    20261127 or 2026-W48-5), so that one night has one partition and one submission id whatever
    its spelling. ValueError (one line) for anything else."""
    import datetime

    if isinstance(run_date, datetime.datetime):
        run_date = run_date.date()
    if isinstance(run_date, datetime.date):
        return run_date.isoformat()
    try:
        return datetime.date.fromisoformat(str(run_date).strip()).isoformat()
    except ValueError:
        raise ValueError(f"--date must be a date written YYYY-MM-DD, got {run_date!r}") from None


def normalize_input_path(input_path: str) -> str:
    """The input as written, without the spellings that name the same place: `corpus`,
    `corpus/` and `./corpus` are `corpus` (os.path.normpath); a URI loses its trailing slashes.
    Not resolved against the working directory: under `ray job submit` it is another one."""
    if "://" in input_path:
        scheme, rest = input_path.split("://", 1)
        return f"{scheme}://{rest.rstrip('/') or rest}"
    return os.path.normpath(input_path)


def nightly_submission_id(input_path: str, run_date) -> str:
    """Deterministic id of the nightly run of one corpus on one date (a Ray submission id): the
    same for every spelling of the path and of the date (normalize_input_path,
    normalize_run_date), so a night cannot run twice under two ids."""
    digest = hashlib.sha256(normalize_input_path(input_path).encode()).hexdigest()[:10]
    return f"nightly-{digest}-{normalize_run_date(run_date)}"


def nightly_partition(output_root: str, run_date: str) -> str:
    return os.path.join(output_root, f"run_date={run_date}")


@dataclasses.dataclass
class NightlySkip:
    """The nightly skip decision: a document is skipped when its (id, content hash) pair is in
    `done` (summarised OK before, same config hash). to_model: documents of the input left for the
    model; to_answer: unusable rows left (error rows, no model); skipped: the rest."""

    done: set
    to_model: int
    to_answer: int
    skipped: int = 0

    def __call__(self, doc: Document) -> bool:
        return (doc.id, doc.content_hash) in self.done


def run_nightly(config: JobConfig, *, output_root: str, run_date: str, **kwargs) -> dict:
    """Incremental summarisation into OUTPUT_ROOT/run_date=DATE: documents already summarised
    (same id, same content hash, same model/prompt/generation config) in an earlier partition
    are skipped. Rerunning on the same date resumes that date's partition.

    The skip decision is one vectorised probe of the night's (id, content hash) pairs against
    the root's nightly record (pipeline.data.nightly_record: brought up to date with the
    partitions first, rebuilt from them when missing or stale); the record then takes in what
    this night committed, also when the job fails or is stopped part-way."""
    from pipeline.data.nightly_record import sync_record

    run_date = normalize_run_date(run_date)
    decided: dict[str, NightlySkip] = {}

    def skip_factory(cfg_hash: str):
        if cfg_hash not in decided:  # the ray-data dataflow asks twice
            record = sync_record(output_root)
            plan = check_input(InputSpec(
                path=config.input_path, id_column=config.id_column, text_column=config.text_column,
                question_column=config.question_column, batch_rows=config.input_batch_rows,
            ))
            # One vectorised probe per batch of (id, content hash) pairs (memory: a batch and the
            # matches), counting what is left for the model and the unusable rows left, so that a
            # night with nothing to do is known before Ray or the model starts.
            skip = NightlySkip(done=set(), to_model=0, to_answer=0)
            batch: list[tuple] = []

            def probe() -> None:
                if batch:
                    ids, hashes, usable = zip(*batch)
                    hits = record.summarised(list(ids), list(hashes), config_hash=cfg_hash, run_date=run_date)
                    for doc_id, doc_hash, ok, hit in zip(ids, hashes, usable, hits):
                        if hit:
                            skip.done.add((doc_id, doc_hash))
                            skip.skipped += 1
                        elif ok:
                            skip.to_model += 1
                        else:
                            skip.to_answer += 1
                    batch.clear()

            for doc in iter_documents(plan):
                batch.append((doc.id, doc.content_hash, doc.error_type is None))
                if len(batch) >= 100_000:
                    probe()
            probe()
            done = skip.done
            log.info("nightly: %d (id, content hash) pair(s) of the input summarised before %s", len(done), run_date)
            decided[cfg_hash] = skip
        return decided[cfg_hash]

    night_config = dataclasses.replace(
        config, output_dir=nightly_partition(output_root, run_date),
        job_id=config.job_id or nightly_submission_id(config.input_path, run_date),
    )
    stopped = False
    try:
        return run_job(night_config, skip_factory=skip_factory,
                       extra_summary={"run_date": run_date, "output_root": output_root}, **kwargs)
    except JobStopped:
        stopped = True
        raise
    finally:
        if decided:  # the night got as far as deciding: what it committed is summarised
            try:  # a stopped job exits within seconds: its delta is added, the merge waits
                sync_record(output_root, compact=not stopped)
            except Exception:  # the record is rebuilt or completed by the next night
                log.warning("nightly record of %s not updated after the night", output_root, exc_info=True)


__all__ = ["run_job", "run_nightly", "nightly_submission_id", "nightly_partition", "NightlySkip",
           "normalize_run_date", "normalize_input_path"]

"""A batch job, orchestrated: Parquet corpus -> prompts -> replica pool -> committed Parquet output.

    config = JobConfig(task="summarize", input_path="/data/corpus", output_dir="/data/out")
    summary = run_job(config)

Order of work, so that mistakes cost seconds, not GPU hours:
1. check the schema of every input file and that the model exists;
2. open the output (resume / refuse a different job / --overwrite);
3. load the tokenizer, start Ray and the engine, stream documents through its dataflow;
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
import sys
from collections.abc import Callable

from pipeline.config.job import JobConfig, check_parallelism, config_hash, job_fingerprint
from pipeline.config.task import HIERARCHICAL
from pipeline.data.input import (
    Document, InputSpec, check_input, check_output_apart, file_digests, iter_documents,
)
from pipeline.data.long_documents import LongDocumentPrompts, describe_hierarchical
from pipeline.data.prompts import PromptBuilder, load_templates
from pipeline.data.rows import dca_columns, job_columns
from pipeline.data.writer import MANIFEST as MANIFEST_NAME
from pipeline.data.writer import OutputError, OutputWriteError, OutputWriter, read_manifest
from pipeline.dataflows.context import JobRun
from pipeline.dataflows.driver import DriverDataflow
from pipeline.dataflows.units import UnitsDataflow
from pipeline.engine.models import load_model_config, load_tokenizer, model_fingerprint
from pipeline.metrics.job import JobMetrics
from pipeline.runtime.cluster import (
    check_devices, ensure_ray, ray_submission_id, release_gpu_request, wait_for_gpus,
)
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


def _open_job(config: JobConfig, stopper: StopSignals, *, tokenizer, skip_factory) -> tuple[JobRun, dict]:
    """Steps 1 and 2: everything checked, then the output claimed. -> (the run, its summary's
    extra keys)."""
    check_output_apart(config.input_path, config.output_dir)  # before anything is read, written or removed
    plan = check_input(InputSpec(
        path=config.input_path, id_column=config.id_column, text_column=config.text_column,
        question_column=config.question_column, batch_rows=config.input_batch_rows,
    ))
    model_config = load_model_config(config.model_spec)  # also checks that the model exists
    check_parallelism(config, model_config)
    dca_cols = dca_columns(config.model_spec, model_config)
    templates = load_templates(config.templates_file)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model_spec)
    builder = PromptBuilder(tokenizer, task=config.task, templates=templates, max_input_tokens=config.max_input_tokens,
                            truncation=config.truncation, use_chat_template=config.use_chat_template)
    long_prompts = None
    if config.truncation == HIERARCHICAL:
        long_prompts = LongDocumentPrompts(tokenizer, task=config.task, templates=templates,
                                           max_input_tokens=config.max_input_tokens,
                                           use_chat_template=config.use_chat_template)
        print(describe_hierarchical(builder, long_prompts), file=sys.stderr, flush=True)
    cfg_hash = config_hash(config, templates, builder.template_kind, model_fingerprint(config.model_spec.model))
    fingerprint = job_fingerprint(config, cfg_hash, plan.identity)
    job_id = config.job_id or f"{config.task}-{fingerprint[:12]}"
    # The input files' content digests, read again only for files whose size or mtime moved since
    # the output recorded them (a resume only stats its files).
    try:
        recorded = (read_manifest(config.output_dir) or {}).get("input_files") if not config.overwrite else None
    except (OSError, ValueError, OutputError):  # the writer says what is wrong with it
        recorded = None
    writer = OutputWriter(
        config.output_dir, job_id=job_id, fingerprint=fingerprint, config=config.to_dict(),
        overwrite=config.overwrite, part_rows=config.part_rows, part_seconds=config.part_seconds,
        dataflow=config.dataflow, id_type=plan.id_type, input_files=file_digests(plan, recorded),
    )
    # The resolved DCA settings next to the job's (the metrics plot marks P; jobs.show prints them).
    metrics = JobMetrics(job_id=job_id, task=config.task, config={**config.to_dict(), "dca_in_effect": dca_cols},
                         total_input_rows=plan.num_rows)
    if writer.manifest.get("runs", 1) > 1:  # a resumed job: its metrics cover the earlier runs too
        metrics.resume(config.output_dir, runs_before=writer.manifest["runs"] - 1)
    extra = dict(template_kind=builder.template_kind, config_hash=cfg_hash, output_dir=config.output_dir,
                 resumed_from_committed_rows=len(writer.committed) if writer.resumed else 0, dataflow=config.dataflow)
    base = job_columns(task=config.task, model=config.model_spec.model, config_hash=cfg_hash, job_id=job_id,
                       dca=dca_cols)
    skip = skip_factory(cfg_hash) if skip_factory is not None else None
    return JobRun(config=config, plan=plan, builder=builder, writer=writer, metrics=metrics, base=base, skip=skip,
                  stopper=stopper, long_prompts=long_prompts), extra


def _run_job(config: JobConfig, stopper: StopSignals, *, pool_factory, tokenizer, skip_factory,
             extra_summary, engine_stage=None) -> dict:
    metrics_extra = {"ray_submission_id": ray_submission_id(), **(extra_summary or {})}
    job, extra = _open_job(config, stopper, tokenizer=tokenizer, skip_factory=skip_factory)
    metrics_extra.update(extra)
    writer, metrics = job.writer, job.metrics
    if config.dataflow == "ray-data":
        dataflow = UnitsDataflow(job, engine_stage=engine_stage)
    else:
        dataflow = DriverDataflow(job, pool_factory=pool_factory)
    requested_gpus = started_ray = False
    status, message, engine_stats = "failed", None, None
    write_error: OutputWriteError | None = None
    try:
        if dataflow.needs_ray:
            import ray

            started_ray = not ray.is_initialized()
            local = config.ray_address in (None, "local") and os.environ.get("RAY_ADDRESS") in (None, "", "local")
            config = ensure_ray(config)
            stopper.install()  # ray.init replaced the SIGTERM handler with its own
            if local and started_ray:
                check_devices(config)
            requested_gpus = wait_for_gpus(config)
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
        # The output first: `ray job stop` sends SIGKILL a few seconds after SIGTERM. Each step
        # runs whatever the one before it did: after a failed write (a full disk) the metrics,
        # the manifest, the staging directory, the engine and Ray are still seen to.
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
            attempt(MANIFEST_NAME, lambda: writer.close(complete=status == "complete", summary={
                k: summary[k] for k in ("status", "message", "wall_s", "documents", "started_at")}))
        finally:
            dataflow.shutdown()
            if requested_gpus:
                release_gpu_request()
            if started_ray:  # disconnect (and stop a local Ray) cleanly, also on SIGTERM
                import ray

                ray.shutdown()
            if write_error is None:
                summary["metrics_files"].update(metrics.write_plot(config.output_dir))
    if write_error is not None:
        unwritten = [w for w in not_written if w != "the last part"]
        raise OutputWriteError(str(write_error) + (f" ({' and '.join(unwritten)} could not be written either)"
                                                   if unwritten else ""))
    if status != "complete":
        raise JobFailed(message)
    return summary


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
    decided: dict[str, Callable[[Document], bool]] = {}

    def skip_factory(cfg_hash: str):
        if cfg_hash not in decided:  # the ray-data dataflow asks twice
            record = sync_record(output_root)
            plan = check_input(InputSpec(
                path=config.input_path, id_column=config.id_column, text_column=config.text_column,
                question_column=config.question_column, batch_rows=config.input_batch_rows,
            ))
            done = record.summarised_pairs(((doc.id, doc.content_hash) for doc in iter_documents(plan)),
                                           config_hash=cfg_hash, run_date=run_date)
            log.info("nightly: %d (id, content hash) pair(s) of the input summarised before %s", len(done), run_date)
            decided[cfg_hash] = lambda doc: (doc.id, doc.content_hash) in done
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


__all__ = ["run_job", "run_nightly", "nightly_submission_id", "nightly_partition", "normalize_run_date",
           "normalize_input_path"]

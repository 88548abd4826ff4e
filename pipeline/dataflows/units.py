"""The jobs on a Ray Data dataflow (`--dataflow ray-data`): the driver does no per-document work.

    units (driver: footers only) -> read (Ray tasks) -> prompts (CPU actors) -> engine (one actor
    per replica) -> UnitDatasink (Ray tasks: one committed part per unit)

The driver lists the files and their footers (pipeline.data.input.check_input), cuts the corpus
into WORK UNITS (pipeline.data.input.WorkUnit: a slice of at most `unit_rows` rows of one row group, with a
deterministic key naming its rows) and leaves out the rows committed parts already hold (a resume
works in rows, so --unit-rows may change between runs). One id-only pass in a Ray task finds
the duplicate ids in corpus order, so every row gets the same error rows as the driver dataflow.

A unit stays whole through the dataflow: each stage maps ONE Ray Data row holding a whole unit
(its Documents, then its prompts, then its output rows, pickled) to one row. The prompt stage and
the engine stage build rows with the row builder every dataflow uses (pipeline.data.rows: the same
prompt building, error rows and result rows), so both dataflows write the same rows. The engine stage
owns one ReplicaPool of one replica per actor (tp rank actors in a placement group); a lost actor
or node is restarted and its unit retried by Ray Data.

Exactly once: the datasink commits a unit's rows (pipeline.data.writer.commit_unit: written to
`_staging`, fsynced, renamed to `part-u<unit key>.parquet`). The deterministic name is the unit's completion record: a retried unit
replaces its own part, never adds a second one, and a resume lists the part names and skips those
units (the driver holds unit keys, not row keys). Counts reach the driver through a small ledger
actor (pinned to the driver's node), keyed by unit so a retried unit is counted once; it holds the
failure budget's counts and stops the remaining units (they pass through unanswered and
uncommitted) when the budget trips, and the job fails with the driver dataflow's message.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import uuid

import pyarrow as pa

from pipeline.config.job import JobConfig
from pipeline.config.task import HIERARCHICAL
from pipeline.data.input import InputPlan, WorkUnit, parse_unit_key, plan_units, read_unit, unit_duplicates
from pipeline.data.long_documents import LongDocumentPrompts, requests_with_follow_ups
from pipeline.data.prompts import PromptBuilder, load_templates
from pipeline.data.rows import (
    InFlight, prepare_document, result_rows, set_engine_attention, split_rows, stamp_engine_attention,
)
from pipeline.data.schema import id_type_name
from pipeline.data.writer import (
    STAGING, OutputWriteError, OutputWriter, commit_unit, committed_unit_keys, unit_part_name,
)
from pipeline.dataflows.budget import FailureBudget
from pipeline.dataflows.context import JobRun
from pipeline.engine.attention_record import engine_record_of_stats
from pipeline.metrics.job import JobMetrics
from pipeline.metrics.live import LiveMetrics
from pipeline.runtime.progress import progress_bar
from pipeline.runtime.ray_data_output import quiet_execution, ray_data_console

log = logging.getLogger("pipeline.dataflows.units")


# ------------------------------------------------------------------------------------- ledger


class UnitLedger:
    """Per-unit counts, summed off the driver (a Ray actor). A unit counts once, whatever its
    retries; the failure budget is judged here after each unit."""

    def __init__(self, config: JobConfig, job_id: str) -> None:
        self.config = config
        self.metrics = JobMetrics(job_id=job_id, task=config.task, config={}, total_input_rows=0)
        self.units: set[str] = set()
        self.budget = FailureBudget(config)
        self.stop_reason: str | None = None
        self.engine_stats: dict = {}

    def add(self, key: str, emitted: list, counts: dict) -> bool:
        if key in self.units:
            return False
        self.units.add(key)
        self.budget.documents_read += counts["read"]
        self.metrics.documents_skipped += counts["skipped"]
        for rows, results, prompt_tokens in emitted:
            self.metrics.add_document(rows, results, prompt_tokens)
            self.budget.add(rows)
        if self.stop_reason is None:
            self.stop_reason = self.budget.stop_reason(self.metrics.error_types, self.metrics.first_errors)
        return True

    def stopped(self) -> str | None:
        return self.stop_reason

    def engine(self, name: str, stats: dict) -> None:
        """An engine actor's ReplicaPool.stats(), its replicas named `<actor>/<replica>`."""
        for replica, values in (stats or {}).items():
            self.engine_stats[f"{name}/{replica}"] = values

    def progress(self) -> tuple[int, int, int, int]:
        m = self.metrics
        return m.documents_ok + m.documents_error + m.documents_skipped, m.documents_ok, m.documents_error, \
            m.prompt_tokens + m.output_tokens

    def result(self) -> dict:
        return {"metrics": self.metrics, "units": len(self.units), "stop_reason": self.stop_reason,
                "engine_stats": self.engine_stats}


def _stopped(ledger) -> bool:
    import ray

    return ray.get(ledger.stopped.remote()) is not None


# ------------------------------------------------------------------------------------- stages


def _read_units(batch: pa.Table, *, plan: InputPlan, duplicates: dict) -> pa.Table:
    """Ray task: each unit's rows as Documents (pipeline.data.input.read_unit), pickled."""
    keys, payloads = [], []
    for values in batch.to_pylist():
        unit = WorkUnit(**{k: values[k] for k in ("file_index", "row_group", "start", "stop", "first_row")})
        keys.append(unit.key)
        payloads.append(pickle.dumps(read_unit(plan, unit, duplicates.get(unit.key)), protocol=5))
    return pa.table({"key": pa.array(keys, pa.string()), "payload": pa.array(payloads, pa.large_binary())})


def _builders(config: JobConfig) -> tuple[PromptBuilder, LongDocumentPrompts | None]:
    """The job's prompt builder, and the prompts of documents answered in sections (hierarchical)."""
    from pipeline.engine.models import load_tokenizer

    tokenizer, templates = load_tokenizer(config.model_spec), load_templates(config.templates_file)
    builder = PromptBuilder(tokenizer, task=config.task, templates=templates, max_input_tokens=config.max_input_tokens,
                            truncation=config.truncation, use_chat_template=config.use_chat_template)
    long_prompts = None
    if config.truncation == HIERARCHICAL:
        long_prompts = LongDocumentPrompts(tokenizer, task=config.task, templates=templates,
                                           max_input_tokens=config.max_input_tokens,
                                           use_chat_template=config.use_chat_template, qa_combine=config.qa_combine)
    return builder, long_prompts


class UnitPromptStage:
    """CPU actor with the tokenizer: a unit's Documents -> its error rows and its requests (a
    document answered in sections: no request, its pending document holds the split)."""

    def __init__(self, config: JobConfig, base_row: dict, skip, ledger) -> None:
        self.config, self.base_row, self.skip, self.ledger = config, base_row, skip, ledger
        self.builder, self.long_prompts = _builders(config)
        self.sampling = config.sampling()
        self.live = LiveMetrics(run=base_row["job_id"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys, payloads = batch.column("key").to_pylist(), batch.column("payload").to_pylist()
        out = []
        for payload in payloads:
            if _stopped(self.ledger):  # the failure budget tripped: leave the unit uncommitted
                out.append(b"")
                continue
            items, emitted, read, skipped = [], [], 0, 0
            for doc in pickle.loads(payload):
                if self.skip is not None and self.skip(doc):
                    skipped += 1
                    continue
                read += 1
                prepared = prepare_document(doc, task=self.config.task, builder=self.builder, base=self.base_row,
                                            sampling=self.sampling, long_prompts=self.long_prompts)
                if prepared.request is None and prepared.pending is None:
                    self.live.document(prepared.rows)
                    emitted.append((prepared.rows, None, 0))
                else:
                    items.append((prepared.request, prepared.pending))
            out.append(pickle.dumps({"items": items, "emitted": emitted,
                                     "counts": {"read": read, "skipped": skipped}}, protocol=5))
        return pa.table({"key": pa.array(keys, pa.string()), "payload": pa.array(out, pa.large_binary())})


class UnitEngineStage:
    """One engine replica per actor (a ReplicaPool of one replica: tp rank actors in a placement
    group); a unit's requests in (longest first), its output rows out. Stand-ins (benchmarks,
    tests) override `_start_engine` and `_answer`."""

    def __init__(self, config: JobConfig, base_row: dict, ledger) -> None:
        import dataclasses

        self.config = dataclasses.replace(config, replicas=1, progress=False)
        self.base_row, self.ledger = base_row, ledger
        self.name = f"dca-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.builder, self.long_prompts = _builders(config)
        self.live = LiveMetrics(run=base_row["job_id"])
        self.pool = self._start_with_retries()
        # This replica's attention backend (chosen at its start): the rows of every unit it
        # answers carry it, its error rows included; the ledger hears of it now, so that the
        # manifest and _metrics.json have it even if no unit completes.
        attention = getattr(self.pool, "attention", None)  # a stand-in pool may not say
        self.attention = attention() if attention is not None else None
        self.base_row = set_engine_attention(dict(base_row), self.attention)
        self._report_stats()

    def _start_with_retries(self, attempts: int = 3):
        """A replica whose rank lands on a node that leaves while it loads fails to start; Ray
        Data does not retry a failed actor constructor, so the engine start is retried here (the
        model and settings were checked by the driver: what fails here is the cluster)."""
        from pipeline.engine import EngineStartupError
        from pipeline.engine.errors import AttentionBackendUnavailable

        for attempt in range(attempts):
            try:
                return self._start_engine()
            except EngineStartupError as error:
                # A backend asked for by name that cannot run is a setting: a retry would fail alike.
                if attempt == attempts - 1 or isinstance(error, AttentionBackendUnavailable):
                    raise
                log.warning("engine start failed (%s); retrying (%d of %d)", error, attempt + 2, attempts)
                time.sleep(2.0)

    def _start_engine(self):
        from pipeline.runtime.pool import start_pool

        return start_pool(self.config)

    def _answer(self, requests):
        """Results of each request (a list per request, in completion order). `requests` is an
        iterable that may yield None: wait for a result (ReplicaPool.run's contract)."""
        return self.pool.run(requests, self.config.in_flight)

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys, payloads = batch.column("key").to_pylist(), batch.column("payload").to_pylist()
        out = []
        for payload in payloads:
            if not payload or _stopped(self.ledger):
                out.append(b"")
                continue
            prepared = pickle.loads(payload)
            emitted = prepared["emitted"]
            for rows, _, _ in emitted:  # the prompt stage's rows, made before any engine answered
                stamp_engine_attention(rows, self.attention)
            in_flight = InFlight()
            items = []
            for request, pending in prepared["items"]:
                if request is not None:
                    items.append((request, pending))
                else:  # a document answered in sections: its first calls
                    items += [(call, pending) for call in pending.split.start(self.long_prompts)]
            items.sort(key=lambda item: item[0].prompt_tokens, reverse=True)
            for request, pending in items:
                in_flight.add(request.request_id, pending)
            self.live.queued(len(items))
            open_splits = [sum(pending.split is not None for _, pending in prepared["items"])]
            follow_ups: list = []
            if items:
                source = requests_with_follow_ups([request for request, _ in items], follow_ups,
                                                  lambda: open_splits[0] > 0)
                for results in self._answer(source):
                    for result in results:  # which actor's replica answered (metrics per rank)
                        result.replica = f"{self.name}/{result.replica}"
                    pending = in_flight.answer(results)
                    if pending is None:
                        continue
                    self.live.answered(results)
                    if pending.split is None:
                        rows = result_rows(pending, results, base=self.base_row, builder=self.builder)
                        self.live.document(rows)
                        emitted.append((rows, results, pending.prompt_tokens_sent))
                        continue
                    split = pending.split
                    follow = split.on_results(results[0].request_id, results, self.long_prompts)
                    for request in follow:
                        in_flight.add(request.request_id, pending)
                    self.live.queued(len(follow))
                    follow_ups.extend(follow)
                    if split.finished:
                        open_splits[0] -= 1
                        rows = split_rows(pending, base=self.base_row)
                        self.live.document(rows)
                        emitted.append((rows, split.results, split.tokens_sent))
            if len(in_flight):
                raise RuntimeError(f"the engine finished without answering {len(in_flight)} request(s)")
            out.append(pickle.dumps({"emitted": emitted, "counts": prepared["counts"]}, protocol=5))
        self._report_stats()
        return pa.table({"key": pa.array(keys, pa.string()), "payload": pa.array(out, pa.large_binary())})

    def _report_stats(self) -> None:
        try:
            self.ledger.engine.remote(self.name, self.pool.stats())
        except Exception:  # noqa: BLE001 - stats are best effort
            log.debug("engine stats failed", exc_info=True)

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            try:
                pool.shutdown()
            except Exception:  # noqa: BLE001 - the actor is going away
                pass


def _datasink(output_dir: str, ledger, id_type: str = "string"):
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class UnitDatasink(Datasink):
        """Commits each unit as one part (commit_unit), then reports its counts to the ledger."""

        def __init__(self) -> None:
            self.output_dir, self.ledger, self.id_type = output_dir, ledger, id_type

        def get_name(self) -> str:
            return "DCAJobUnits"

        def write(self, blocks, ctx) -> list[tuple[str, int]]:
            import ray

            written = []
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                for key, payload in zip(table.column("key").to_pylist(), table.column("payload").to_pylist()):
                    if not payload:  # stopped by the failure budget: not committed, done by a resume
                        continue
                    unit = pickle.loads(payload)
                    rows = [row for doc_rows, _, _ in unit["emitted"] for row in doc_rows]
                    written.append((key, commit_unit(self.output_dir, key, rows, self.id_type)))
                    ray.get(self.ledger.add.remote(key, unit["emitted"], unit["counts"]))
            return written

    return UnitDatasink()


# ------------------------------------------------------------------------------------- driver


def _progress(config: JobConfig, total: int, ledger, done_event) -> None:
    """The job's bar over `total` documents, fed from the ledger's counts once a second until
    `done_event`, then once more: the last units' documents are on it when it closes (without that
    last read a short job's bar ended at 8/10 or 0/2 over a complete job)."""
    import ray

    bar = progress_bar(config, total)
    if bar is None:
        return
    t0, shown = time.monotonic(), 0

    def show() -> None:
        nonlocal shown
        try:
            done, ok, error, tokens = ray.get(ledger.progress.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress is best effort
            return
        bar.update(done - shown)
        shown = done
        bar.set_postfix(ok=ok, err=error, tok_s=f"{tokens / max(time.monotonic() - t0, 1e-9):.0f}", refresh=False)

    try:
        while not done_event.wait(1.0):
            show()
        show()
    finally:
        bar.close()


def _sees(paths: list[str]) -> list[str]:
    """Ray task: the paths this node cannot see."""
    return [p for p in paths if not os.path.exists(p)]


def check_shared_paths(output_dir: str, plan: InputPlan, *, marker: str | None = None) -> None:
    """Every alive node must see the output directory (its tasks commit parts there) and a local
    input (its tasks read units): a path local to the driver's machine would scatter parts over
    the nodes' disks, and a resume would redo what it cannot see. One zero-CPU task per node
    looks for a marker file the driver writes into the output (and the input's first file).
    Raises OutputError naming the nodes that do not. (`marker`: a path to look for instead of a
    fresh marker, for tests.)"""
    import pyarrow.fs as pafs
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.data.writer import OutputError

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1 and marker is None:
        return  # one machine: the driver's view is every task's
    own = marker is None
    if own:
        os.makedirs(os.path.join(output_dir, STAGING), exist_ok=True)
        marker = os.path.join(output_dir, STAGING, f".visible-{uuid.uuid4().hex}")
        open(marker, "w").close()
    paths = [marker]
    if isinstance(plan.filesystem, pafs.LocalFileSystem) and plan.files:
        paths.append(plan.files[0].path)
    try:
        checks = {
            n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": ray.remote(_sees).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False),
            ).remote(paths)
            for n in nodes
        }
        blind = {node: missing for node, ref in checks.items() if (missing := ray.get(ref, timeout=120))}
    finally:
        if own:
            os.remove(marker)
    if blind:
        node, missing = next(iter(blind.items()))
        what = "the output directory" if missing[0] == marker else f"the input file {missing[0]}"
        raise OutputError(
            f"--dataflow ray-data: {len(blind)} of {len(nodes)} node(s) cannot see {what} (first: node {node}); "
            f"every node reads units and commits parts, so --input and --output ({output_dir}) must be on storage all "
            "nodes share (a shared mount), or use --dataflow driver"
        )


def run_dataflow(config: JobConfig, *, plan: InputPlan, writer: OutputWriter, metrics: JobMetrics, base_row: dict,
                 skip=None, engine_stage: type | None = None) -> tuple[str | None, dict | None]:
    """Runs the uncommitted units of a job on the connected Ray cluster. Returns (None when every
    unit is committed, else why the job stops; the engine stats). The ledger's counts are added
    to `metrics` whatever happens."""
    import threading

    import ray
    from ray.data import ActorPoolStrategy
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Resume works in rows: the committed parts' names say which rows they hold, whatever
    # --unit-rows cut them; only the other rows are cut into units (a changed --unit-rows
    # neither skips nor repeats a row).
    todo = plan_units(plan, config.unit_rows, committed_unit_ranges(config.output_dir, plan, writer.committed_units))
    metrics.documents_resumed += plan.num_rows - sum(u.num_rows for u in todo)
    log.info("ray-data dataflow: %d work unit(s) of at most %d rows to run, %d part(s) already committed", len(todo),
             config.unit_rows, len(writer.committed_units))
    if not todo:
        return None, None
    units = todo
    check_shared_paths(config.output_dir, plan)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    ledger = ray.remote(UnitLedger).options(num_cpus=0, scheduling_strategy=here).remote(config, base_row["job_id"])
    duplicates = ray.get(ray.remote(unit_duplicates).options(num_cpus=0, scheduling_strategy=here).remote(plan, units))
    # No Ray Data plan or progress on the console: the job's own bar counts documents (Ray Data
    # would count work units), and Ray Data's log file keeps its reports (pipeline.runtime.ray_data_output).
    quiet_execution(ray.data.DataContext.get_current(), progress=False)
    items = [{"file_index": u.file_index, "row_group": u.row_group, "start": u.start, "stop": u.stop,
              "first_row": u.first_row} for u in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Reads in Ray tasks, spread over the nodes (Ray Data's default for tasks). Half a CPU each: a
    # read is mostly I/O, and a resource request unlike the prompt actors' keeps Ray Data from
    # fusing the reads into them (reading runs beside tokenising). Only named parameters of
    # map_batches: extra Ray remote arguments are deprecated in Ray 2.60 (RayDeprecationWarning).
    ds = ds.map_batches(_read_units, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
                        fn_kwargs={"plan": plan, "duplicates": {u.key: duplicates[u.key] for u in todo
                                                                if u.key in duplicates}})
    ds = ds.map_batches(UnitPromptStage, batch_size=1, batch_format="pyarrow", num_cpus=1,
                        fn_constructor_kwargs={"config": config, "base_row": base_row, "skip": skip, "ledger": ledger},
                        compute=ActorPoolStrategy(size=config.prompt_actors))
    # The actor only coordinates: its replica's ranks reserve the CPUs/GPUs (placement group). An
    # actor lost mid-unit is restarted and its unit retried: Ray Data's default for actor pools
    # (max_restarts=-1, max_task_retries=-1).
    ds = ds.map_batches(engine_stage or UnitEngineStage, batch_size=1, batch_format="pyarrow", num_cpus=0,
                        fn_constructor_kwargs={"config": config, "base_row": base_row, "ledger": ledger},
                        compute=ActorPoolStrategy(size=config.replicas))
    finished = threading.Event()
    bar = threading.Thread(target=_progress, args=(config, sum(u.num_rows for u in todo), ledger, finished),
                           daemon=True)
    bar.start()
    result = None
    try:
        with ray_data_console():  # not Ray Data's "Data sink ... finished. N rows": N counts units
            ds.write_datasink(_datasink(config.output_dir, ledger, id_type_name(writer.schema.field("id").type)))
    except Exception as error:  # a commit that failed for lack of space: its one line, not Ray's wrapping
        cause = _write_error_in(error)
        if cause is None:
            raise
        raise OutputWriteError(str(cause)) from None
    finally:
        finished.set()
        bar.join(timeout=15)  # its last read of the ledger (at most 10 s), before the ledger goes
        try:
            result = ray.get(ledger.result.remote(), timeout=60)
            metrics.merge(result["metrics"])
        except Exception:  # noqa: BLE001 - counts are best effort after a crash
            log.exception("the ledger's counts could not be read")
        try:
            ray.kill(ledger)
        except Exception:  # noqa: BLE001 - it goes with the job anyway
            pass
    engine_stats = result["engine_stats"] if result else None
    if result is not None:  # what the engine actors' replicas ran, as they reported it
        writer.record_attention_backend(engine_record_of_stats(engine_stats))
    if result and result["stop_reason"]:
        return result["stop_reason"], engine_stats
    missing = [u.key for u in todo if u.key not in committed_unit_keys(config.output_dir)]
    if missing:
        return (f"{len(missing)} work unit(s) were not committed (first {missing[0]}); rerun the same command "
                "to resume"), engine_stats
    return None, engine_stats


def _write_error_in(error: BaseException) -> OutputWriteError | None:
    """The OutputWriteError a failed Ray task raised (commit_unit), wherever Ray and Ray Data put
    it: the exception itself (RayTaskError subclasses its cause), its `cause`, or its chain."""
    seen = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OutputWriteError):
            inner = getattr(e, "cause", None)
            lines = str(inner if isinstance(inner, OutputWriteError) else e).strip().splitlines() or [""]
            line = next((text for text in reversed(lines) if "output " in text), lines[-1])
            return OutputWriteError(line[line.find("output "):] if "output " in line else line)
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


def committed_unit_ranges(output_dir: str, plan: InputPlan, keys) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """{(file index, row group): [(start, stop), ...] sorted}: the rows the committed unit parts hold, from
    their names. A part named by an earlier version (no stop in its key) is read for its last
    source_row (one column of one part; only outputs begun before the change have such parts)."""
    import pyarrow.parquet as pq

    ranges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for key in keys:
        file_index, group, start, stop = parse_unit_key(key)
        if file_index >= len(plan.files) or group >= len(plan.files[file_index].row_group_rows):
            continue  # not this corpus's (the fingerprint makes that impossible short of a hand edit)
        if stop is None:
            rows = pq.read_table(os.path.join(output_dir, unit_part_name(key)), columns=["source_row"])["source_row"]
            offset = sum(plan.files[file_index].row_group_rows[:group])
            stop = (max(rows.to_pylist()) - offset + 1) if len(rows) else start
        ranges.setdefault((file_index, group), []).append((start, stop))
    return {where: sorted(spans) for where, spans in ranges.items()}


class UnitsDataflow:
    """One run of a job through the Ray Data dataflow (same interface as DriverDataflow): the
    engine starts inside the engine stage's actors, so start() has nothing to do. `engine_stage`:
    the engine stage's class (UnitEngineStage, or a stand-in for benchmarks and tests)."""

    needs_ray = True

    def __init__(self, job: JobRun, *, engine_stage: type | None = None) -> None:
        self.job = job
        self.config = job.config
        self.engine_stage = engine_stage
        # Rows an earlier run committed, counted from the committed units once run() returns.
        self.resumed_rows: int | None = None

    def start(self, config: JobConfig) -> None:
        self.config = config

    def run(self) -> tuple[str | None, dict | None]:
        from pipeline.engine.errors import AttentionBackendUnavailable, error_message_in, find_error

        job = self.job
        try:
            message, stats = run_dataflow(self.config, plan=job.plan, writer=job.writer, metrics=job.metrics,
                                          base_row=job.base, skip=job.skip, engine_stage=self.engine_stage)
        except Exception as error:
            # An engine actor could not start its replica because the backend asked for cannot
            # run: Ray Data wraps that in its own errors; the job reports it as the driver
            # dataflow does (one line, exit 2). No unit was committed: they commit after the engine.
            unavailable = find_error(error, AttentionBackendUnavailable)
            message = str(unavailable) if unavailable is not None else error_message_in(
                error, AttentionBackendUnavailable)
            if message is not None:
                raise AttentionBackendUnavailable(message) from None
            raise
        self.resumed_rows = job.metrics.documents_resumed
        return message, stats

    def engine_stats(self, stats: dict | None) -> dict | None:
        return stats

    def shutdown(self) -> None:
        pass


__all__ = ["UnitsDataflow", "run_dataflow", "check_shared_paths", "committed_unit_ranges", "UnitLedger",
           "UnitPromptStage", "UnitEngineStage"]

"""Driver-side handle of one replica: its placement group, its rank actors, one call at a time on
every rank (a static batch, or a step call of the running batch), and the errors a call can end
with. Every call's measurements (per-rank busy time) are added up here."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from pipeline.config.engine import EngineConfig
from pipeline.engine.attention_record import replica_record
from pipeline.engine.errors import AttentionBackendUnavailable, EngineStartupError, short_error
from pipeline.engine.messages import OutOfMemoryAnswer, StepResult, result_of
from pipeline.engine.requests import GenerationRequest, GenerationResult
from pipeline.engine.scheduler import budget_of

log = logging.getLogger("pipeline.engine")

# Seconds Ray gives a new worker process of a local Ray the project starts (a job's, or a
# ReplicaPool's when nothing started Ray) to register before killing it (Ray's
# worker_register_timeout_seconds, 60 by default): a rank's process importing torch on a loaded
# 2-core machine can take longer, and its actor then "never ran". RAY_worker_register_timeout_seconds
# in the environment wins.
LOCAL_WORKER_REGISTER_TIMEOUT_S = 300


def local_ray_system_config() -> dict:
    """The `_system_config` of a local Ray the project starts."""
    if os.environ.get("RAY_worker_register_timeout_seconds"):
        return {}
    return {"worker_register_timeout_seconds": LOCAL_WORKER_REGISTER_TIMEOUT_S}


class ReplicaDown(Exception):
    """The replica lost a rank (or hung); its batch must run elsewhere."""


class ReplicaOutOfMemory(Exception):
    """Some rank ran out of memory on the batch. `lost`: why the replica was killed (None: kept).
    `reports`: rank -> what it measured in that call before (continuous batching)."""

    def __init__(self, message: str, lost: str | None, reports: dict | None = None):
        super().__init__(message, lost)
        self.message, self.lost, self.reports = message, lost, reports or {}


class RankNeverStarted(Exception):
    """Ray stopped a rank's actor before it ran (its worker process died or was killed while
    starting); the message is Ray's reason, in one line."""


# Tries of a replica start whose ranks Ray stopped before they ran (`Replica.start`).
START_ATTEMPTS = 3
# What Ray appends to an ActorDiedError whose actor was stopped before its creation task ran
# (ray.exceptions.ActorDiedError, cause.never_started; the flag itself is not kept on the error).
NEVER_STARTED = "The actor never ran - it was cancelled before it started running."


def _never_started(error: BaseException) -> bool:
    import ray

    return isinstance(error, ray.exceptions.ActorDiedError) and NEVER_STARTED in str(error)


def _ray_reason(error: BaseException) -> str:
    """Ray's reason of an ActorDiedError in one line: its own message lines, without the actor's
    coordinates (the tab-indented class_name, actor_id, pid ... lines) and the generic ones."""
    generic = ("The actor died unexpectedly before finishing this task.", NEVER_STARTED)
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.startswith("\t") and line.strip() not in generic]
    return " ".join(lines) or NEVER_STARTED


class Replica:
    """Driver-side handle of one replica: its placement group, its rank actors, its counters."""

    def __init__(self, name: str, config: EngineConfig, device_type: str):
        self.name, self.config, self.device_type = name, config, device_type
        self.pg = None
        self.workers: list = []
        self.master = None  # (addr, port)
        self.node_id = None
        self.load_s = None
        self.served = self.failures = self.restarts = 0
        self.alive = False
        # True from a batch's dispatch until every rank has answered it.
        self.busy = False
        self.last_error: str | None = None
        # Device busy seconds per rank (pipeline.engine.metering), over every completed call of
        # every incarnation of this replica; steps: packed forwards of the running batch.
        self.busy_s = [0.0] * config.tp_size
        self.steps = 0
        # Set by start(): the scheduler the ranks run, their memory plan, prompt tokens per step.
        self.scheduler: str | None = None
        self.plan: dict | None = None
        self.memory_plan = None
        self.budget = None
        self.prefill_tokens: int | None = None
        # Set by start(): the attention backend its ranks run, and why
        # (pipeline.engine.attention_record.replica_record); None until it has started.
        self.attention: dict | None = None
        # Continuous batching: requests (by seq) the ranks still hold that must be dropped at
        # the next call (after an out-of-memory split).
        self.to_drop: list[int] = []

    def start(self) -> None:
        """Places the ranks, starts their actors and loads the model on them; EngineStartupError
        (one line) when it cannot.

        Ray may stop a rank's worker process before the actor ever runs: on a loaded machine, a
        process that takes longer than Ray's worker_register_timeout_seconds (60 s by default) to
        start is killed and its actor reported "never ran - cancelled before it started". That is
        the machine, not the job: the start is tried again, up to START_ATTEMPTS times, each
        retry logged with Ray's reason. Any other failure is not retried here."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_once()
                return
            except RankNeverStarted as error:
                if attempt == START_ATTEMPTS:
                    raise EngineStartupError(
                        f"replica {self.name}: Ray stopped a rank's process before it ran, {attempt} times in a row "
                        f"(Ray: {error}). On a loaded machine Ray kills worker processes that take longer than "
                        "worker_register_timeout_seconds to start: run when the machine is less busy, or start Ray "
                        "with a longer limit (RAY_worker_register_timeout_seconds=300 in the environment of "
                        "`ray start`)"
                    ) from None
                log.warning("replica %s: Ray stopped a rank's process before it ran (%s); starting the replica "
                            "again (attempt %d of %d)", self.name, error, attempt + 1, START_ATTEMPTS)

    def _start_once(self) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        config, tp = self.config, self.config.tp_size
        begin = time.perf_counter()
        bundle = {"CPU": config.cpus_per_rank}
        if self.device_type == "cuda":
            bundle["GPU"] = 1
        self.pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=config.placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            self.pg = None
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            raise EngineStartupError(
                f"replica {self.name}: no node had {tp} x {bundle} free together (STRICT_PACK) within "
                f"placement_timeout_s={config.placement_timeout_s:g}; free now in the cluster: {free}. "
                "Other actors hold the rest: stop them, or lower tp_size/replicas/cpus_per_rank"
            )
        from pipeline.engine.worker import RANK_TEST_HOOK_ENV, RankWorker

        actor_cls = ray.remote(RankWorker)
        extra = {}
        if os.environ.get(RANK_TEST_HOOK_ENV):  # a test seam (see there): the ranks run it too
            extra["runtime_env"] = {"env_vars": {RANK_TEST_HOOK_ENV: os.environ[RANK_TEST_HOOK_ENV]}}
        self.workers = [
            actor_cls.options(
                num_cpus=config.cpus_per_rank, num_gpus=1 if self.device_type == "cuda" else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
                max_restarts=0, max_concurrency=1, name=None, **extra,
            ).remote(rank, tp, self.name)
            for rank in range(tp)
        ]
        try:
            addresses = ray.get([w.address.remote() for w in self.workers], timeout=config.startup_timeout_s)
            self.node_id = addresses[0]["node_id"]
            self.master = (addresses[0]["node_ip"], addresses[0]["port"])
            gpus = [g for a in addresses for g in a["gpu_ids"]]
            if self.device_type == "cuda" and len(gpus) != tp:
                raise EngineStartupError(f"replica {self.name}: Ray gave its ranks GPUs {gpus}, expected {tp}")
            infos = ray.get(
                [w.setup.remote(config.to_dict(), self.device_type, *self.master, gpus) for w in self.workers],
                timeout=config.startup_timeout_s,
            )
        except Exception as error:
            self.kill()
            cause = getattr(error, "cause", None)  # a rank's exception, as Ray returns it
            if isinstance(cause, AttentionBackendUnavailable):
                raise AttentionBackendUnavailable(f"replica {self.name} {cause}") from None
            if isinstance(error, EngineStartupError):
                raise
            if _never_started(error):
                raise RankNeverStarted(_ray_reason(error)) from None
            if isinstance(error, ray.exceptions.GetTimeoutError):
                raise EngineStartupError(
                    f"replica {self.name}: loading did not finish within startup_timeout_s={config.startup_timeout_s:g}"
                ) from None
            raise EngineStartupError(f"replica {self.name} failed to start: {short_error(error)}") from error
        self.vocab_size = infos[0]["vocab_size"]
        self.rank_info = infos
        self.rank_load_s = [i["load_s"] for i in infos]
        self.scheduler, self.plan = infos[0]["scheduler"], infos[0]["plan"]
        self.prefill_tokens = infos[0]["prefill_tokens"]
        self.attention = replica_record([i["attention"] for i in infos])
        if not self.attention["ranks_agree"]:
            log.warning("replica %s: %s", self.name, self.attention["fallback"])
        elif self.attention["fallback"]:
            log.warning("replica %s runs attention backend %r: %s", self.name, self.attention["backend"],
                        self.attention["fallback"])
        self.memory_plan = _plan_of(self.plan)
        self.budget = budget_of(self.memory_plan, config.max_batch_size, self.prefill_tokens)
        self.to_drop = []
        self.load_s = time.perf_counter() - begin
        self.alive = True

    def run(self, requests: list[GenerationRequest], on_dispatch=None) -> list[list[GenerationResult]]:
        """Runs one static batch on every rank; -> rank 0's results with metrics reduced over ranks.

        Raises ReplicaDown (a rank died or the batch timed out; the replica is killed),
        ReplicaOutOfMemory (some rank ran out of memory; the replica is killed when a peer is stuck) or
        RankError (a rank raised; the replica is killed when a peer is stuck)."""
        deadline = None if self.config.request_timeout_s is None else time.monotonic() + self.config.request_timeout_s
        answers = self._call_all("run_batch", (requests,), deadline,
                                 lambda: on_dispatch(self.name, [r.request_id for r in requests]) if on_dispatch else None)
        for rank, results in enumerate(answers):  # attributions sum to the rank's busy time
            self.busy_s[rank] += sum(r.device_time_s or 0.0 for rs in results for r in rs)
        return reduce_over_ranks(answers, self.name)

    def step(self, admit: list, time_budget_s: float | None, deadline: float | None,
             on_dispatch=None) -> list[StepResult]:
        """One call of the running batch on every rank (continuous scheduler): admits `admit`
        [(seq, request)], drops `to_drop`, runs steps; -> every rank's StepResult.

        deadline: time.monotonic() by which the call must answer (the oldest request's
        request_timeout_s), else the replica counts as hung. Raises like `run`."""
        drop, self.to_drop = self.to_drop, []
        answers = self._call_all("step", (admit, drop, time_budget_s), deadline,
                                 lambda: on_dispatch(self.name, [r.request_id for _, r in admit])
                                 if on_dispatch and admit else None)
        for rank, answer in enumerate(answers):
            self.busy_s[rank] += answer.report.busy_s
        self.steps += answers[0].steps
        return answers

    def call(self, fn, args: tuple):
        """fn(ctx, *args) on every rank; -> rank 0's value (raises like `run`)."""
        return self._call_all("call", (fn, args), None)[0]

    def _call_all(self, method: str, args: tuple, deadline: float | None, dispatched=None) -> list:
        """Calls `method` on every rank and waits for all; -> their answers in rank order."""
        import ray

        grace = self.config.rank_grace_s
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        self.busy = True
        if dispatched is not None:
            dispatched()
        answers: dict[int, object] = {}
        out_of_memory: dict[int, str] = {}  # rank -> what its allocator said
        reports: dict = {}
        pending = list(refs)
        app_error: BaseException | None = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if app_error is not None or out_of_memory:  # other ranks may be stuck in a collective
                timeout = grace if timeout is None else min(timeout, grace)
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready:
                self.kill()
                stuck = sorted(refs.index(ref) for ref in pending)
                if out_of_memory:
                    raise ReplicaOutOfMemory(_oom_text(out_of_memory), f"rank(s) {stuck} still ran {grace:g} s "
                                       "(rank_grace_s) later, stuck in a collective", reports)
                if app_error is not None:
                    raise RankError(app_error)
                raise ReplicaDown(f"batch exceeded request_timeout_s={self.config.request_timeout_s}")
            for ref in ready:
                rank = refs.index(ref)
                try:
                    answer = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as error:
                    self.kill()
                    if out_of_memory:
                        raise ReplicaOutOfMemory(_oom_text(out_of_memory), f"rank {rank} died: {short_error(error)}",
                                           reports) from None
                    raise ReplicaDown(f"rank {rank} died: {short_error(error)}") from None
                except ray.exceptions.RayTaskError as error:
                    app_error = error
                    continue
                if isinstance(answer, OutOfMemoryAnswer):
                    out_of_memory[rank] = answer.message
                    if answer.report is not None:
                        reports[rank] = answer.report
                        self.busy_s[rank] += answer.report.busy_s
                else:
                    answers[rank] = answer
        self.busy = False
        if out_of_memory:
            for rank, answer in answers.items():  # ranks that got through: their measurements count
                if isinstance(answer, StepResult):
                    reports[rank] = answer.report
                    self.busy_s[rank] += answer.report.busy_s
            lost = None
            if app_error is not None:
                lost = f"another rank raised {short_error(app_error)}"
            elif not self._group_in_step():
                lost = f"the ranks failed an all-reduce check within rank_grace_s={grace:g} s"
            if lost is not None:
                self.kill()
            raise ReplicaOutOfMemory(_oom_text(out_of_memory), lost, reports)
        if app_error is not None:
            raise RankError(app_error)
        return [answers[r] for r in range(len(refs))]

    def _group_in_step(self) -> bool:
        """After every rank answered an out of memory: do the ranks still meet in a collective?"""
        import ray

        try:
            sums = ray.get([w.check_group.remote() for w in self.workers], timeout=self.config.rank_grace_s)
        except Exception as error:  # noqa: BLE001 - any failure means: rebuild
            log.warning("replica %s: group check after out of memory failed: %s", self.name, short_error(error))
            return False
        return all(total == len(self.workers) for total in sums)

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        self.alive = self.busy = False
        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers = []
        if self.master is not None and self.config.tp_size > 1:
            self._cleanup_shm()
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            self.pg = None

    def _cleanup_shm(self) -> None:
        """Backstop for ranks that died before unlinking their /dev/shm file (runs on their node)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        try:
            from pipeline.engine.worker import remove_shm_task

            task = ray.remote(num_cpus=0)(remove_shm_task).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False)
            )
            ray.get(task.remote(*self.master), timeout=60)
        except Exception as error:  # noqa: BLE001 - best effort
            log.warning("replica %s: could not remove /dev/shm files: %s", self.name, short_error(error))


class RankError(Exception):
    """A rank raised (not out of memory, that is a result): the batch gets internal_error results."""


def _oom_text(out_of_memory: dict[int, str]) -> str:
    return "; ".join(f"rank {rank}: {message}" for rank, message in sorted(out_of_memory.items()))


def reduce_over_ranks(per_rank: list[list[list[GenerationResult]]], replica: str) -> list[list[GenerationResult]]:
    """A static batch's results from every rank -> rank 0's, each named after `replica`, with the
    device metrics reduced over ranks (peaks and device time: max; device-seconds: sum)."""
    out = []
    for request_index, results in enumerate(per_rank[0]):
        merged = []
        for suffix_index, result in enumerate(results):
            views = [rank[request_index][suffix_index] for rank in per_rank]
            result = dataclasses.replace(result, replica=replica)
            if result.status == "ok":
                peaks = [v.peak_memory_bytes for v in views]
                result.peak_memory_per_rank = [p for p in peaks if p is not None]
                result.peak_memory_bytes = max(result.peak_memory_per_rank, default=None)
                gpu = [v.gpu_time_s for v in views if v.gpu_time_s is not None]
                result.gpu_time_s = max(gpu) if gpu else None
                device = [v.device_time_s for v in views if v.device_time_s is not None]
                result.device_time_s = max(device) if device else None
                seconds = [v.device_seconds_all_ranks for v in views if v.device_seconds_all_ranks is not None]
                result.device_seconds_all_ranks = sum(seconds) if seconds else None
            merged.append(result)
        out.append(merged)
    return out


def _plan_of(plan: dict | None):
    """The ranks' memory plan, rebuilt on the driver (pure Python)."""
    if plan is None:
        return None
    from pipeline.engine.memory_plan import MemoryPlan, ModelShape, ServingConfig

    return MemoryPlan(ModelShape(**plan["shape"]), ServingConfig(**plan["serving"]))


def reduce_step(answers: list[StepResult], resident: list, ledger, lock) -> list[tuple]:
    """A continuous call's answers from every rank -> [(entry, results)] of the requests whose
    rows have all ended: every rank's measurements go into the ledger (device time and peaks
    per rank), tokens, text and times come from rank 0."""
    with lock:
        for rank, answer in enumerate(answers):
            ledger.add(rank, answer.report)
    by_seq = {entry.seq: entry for entry in resident}
    done = []
    for row in answers[0].finished:
        entry = by_seq.get(row.seq)
        if entry is None:
            log.warning("a row of request seq %d ended but the request is not resident; dropped", row.seq)
            continue
        entry.rows[row.suffix_index] = row
        if len(entry.rows) == len(entry.request.suffix_ids):
            results = [result_of(entry.rows[i]) for i in range(len(entry.rows))]
            with lock:
                metrics = ledger.pop(entry.seq, len(results))
            for result, row_metrics in zip(results, metrics):
                ledger.apply(result, row_metrics)
            done.append((entry, results))
    return done

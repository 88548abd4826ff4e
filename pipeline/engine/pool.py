"""The replica pool: one request queue shared by the replicas, one serving thread per replica,
and the failure policy (retries, rebuilds, out-of-memory splits). See `pipeline.engine`."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from pipeline.config.engine import EngineConfig
from pipeline.engine import replica as replica_calls
from pipeline.engine.attention_record import columns_of, engine_record
from pipeline.engine.errors import EngineError, EngineStartupError, short_error
from pipeline.engine.metering import Ledger
from pipeline.engine.models import locate_model
from pipeline.engine.out_of_memory import out_of_memory_message
from pipeline.engine.replica import RankError, Replica, ReplicaDown, ReplicaOutOfMemory, local_ray_system_config
from pipeline.engine.requests import (
    INTERNAL, INVALID_INPUT, OUT_OF_MEMORY, PROMPT_TOO_LONG, REPLICA_FAILED, WONT_FIT, GenerationRequest,
    GenerationResult,
)
from pipeline.engine.scheduler import Demand, admit, static_batch, wont_fit

log = logging.getLogger("pipeline.engine")

# How often `ReplicaPool.run` checks that a serving thread is still alive while it waits.
_RUN_POLL_S = 1.0
# Continuous scheduler: a call of the running batch returns when a row ends, or after this many
# seconds (then requests that arrived meanwhile are admitted at the next call).
_CALL_BUDGET_S = 1.0


@dataclass
class _Entry:
    request: GenerationRequest
    future: concurrent.futures.Future
    attempts: int = 0
    # Set when the request was in a batch that ran out of memory: it now runs alone.
    solo: bool = False
    # Pool-wide number (the ranks and the ledger know requests by it; ids may repeat).
    seq: int = -1
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    preemptions: int = 0
    # Continuous scheduler: the rows that ended in this attempt (suffix index -> FinishedRow).
    rows: dict = field(default_factory=dict)

    @property
    def alone(self) -> bool:
        return self.solo or len(self.request.suffix_ids) > 1



class ReplicaPool:
    """Replicas of one model behind one request queue. See the module docstring."""

    def __init__(self, config: EngineConfig):
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.config = config
        self._replicas: list[Replica] = []
        self._queue: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._started = False
        self._vocab_size: int | None = None
        self._device_type: str | None = None
        # Called as f(replica_name, request_ids) when a batch reaches a replica's ranks (tests).
        self._on_dispatch = None
        # The batch each serving thread holds (by replica name), to fail it if the thread dies.
        self._running: dict[str, list[_Entry]] = {}
        # Serving threads not yet ended; at 0 nothing answers, and (error type, why) says why.
        self._live_servers = 0
        self._no_server: tuple[str, str] | None = None
        self._seq = itertools.count()
        # Replicas lent to call_ranks: their serving threads wait.
        self._borrowed: set[str] = set()
        # Device time and peaks per request (continuous scheduler), summed over calls and ranks.
        self._ledger = Ledger(config.tp_size)
        self._ledger_lock = threading.Lock()
        # The memory plan of the replicas (their first one's), for wont_fit answers at submit.
        self._plan = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ReplicaPool:
        import ray

        config = self.config
        try:
            locate_model(config.model_spec.model)  # fails fast, before any actor starts
        except FileNotFoundError as error:
            raise EngineStartupError(f"cannot start the engine: {error}") from None
        if not ray.is_initialized():
            # None means a private local cluster: ray.init(None) would join whatever RAY_ADDRESS or
            # the last `ray start` on this machine points to.
            if config.ray_address is None:
                ray.init(address="local", _system_config=local_ray_system_config())
            else:
                ray.init(address=config.ray_address)
        self._device_type = self._check_resources()
        names = [f"replica-{i}" for i in range(config.replicas)]
        self._replicas = [Replica(name, config, self._device_type) for name in names]
        errors = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(self._replicas)) as pool:
            for replica, future in [(r, pool.submit(r.start)) for r in self._replicas]:
                try:
                    future.result()
                except Exception as error:  # noqa: BLE001 - reported together below
                    errors.append(error)
        if errors:
            self.shutdown()
            raise errors[0] if isinstance(errors[0], EngineStartupError) else EngineStartupError(short_error(errors[0]))
        self._vocab_size = self._replicas[0].vocab_size
        self._plan = self._replicas[0].memory_plan
        self._started = True
        self._live_servers, self._no_server = len(self._replicas), None
        for replica in self._replicas:
            thread = threading.Thread(target=self._serve, args=(replica,), name=f"engine-{replica.name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _check_resources(self) -> str:
        import ray

        config, tp = self.config, self.config.tp_size
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        gpus = [n["Resources"].get("GPU", 0) for n in nodes]
        device = config.device
        if device == "auto":
            device = "cuda" if sum(gpus) > 0 else "cpu"
        cpus = [n["Resources"].get("CPU", 0) for n in nodes]
        need_cpu = tp * config.cpus_per_rank
        if max(cpus, default=0) < need_cpu:
            raise EngineStartupError(
                f"tp_size={tp} x cpus_per_rank={config.cpus_per_rank} needs {need_cpu} CPUs on one node "
                f"(the ranks of a replica are packed on one node); the largest node has {max(cpus, default=0):g}"
            )
        if device == "cuda":
            if max(gpus, default=0) < tp:
                raise EngineStartupError(
                    f"tp_size={tp} needs {tp} GPUs on one node; the Ray cluster's largest node has "
                    f"{max(gpus, default=0):g} GPU(s). Lower tp_size or use device='cpu'"
                )
            if sum(g // tp for g in gpus) < config.replicas:
                raise EngineStartupError(
                    f"{config.replicas} replicas x tp_size={tp} need {config.replicas * tp} GPUs in groups of {tp} "
                    f"per node; the cluster has {sum(gpus):g} GPUs ({', '.join(f'{g:g}' for g in gpus)} per node)"
                )
        elif sum(c // need_cpu for c in cpus) < config.replicas:
            raise EngineStartupError(
                f"{config.replicas} replicas x {need_cpu} CPUs do not fit the Ray cluster's CPUs per node "
                f"({', '.join(f'{c:g}' for c in cpus)}); lower replicas, tp_size or cpus_per_rank"
            )
        return device

    def shutdown(self) -> None:
        """Stops serving, fails requests still waiting, kills the actors, removes /dev/shm files."""
        with self._cond:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for entry in waiting:
            self._fail(entry, INTERNAL, "the engine was shut down before this request ran")
        for thread in self._threads:
            thread.join(timeout=5)
        for replica in self._replicas:
            replica.kill()
        with self._cond:  # batches of threads that did not end in time (killed under them now)
            running = [entry for batch in self._running.values() for entry in batch]
        for entry in running:
            self._fail(entry, INTERNAL, "the engine was shut down while this request ran")
        self._threads = []
        self._started = False

    def __enter__(self) -> ReplicaPool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- requests ------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        """Queues a request; the future resolves to its results (one per suffix), never raises."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        entry = _Entry(request, future, seq=next(self._seq))
        problem = self._validate(request)
        if problem is not None:
            self._fail(entry, *problem)
            return future
        with self._cond:
            if not self._started or self._stopping:
                raise RuntimeError("the pool is not running: call start() first")
            if self._live_servers == 0 and self._no_server is not None:
                dead = self._no_server
            elif not self._any_replica_left():
                dead = (REPLICA_FAILED, "no replica is left: " + self._dead_reason())
            else:
                dead = None
                self._queue.append(entry)
                self._cond.notify_all()
        if dead is not None:
            self._fail(entry, *dead)
        return future

    def run(self, requests: Iterable[GenerationRequest | None],
            max_in_flight: int = 16) -> Iterator[list[GenerationResult]]:
        """Submits lazily (at most max_in_flight waiting or running) and yields results as they complete.

        `requests` may yield None: nothing to submit until a result has come back (the next call of
        a document answered in sections depends on the results of its earlier calls); it is asked
        again after the next result. A None while nothing is in flight could never be followed by
        a request: RuntimeError."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        done: queue.Queue = queue.Queue()
        in_flight = 0
        source = iter(requests)
        exhausted = False
        while True:
            while not exhausted and in_flight < max_in_flight:
                try:
                    request = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if request is None:
                    if in_flight == 0:
                        raise RuntimeError("the request source waits for a result while no request is in flight")
                    break
                self.submit(request).add_done_callback(done.put)
                in_flight += 1
            if in_flight == 0:
                return
            yield self._next_done(done, in_flight).result()
            in_flight -= 1

    def _next_done(self, done: queue.Queue, in_flight: int) -> concurrent.futures.Future:
        """The next resolved future; EngineError when none can come (no serving thread alive)."""
        while True:
            try:
                return done.get(timeout=_RUN_POLL_S)
            except queue.Empty:
                pass
            if any(thread.is_alive() for thread in self._threads):
                continue
            try:  # a thread may have resolved the last futures just before it ended
                return done.get_nowait()
            except queue.Empty:
                pass
            why = self._no_server[1] if self._no_server is not None else "the pool was shut down or never served"
            raise EngineError(
                f"{in_flight} request(s) are in flight but no serving thread is alive ({why}), so their "
                f"results will never come; replicas: {self._replica_summary()}. Start a new pool"
            )

    def call_ranks(self, fn, *args, replica: int = 0):
        """Runs fn(ctx, *args) on every rank of one replica and returns rank 0's value: model work
        that is not generation (the evaluation harness's perplexity on tensor-parallel shards).
        `fn` must be importable by the actors (a module-level function) and run the same
        collectives on every rank. Waits until the replica's running batch is empty and keeps
        it from taking requests meanwhile. Raises EngineError when the replica fails."""
        handle = self._replicas[replica]
        with self._cond:
            while self._running.get(handle.name) or handle.name in self._borrowed:
                self._cond.wait()
            self._borrowed.add(handle.name)
        try:
            return handle.call(fn, args)
        except (ReplicaDown, ReplicaOutOfMemory, RankError) as error:
            raise EngineError(f"{handle.name}: {fn.__name__} failed on its ranks: {error}") from None
        finally:
            with self._cond:
                self._borrowed.discard(handle.name)
                self._cond.notify_all()

    def _replica_summary(self) -> str:
        return ", ".join(f"{r.name} alive={r.alive} last_error={r.last_error}" for r in self._replicas) or "none"

    def stats(self) -> dict:
        """Per replica: load_s, served (requests answered), failures (batches lost to a dead or
        stuck rank), restarts, alive, tp_size, device, scheduler, busy_s_per_rank (device busy
        seconds of every forward, pipeline.engine.metering), steps (packed forwards of the
        running batch), prefill_tokens (prompt tokens per step), kv_budget_bytes (the KV bytes
        per rank the running batch may hold at its longest allowed request, None without a
        limit), last_error, attention (pipeline.engine.attention_record.replica_record) with its
        output columns attention_backend and attention_backend_fallback, and
        planned_attention_backend (what the ranks' memory plan is for: the backend that ran)."""
        out = {}
        for r in self._replicas:
            budget = r.budget
            kv = None
            if budget is not None and budget.kv_bytes is not None:
                kv = int(budget.kv_bytes(self.config.max_input_tokens))
            out[r.name] = {
                "load_s": r.load_s, "served": r.served, "failures": r.failures, "restarts": r.restarts,
                "alive": r.alive, "tp_size": self.config.tp_size, "device": r.device_type,
                "scheduler": r.scheduler, "busy_s_per_rank": [round(b, 6) for b in r.busy_s], "steps": r.steps,
                "prefill_tokens": r.prefill_tokens, "kv_budget_bytes": kv, "last_error": r.last_error,
                "attention": r.attention, **columns_of(r.attention),
                "planned_attention_backend": ((r.plan or {}).get("serving") or {}).get("attention_backend"),
            }
        return out

    def attention(self) -> dict:
        """The engine's attention backend (pipeline.engine.attention_record.engine_record): one
        backend and fallback when every replica that started runs the same, else per replica.
        Known from start(), never read from a device after it."""
        return engine_record({r.name: r.attention for r in self._replicas})

    @staticmethod
    def _stamp(replica: Replica, results: list[GenerationResult]) -> None:
        """Answered by `replica`: its attention backend goes into each result (its output row)."""
        columns = columns_of(replica.attention)
        for result in results:
            result.attention_backend = columns["attention_backend"]
            result.attention_backend_fallback = columns["attention_backend_fallback"]

    def _validate(self, request: GenerationRequest):
        if not isinstance(request, GenerationRequest):
            return INVALID_INPUT, f"expected a GenerationRequest, got {type(request).__name__}"
        if not request.suffix_ids:
            return INVALID_INPUT, f"request {request.request_id}: suffix_ids is empty (use [[]] to generate after the prefix)"
        if any(not request.prefix_ids and not s for s in request.suffix_ids):
            return INVALID_INPUT, f"request {request.request_id}: a prompt is empty (prefix and suffix both empty)"
        if request.sampling.max_new_tokens < 1:
            return INVALID_INPUT, f"request {request.request_id}: max_new_tokens must be >= 1"
        if request.prompt_tokens > self.config.max_input_tokens:
            return PROMPT_TOO_LONG, (
                f"request {request.request_id}: prompt of {request.prompt_tokens} tokens is longer than "
                f"max_input_tokens={self.config.max_input_tokens}; truncate it or raise the limit"
            )
        refusal = wont_fit(self._plan, request)
        if refusal is not None:
            return WONT_FIT, f"request {request.request_id}: {refusal}"
        vocab = self._vocab_size
        if vocab is not None:
            for ids in (request.prefix_ids, *request.suffix_ids):
                bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
                if bad:
                    return INVALID_INPUT, f"request {request.request_id}: token ids {bad[:5]} outside the vocabulary [0, {vocab})"
        return None

    def _fail(self, entry: _Entry, error_type: str, message: str) -> None:
        results = GenerationResult.errors_for(entry.request, error_type, message, attempts=max(1, entry.attempts),
                                              preemptions=entry.preemptions)
        if entry.attempts:  # the device time it used still counts (continuous scheduler's ledger)
            with self._ledger_lock:
                rows = self._ledger.pop(entry.seq, len(results))
            if any(any(row.seconds) for row in rows):
                for result, row in zip(results, rows):
                    self._ledger.apply(result, row)
        self._resolve(entry, results)

    @staticmethod
    def _resolve(entry: _Entry, results: list[GenerationResult]) -> None:
        """Answers a request once; a second answer (a race with shutdown) is dropped."""
        try:
            entry.future.set_result(results)
        except concurrent.futures.InvalidStateError:
            pass

    # -- serving -------------------------------------------------------------------------------

    def _next_batch(self, replica: Replica) -> list[_Entry]:
        """Under the lock: the requests `replica` takes now (removed from the queue). Static: the
        next batch. Continuous: the waiting requests that join its running batch (maybe none)."""
        waiting = list(self._queue)
        if replica.scheduler == "continuous":
            resident = self._running.get(replica.name, [])
            chosen = admit([(Demand.of(e.request), e.solo) for e in waiting],
                           [Demand.of(e.request) for e in resident], replica.budget,
                           resident_solo=any(e.solo for e in resident))
        else:
            chosen = static_batch([(e.request.prompt_tokens, e.alone) for e in waiting],
                                  self.config.max_batch_tokens, self.config.max_batch_size)
        entries = [waiting[i] for i in chosen]
        for entry in entries:
            self._queue.remove(entry)
        return entries

    def _serve(self, replica: Replica) -> None:
        """A serving thread: one replica's loop. Whatever happens, it leaves no request unanswered."""
        died = None
        try:
            while self._serve_one(replica):
                pass
        except BaseException as error:  # noqa: BLE001 - a bug in the loop: answer, then end
            died = f"{replica.name}'s serving thread died: {short_error(error)}"
            log.error("%s", died, exc_info=error)
        finally:
            self._serving_ended(replica, died)

    def _serve_one(self, replica: Replica) -> bool:
        """Static: takes one batch and answers it. Continuous: admits what fits and runs one call
        of the running batch. False: this thread ends (stopping, or replica given up)."""
        continuous = replica.scheduler == "continuous"
        with self._cond:
            while not self._stopping and (replica.name in self._borrowed
                                          or (not self._queue and not self._running.get(replica.name))):
                self._cond.wait()
            if self._stopping:
                return False
            taken = self._next_batch(replica)
            if continuous:  # the running batch: the requests resident on the replica's ranks
                batch = self._running.setdefault(replica.name, [])
                batch.extend(taken)
            else:
                batch = self._running[replica.name] = taken
            if not batch:  # nothing to run (cannot happen: an empty batch admits the first request)
                return True
        try:
            if continuous:
                keep = self._run_step(replica, taken)
            else:
                keep = self._run_batch(replica, batch)
        except Exception as error:  # noqa: BLE001 - a bug in the engine: the batch gets internal_error
            crashed = list(batch)
            batch.clear()
            keep = self._batch_crashed(replica, crashed, error)
        leftovers = []
        with self._cond:
            if not continuous:
                self._running.pop(replica.name, None)
            elif not keep:
                leftovers = self._running.pop(replica.name, [])
        for entry in leftovers:  # nothing serves this replica any more (normally none are left)
            self._fail(entry, INTERNAL, f"{replica.name} stopped serving while this request ran")
        return keep

    def _run_step(self, replica: Replica, admitted: list[_Entry]) -> bool:
        """One call of `replica`'s running batch (continuous scheduler): admits `admitted`, then
        answers the requests whose rows all ended."""
        resident = self._running[replica.name]
        now = time.monotonic()
        for entry in admitted:
            entry.attempts += 1
            entry.admitted = now
            entry.rows = {}
        timeout = self.config.request_timeout_s
        deadline = None if timeout is None else min(e.admitted for e in resident) + timeout
        try:
            answers = replica.step([(e.seq, e.request) for e in admitted], _CALL_BUDGET_S, deadline,
                                   self._on_dispatch)
        except ReplicaDown as error:
            entries = list(resident)
            resident.clear()
            if self._stopping:  # shutdown() killed the actors under this batch
                for entry in entries:
                    self._fail(entry, INTERNAL, "the engine was shut down while this request ran")
                return False
            replica.failures += 1
            replica.last_error = str(error)
            log.warning("%s went down (%s); %d request(s) go back to the queue", replica.name, error, len(entries))
            self._requeue(entries, f"{replica.name}: {error}")
            return self._rebuild(replica)
        except ReplicaOutOfMemory as error:
            self._add_reports(error.reports)
            entries = list(resident)
            resident.clear()
            if error.lost is None:
                replica.to_drop = [e.seq for e in entries]
            if len(entries) > 1:
                for entry in entries:
                    entry.preemptions += 1
            self._out_of_memory(replica, entries, error)
            return replica.alive or self._rebuild(replica)
        except RankError as error:
            entries = list(resident)
            resident.clear()
            replica.failures += 1
            replica.last_error = short_error(error.args[0])
            if replica.alive:
                replica.to_drop = [e.seq for e in entries]
            for entry in entries:
                self._fail(entry, INTERNAL, f"{replica.name} raised: {replica.last_error}")
            return replica.alive or self._rebuild(replica)
        # Through the module: tests inject a failure there (tests/pipeline/test_engine_faults.py).
        for entry, results in replica_calls.reduce_step(answers, resident, self._ledger, self._ledger_lock):
            for result in results:
                result.replica, result.attempts = replica.name, entry.attempts
                result.queued_s, result.preemptions = entry.admitted - entry.submitted, entry.preemptions
            self._stamp(replica, results)
            replica.served += 1
            resident.remove(entry)
            self._resolve(entry, results)
        return True

    def _add_reports(self, reports: dict) -> None:
        with self._ledger_lock:
            for rank, report in reports.items():
                self._ledger.add(rank, report)

    def _run_batch(self, replica: Replica, batch: list[_Entry]) -> bool:
        for entry in batch:
            entry.attempts += 1
        try:
            results = replica.run([e.request for e in batch], self._on_dispatch)
        except ReplicaDown as error:
            if self._stopping:  # shutdown() killed the actors under this batch
                for entry in batch:
                    self._fail(entry, INTERNAL, "the engine was shut down while this request ran")
                return False
            replica.failures += 1
            replica.last_error = str(error)
            log.warning("%s went down (%s); %d request(s) go back to the queue", replica.name, error, len(batch))
            self._requeue(batch, f"{replica.name}: {error}")
            return self._rebuild(replica)
        except ReplicaOutOfMemory as error:
            self._out_of_memory(replica, batch, error)
            return replica.alive or self._rebuild(replica)
        except RankError as error:
            replica.failures += 1
            replica.last_error = short_error(error.args[0])
            for entry in batch:
                self._fail(entry, INTERNAL, f"{replica.name} raised: {replica.last_error}")
            return replica.alive or self._rebuild(replica)
        for entry, result in zip(batch, results, strict=True):
            for r in result:
                r.attempts = entry.attempts
            self._stamp(replica, result)
            replica.served += 1
            self._resolve(entry, result)
        return True

    def _out_of_memory(self, replica: Replica, batch: list[_Entry], error: ReplicaOutOfMemory) -> None:
        """Some rank ran out of memory: a batch is split (each request alone, at the front of the
        queue); a request that ran alone gets out_of_memory results."""
        replica.last_error = f"out of memory: {error.message}"
        if error.lost is not None:
            replica.failures += 1
            replica.last_error += f"; replica killed: {error.lost}"
        log.warning("%s: %s (batch of %d)", replica.name, replica.last_error, len(batch))
        if len(batch) > 1:
            for entry in batch:
                entry.solo = True
            self._push_front(batch)
            return
        (entry,) = batch
        request = entry.request
        rebuilt = f"; the replica was rebuilt ({error.lost})" if error.lost is not None else ""
        self._fail(entry, OUT_OF_MEMORY, f"request {request.request_id}: " + out_of_memory_message(
            request, f"{replica.name} (tp_size={self.config.tp_size}, running alone)", f": {error.message}{rebuilt}"))

    def _batch_crashed(self, replica: Replica, batch: list[_Entry], error: Exception) -> bool:
        """An unexpected exception while running a batch: it gets internal_error results; a
        replica whose ranks may still be running it is rebuilt."""
        replica.failures += 1
        replica.last_error = f"engine error: {short_error(error)}"
        log.error("%s: the engine failed on a batch of %d: %s", replica.name, len(batch), short_error(error),
                  exc_info=error)
        for entry in batch:
            self._fail(entry, INTERNAL, f"{replica.name}: the engine failed while running request "
                                        f"{entry.request.request_id}: {short_error(error)}")
        if self._stopping:
            return False
        if replica.busy or not replica.alive:
            replica.kill()
            return self._rebuild(replica)
        replica.to_drop.extend(e.seq for e in batch)  # continuous: the ranks still hold them
        return True

    def _serving_ended(self, replica: Replica, died: str | None) -> None:
        """A serving thread ends: its batch, and when it was the last one the queue, get answers."""
        if died is not None:
            replica.last_error = died
            try:
                replica.kill()  # nothing serves it any more
            except Exception as error:  # noqa: BLE001
                log.warning("%s: kill failed: %s", replica.name, short_error(error))
            replica.restarts = self.config.max_restarts + 1  # given up
        with self._cond:
            running = self._running.pop(replica.name, [])
            self._live_servers -= 1
            orphans = []
            if self._live_servers <= 0:
                if self._stopping:
                    self._no_server = (INTERNAL, "the engine was shut down")
                elif died is not None:
                    self._no_server = (INTERNAL, f"no serving thread is left: {died}")
                else:
                    self._no_server = (REPLICA_FAILED, "no replica is left: " + self._dead_reason())
                orphans = list(self._queue)
                self._queue.clear()
        for entry in running:
            self._fail(entry, INTERNAL, died or "the engine stopped while this request ran")
        for entry in orphans:
            self._fail(entry, *self._no_server)

    def _requeue(self, batch: list[_Entry], reason: str) -> None:
        retry = []
        for entry in batch:
            if entry.attempts > self.config.request_retries:
                self._fail(entry, REPLICA_FAILED,
                           f"request {entry.request.request_id} failed {entry.attempts} time(s), last: {reason}; "
                           f"request_retries={self.config.request_retries} exhausted")
            else:
                retry.append(entry)
        self._push_front(retry)

    def _push_front(self, entries: list[_Entry]) -> None:
        """Back to the front of the queue, in their order (failed instead when shutting down)."""
        with self._cond:
            if not self._stopping:
                self._queue.extendleft(reversed(entries))
                self._cond.notify_all()
                return
        for entry in entries:
            self._fail(entry, INTERNAL, "the engine was shut down before this request ran")

    def _rebuild(self, replica: Replica) -> bool:
        """Restarts a replica within max_restarts. False: it is given up (and maybe the pool)."""
        while replica.restarts < self.config.max_restarts and not self._stopping:
            replica.restarts += 1
            try:
                replica.start()
                log.warning("%s rebuilt (restart %d)", replica.name, replica.restarts)
                return True
            except Exception as error:  # noqa: BLE001
                replica.last_error = f"rebuild {replica.restarts} failed: {short_error(error)}"
                log.warning("%s: %s", replica.name, replica.last_error)
        replica.restarts = self.config.max_restarts + 1  # marks it given up
        if not self._any_replica_left():
            with self._cond:
                waiting = list(self._queue)
                self._queue.clear()
            for entry in waiting:
                self._fail(entry, REPLICA_FAILED, "no replica is left: " + self._dead_reason())
        return False

    def _any_replica_left(self) -> bool:
        """True while some replica serves or is being rebuilt."""
        return any(r.alive or r.restarts <= self.config.max_restarts for r in self._replicas)

    def _dead_reason(self) -> str:
        return "; ".join(
            f"{r.name} gave up after {self.config.max_restarts} restart(s), last error: {r.last_error}"
            for r in self._replicas
        )


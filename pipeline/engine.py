"""The engine: replicas of one model, each a group of Ray actors sharded with DeepSpeed AutoTP.

Public API (what the data plane calls)::

    from pipeline.engine import EngineConfig, ReplicaPool
    from pipeline.models import ModelSpec
    from pipeline.requests import GenerationRequest, SamplingParams

    config = EngineConfig(model_spec=ModelSpec(model="smollm2"), tp_size=2, replicas=2)
    with ReplicaPool(config) as pool:            # start() on enter, shutdown() on exit
        future = pool.submit(request)            # concurrent.futures.Future -> list[GenerationResult]
        results = future.result()                # one result per suffix, suffix_index order
        for results in pool.run(requests, max_in_flight=16):
            ...                                  # one list per request, in completion order
        pool.stats()                             # {replica name: {load_s, served, failures, restarts, ...}}

- `EngineConfig`: frozen, keyword-only; `EngineConfig.from_file(path)` reads JSON.
- `ReplicaPool.start()` validates everything it can before starting any actor (Ray resources on
  one node for tp_size ranks, the model path) and raises `EngineStartupError` with what is
  missing instead of hanging; waiting for free resources is bounded by `placement_timeout_s`,
  model loading by `startup_timeout_s`.
  If Ray is not initialised it calls `ray.init(address=config.ray_address)` (None: a local
  cluster; "auto": the cluster of `ray start` / `ray job submit`); an initialised Ray is used as is.
- `submit` / `run` never raise for a bad request: it comes back as error results
  (`pipeline.requests` error types: prompt_too_long above `max_input_tokens`, invalid_input,
  out_of_memory, replica_failed, internal_error). Every request gets exactly one list of results.
- `shutdown()` kills the actors, removes the placement groups and DeepSpeed's /dev/shm files.

How a replica works: `tp_size` actors in one STRICT_PACK placement group (one bundle of
`cpus_per_rank` CPUs, plus one GPU on CUDA, per rank). Rank 0 picks a free port on its node;
every rank sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE (without it DeepSpeed's CPU shared-memory
all-reduce crashes), MASTER_ADDR/PORT and CUDA_VISIBLE_DEVICES (the group's GPUs, in rank order,
so LOCAL_RANK selects the rank's own GPU and NCCL sees its peers), then joins a torch.distributed
group (nccl on CUDA, gloo on CPU), loads the model on CPU (`load_model_for_tp`) and calls
`deepspeed.init_inference` with AutoTP and kernel injection off (the DCA attention stays).
With tp_size 1 there is no torch.distributed and no DeepSpeed at all. Every batch goes to every
rank; rank 0 chooses tokens and broadcasts them, and its results are returned with metrics
reduced over ranks (max of GPU time and peak memory, per-rank peaks, device-seconds summed).

Scheduling inside a replica: requests wait in one queue shared by the replicas. A replica takes
the oldest request and adds later single-suffix requests while the left-padded batch stays within
`max_batch_tokens` (padded prompt tokens) and `max_batch_size` rows; a request whose prompt alone
fills the budget, and every request with several suffixes, runs alone.

Failures (no hang, ever: every request gets its one list of results, or `run` raises
`EngineError`):

- A rank that dies (or a batch that runs past `request_timeout_s`, one hour by default) takes the
  whole replica down: its actors are killed, its batch goes back to the front of the queue
  (another replica or the rebuilt one runs it; results only ever come from a completed batch, so
  nothing is lost or returned twice) and the replica is rebuilt, at most `max_restarts` times. A
  request is retried at most `request_retries` times, then gets a `replica_failed` result; when no
  replica is left, every waiting request gets one.
- Out of memory with tp_size 1: the rank frees the batch and retries it one request at a time; a
  request that still does not fit gets an `out_of_memory` result (`pipeline.generation`).
- Out of memory with tp_size > 1: no rank retries on its own (its peers may be waiting for it in
  a collective). The rank frees what it can and answers "out of memory"; the pool decides. If
  every rank answered (all out of memory, or some with results) the group is checked with one
  all-reduce and kept; if some rank is still running `rank_grace_s` after the first answer, it is
  stuck in a collective: the replica is killed and rebuilt. Either way a batch of several requests
  is split: each request goes back to the front of the queue to run alone (this does not count
  as a retry); a request that ran alone gets `out_of_memory` results.
- A rank that raises anything else: the batch gets `internal_error` results (the replica is
  killed and rebuilt if a peer is still running after `rank_grace_s`).
- An unexpected exception in the serving loop itself (a bug): the batch gets `internal_error`
  results naming it; the replica is killed and rebuilt if its ranks may still be running the
  batch, and serving goes on. A serving thread that dies anyway fails the batch it held and, when
  it was the last one, every waiting request (`internal_error`); `submit` then answers at once.
- `run` waits for results by polling: when requests are in flight and no serving thread is alive
  it raises `EngineError` instead of blocking forever.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from pipeline.config_files import reject_unknown_fields
from pipeline.models import ModelSpec
from pipeline.requests import (
    INTERNAL,
    INVALID_INPUT,
    OUT_OF_MEMORY,
    PROMPT_TOO_LONG,
    REPLICA_FAILED,
    GenerationRequest,
    GenerationResult,
)

log = logging.getLogger(__name__)

_DEVICES = ("auto", "cpu", "cuda")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def _memory_plan(config: EngineConfig, model, device, world_size: int):
    """The planner every request is checked against on this rank (None on CPU unless asked)."""
    memory = config.device_memory_bytes
    if memory is None and device.type == "cuda":
        import torch

        memory = torch.cuda.get_device_properties(device).total_memory
    if memory is None:
        return None
    from dca import dca_config_of
    from dca.kernels import flash_available
    from pipeline.memory_plan import MemoryPlan, ModelShape, ServingConfig

    dca = dca_config_of(model)
    dtype = str(model.dtype).removeprefix("torch.")
    serving = ServingConfig(
        tp_size=world_size, weight_dtype=dtype, kv_dtype=config.kv_cache_dtype,
        prefill_block=config.prefill_block, logits="last",
        attention_backend="flash" if device.type == "cuda" and flash_available() else "torch",
        chunk_len=dca.chunk_len if dca is not None else None, device=device.type, device_memory=memory,
    )
    return MemoryPlan(ModelShape.from_config(model.config), serving)


class EngineError(RuntimeError):
    """The engine cannot answer: the message says what happened."""


class EngineStartupError(EngineError):
    """The pool cannot start: the message says what is missing."""


# How often `ReplicaPool.run` checks that a serving thread is still alive while it waits.
_RUN_POLL_S = 1.0


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How many replicas of which model, how each is sharded, and the limits it enforces."""

    model_spec: ModelSpec
    # Ranks (GPUs, or CPU processes) per replica; 1 runs without torch.distributed/DeepSpeed.
    tp_size: int = 1
    # Independent copies of the model; requests are spread over them.
    replicas: int = 1
    # Longest prompt (prefix + longest suffix) accepted; longer ones get a prompt_too_long result.
    max_input_tokens: int = 32768
    # Padded prompt tokens (rows x longest prompt) of one batch; a longer prompt runs alone.
    max_batch_tokens: int = 8192
    # Rows of one batch.
    max_batch_size: int = 8
    # Times one replica is rebuilt after losing a rank, before it is given up.
    max_restarts: int = 2
    # Times one request is re-run after the replica running it failed.
    request_retries: int = 2
    # "auto": cuda when the Ray cluster has GPUs, else cpu.
    device: str = "auto"
    # CPUs reserved (and torch threads used) per rank.
    cpus_per_rank: int = 1
    # Seconds to wait for the cluster to have a replica's resources free (they may exist but be
    # held by other actors); then start() fails saying what is missing.
    placement_timeout_s: float = 120.0
    # Model loading of one replica (after placement) must finish within this.
    startup_timeout_s: float = 900.0
    # A batch running longer than this counts as a hung replica: it is killed and rebuilt, and
    # the batch retried (None: no limit; then only a dead rank ends a stuck batch). One hour is
    # far above any legitimate batch at the defaults (max_input_tokens 32k, max_batch_tokens 8k):
    # on GPU a 100k-token request of a 70B model takes minutes; on 2 CPU cores SmolLM2-135M
    # prefills 16k tokens in about 100 s, and a 2k-token prompt plus 48 new tokens took up to
    # 5.5 minutes on loaded cores (README). Each timeout costs a rebuild (max_restarts), so a
    # limit close to real batch times would take healthy replicas down; raise it for slower setups.
    request_timeout_s: float | None = 3600.0
    # How long the other ranks may still run after one rank answered with an error before the
    # replica is considered stuck in a collective and rebuilt.
    rank_grace_s: float = 60.0
    # Used only when Ray is not initialised: None starts a local cluster, "auto" joins `ray start`.
    ray_address: str | None = None
    # KV cache storage: "auto" (the model dtype) or "int8" (dca.kv_quant.Int8KVCache: per-token,
    # per-head scales, about half of bf16). docs/memory.md measures its cost.
    kv_cache_dtype: str = "auto"
    # Prompt tokens per prefill forward: None = one shot, "chunk" = one DCA chunk (activation
    # memory then depends on the block, not the prompt), or a number of tokens.
    prefill_block: int | str | None = None
    # Device memory per rank the memory planner (pipeline/memory_plan.py) checks every request
    # against before running it: None = the GPU's total memory on CUDA, no check on CPU.
    device_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_spec, ModelSpec):
            raise TypeError(f"model_spec must be a ModelSpec, got {type(self.model_spec).__name__}")
        for name in ("tp_size", "replicas", "max_input_tokens", "max_batch_tokens", "max_batch_size", "cpus_per_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("max_restarts", "request_retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES}, got {self.device!r}")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'int8', got {self.kv_cache_dtype!r}")
        block = self.prefill_block
        if not (block is None or block == "chunk" or (isinstance(block, int) and not isinstance(block, bool) and block >= 1)):
            raise ValueError(f"prefill_block must be None, 'chunk' or an int >= 1, got {block!r}")
        if self.device_memory_bytes is not None and (
            isinstance(self.device_memory_bytes, bool) or not isinstance(self.device_memory_bytes, int)
            or self.device_memory_bytes < 1
        ):
            raise ValueError(f"device_memory_bytes must be None or an int >= 1, got {self.device_memory_bytes!r}")
        if not self.startup_timeout_s > 0 or not self.rank_grace_s > 0 or not self.placement_timeout_s > 0:
            raise ValueError("placement_timeout_s, startup_timeout_s and rank_grace_s must be > 0")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 or None, got {self.request_timeout_s!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> EngineConfig:
        values = dict(values)
        reject_unknown_fields(cls, values)
        spec = values.pop("model_spec", {})
        return cls(model_spec=spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec), **values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> EngineConfig:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        return cls.from_dict(values.get("engine", values))


# ---------------------------------------------------------------------------------------------
# One rank: a Ray actor holding one shard of the model (torch & co. imported here only)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _shm_paths(master_addr: str, master_port: int) -> list[str]:
    import glob

    return glob.glob(f"/dev/shm/{SHM_PREFIX}_{os.getuid()}_{master_addr}_{master_port}_*")


def _remove_shm_files(master_addr: str, master_port: int) -> int:
    removed = 0
    for path in _shm_paths(master_addr, master_port):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


class RankWorker:
    """Rank `rank` of one replica. Wrapped with `ray.remote` by the pool."""

    def __init__(self, rank: int, world_size: int, replica: str):
        self.rank, self.world_size, self.replica = rank, world_size, replica
        self.ctx = None

    def address(self) -> dict:
        import ray

        return {
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "port": _free_port() if self.rank == 0 else None,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "pid": os.getpid(),
        }

    def setup(self, config: dict, device_type: str, master_addr: str, master_port: int, group_gpus: list[str]) -> dict:
        start = time.perf_counter()
        env = {
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.rank),
            "LOCAL_SIZE": str(self.world_size), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
            # DeepSpeed JIT-compiles its CPU all-reduce with ninja, found through PATH.
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        }
        if device_type == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(group_gpus)
        else:
            env["DS_ACCELERATOR"] = "cpu"
        os.environ.update(env)  # before torch / deepspeed are imported in this process

        from datetime import timedelta

        import torch

        from pipeline.generation import RankContext
        from pipeline.models import load_model, load_model_for_tp, load_tokenizer

        config = EngineConfig.from_dict(config)
        spec = config.model_spec
        torch.set_num_threads(config.cpus_per_rank)
        device = torch.device("cuda", self.rank) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(device)

        sync = None
        if self.world_size > 1:
            import deepspeed
            import torch.distributed as dist

            deepspeed.init_distributed(
                dist_backend="nccl" if device_type == "cuda" else "gloo", auto_mpi_discovery=False,
                timeout=timedelta(seconds=max(600, int(config.request_timeout_s or 0))),
            )
            model = load_model_for_tp(spec, device_type)
            engine = deepspeed.init_inference(
                model, tensor_parallel={"tp_size": self.world_size}, dtype=model.dtype,
                replace_with_kernel_inject=False,
            )
            model = engine.module

            def sync(tensor):
                dist.broadcast(tensor, src=0)
                return tensor
        else:
            model = load_model(spec, str(device))
        model.eval()

        tokenizer, eos, pad = None, set(), 0
        if self.rank == 0:
            tokenizer = load_tokenizer(spec)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for source in (getattr(tokenizer, "eos_token_id", None), model.generation_config.eos_token_id,
                       model.config.eos_token_id):
            eos.update(source if isinstance(source, (list, tuple)) else [source] if source is not None else [])
        self.ctx = RankContext(model=model, device=device, rank=self.rank, world_size=self.world_size,
                               tokenizer=tokenizer, eos_token_ids=frozenset(eos), pad_token_id=pad,
                               kv_cache_dtype=config.kv_cache_dtype, prefill_block=config.prefill_block,
                               memory_plan=_memory_plan(config, model, device, self.world_size))
        if sync is not None:
            self.ctx.sync = sync
        # Warm-up: builds DeepSpeed's CPU all-reduce op (JIT) and the DCA rope tables now, inside
        # the load time, and not in the first request.
        with torch.inference_mode():
            ids = torch.ones((1, 2), dtype=torch.long, device=device)
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        shm_unlinked = 0
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank has mapped every peer's shared-memory segment by now
            # The mappings stay valid after unlink and the memory goes when the ranks exit.
            own = [p for p in _shm_paths(master_addr, master_port) if p.endswith(f"_{self.rank}")]
            for path in own:
                os.unlink(path)
            shm_unlinked = len(own)
        return {
            "rank": self.rank, "load_s": time.perf_counter() - start, "device": str(device),
            "vocab_size": int(model.get_input_embeddings().weight.shape[0]), "shm_unlinked": shm_unlinked,
            "dtype": str(model.dtype),
        }

    def run_batch(self, requests: list[GenerationRequest]) -> list[list[GenerationResult]] | _OutOfMemoryAnswer:
        """-> this rank's results, or `_OutOfMemoryAnswer` (tp_size > 1; the pool decides what next)."""
        from pipeline.generation import RankOutOfMemory, generate_batch

        try:
            return generate_batch(self.ctx, requests)
        except RankOutOfMemory as error:  # answered, not raised: the driver need not import torch
            return _OutOfMemoryAnswer(rank=self.rank, message=error.message)

    def check_group(self) -> int:
        """All-reduces a 1 on the model's collective path and on torch.distributed's: -> the sum
        (world_size when the group is still in step, after every rank ran out of memory)."""
        import deepspeed.comm
        import torch
        import torch.distributed as dist

        total = torch.ones(1, device=self.ctx.device)
        deepspeed.comm.inference_all_reduce(total)
        direct = torch.ones(1, device=self.ctx.device)
        dist.all_reduce(direct)
        return int(min(total.item(), direct.item()))

    def inject_out_of_memory(self, request_ids: list[str]) -> None:
        """Test hook (fault injection): from now on, a batch holding one of these requests raises
        torch.OutOfMemoryError on this rank before its first forward. Lost when the actor is."""
        self.ctx.out_of_memory_for = frozenset(request_ids)

    def ping(self) -> int:
        return os.getpid()


def _remove_shm_task(master_addr: str, master_port: int) -> int:
    return _remove_shm_files(master_addr, master_port)


# ---------------------------------------------------------------------------------------------
# Driver side


class _ReplicaDown(Exception):
    """The replica lost a rank (or hung); its batch must run elsewhere."""


@dataclass(frozen=True)
class _OutOfMemoryAnswer:
    """A rank's answer to a batch that ran out of memory on it (tp_size > 1)."""

    rank: int
    message: str


class _OutOfMemory(Exception):
    """Some rank ran out of memory on the batch. `lost`: why the replica was killed (None: kept)."""

    def __init__(self, message: str, lost: str | None):
        super().__init__(message, lost)
        self.message, self.lost = message, lost


@dataclass
class _Entry:
    request: GenerationRequest
    future: concurrent.futures.Future
    attempts: int = 0
    # Set when the request was in a batch that ran out of memory: it now runs alone.
    solo: bool = False

    @property
    def alone(self) -> bool:
        return self.solo or len(self.request.suffix_ids) > 1


class _Replica:
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

    def start(self) -> None:
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
        actor_cls = ray.remote(RankWorker)
        self.workers = [
            actor_cls.options(
                num_cpus=config.cpus_per_rank, num_gpus=1 if self.device_type == "cuda" else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
                max_restarts=0, max_concurrency=1, name=None,
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
            if isinstance(error, EngineStartupError):
                raise
            if isinstance(error, ray.exceptions.GetTimeoutError):
                raise EngineStartupError(
                    f"replica {self.name}: loading did not finish within startup_timeout_s={config.startup_timeout_s:g}"
                ) from None
            raise EngineStartupError(f"replica {self.name} failed to start: {_short(error)}") from error
        self.vocab_size = infos[0]["vocab_size"]
        self.rank_load_s = [i["load_s"] for i in infos]
        self.load_s = time.perf_counter() - begin
        self.alive = True

    def run(self, requests: list[GenerationRequest], on_dispatch=None) -> list[list[GenerationResult]]:
        """Runs one batch on every rank; -> rank 0's results with metrics reduced over ranks.

        Raises _ReplicaDown (a rank died or the batch timed out; the replica is killed),
        _OutOfMemory (some rank ran out of memory; the replica is killed when a peer is stuck) or
        _RankError (a rank raised; the replica is killed when a peer is stuck)."""
        import ray

        grace = self.config.rank_grace_s
        refs = [w.run_batch.remote(requests) for w in self.workers]
        self.busy = True
        if on_dispatch is not None:
            on_dispatch(self.name, [r.request_id for r in requests])
        deadline = None if self.config.request_timeout_s is None else time.monotonic() + self.config.request_timeout_s
        answers: dict[int, object] = {}
        out_of_memory: dict[int, str] = {}  # rank -> what its allocator said
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
                    raise _OutOfMemory(_oom_text(out_of_memory), f"rank(s) {stuck} still ran {grace:g} s "
                                       "(rank_grace_s) later, stuck in a collective")
                if app_error is not None:
                    raise _RankError(app_error)
                raise _ReplicaDown(f"batch exceeded request_timeout_s={self.config.request_timeout_s}")
            for ref in ready:
                rank = refs.index(ref)
                try:
                    answer = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as error:
                    self.kill()
                    if out_of_memory:
                        raise _OutOfMemory(_oom_text(out_of_memory), f"rank {rank} died: {_short(error)}") from None
                    raise _ReplicaDown(f"rank {rank} died: {_short(error)}") from None
                except ray.exceptions.RayTaskError as error:
                    app_error = error
                    continue
                if isinstance(answer, _OutOfMemoryAnswer):
                    out_of_memory[rank] = answer.message
                else:
                    answers[rank] = answer
        self.busy = False
        if out_of_memory:
            lost = None
            if app_error is not None:
                lost = f"another rank raised {_short(app_error)}"
            elif not self._group_in_step():
                lost = f"the ranks failed an all-reduce check within rank_grace_s={grace:g} s"
            if lost is not None:
                self.kill()
            raise _OutOfMemory(_oom_text(out_of_memory), lost)
        if app_error is not None:
            raise _RankError(app_error)
        return _reduce_over_ranks([answers[r] for r in range(len(refs))], self.name)

    def _group_in_step(self) -> bool:
        """After every rank answered an out of memory: do the ranks still meet in a collective?"""
        import ray

        try:
            sums = ray.get([w.check_group.remote() for w in self.workers], timeout=self.config.rank_grace_s)
        except Exception as error:  # noqa: BLE001 - any failure means: rebuild
            log.warning("replica %s: group check after out of memory failed: %s", self.name, _short(error))
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
            task = ray.remote(num_cpus=0)(_remove_shm_task).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False)
            )
            ray.get(task.remote(*self.master), timeout=60)
        except Exception as error:  # noqa: BLE001 - best effort
            log.warning("replica %s: could not remove /dev/shm files: %s", self.name, _short(error))


class _RankError(Exception):
    """A rank raised (not out of memory, that is a result): the batch gets internal_error results."""


def _oom_text(out_of_memory: dict[int, str]) -> str:
    return "; ".join(f"rank {rank}: {message}" for rank, message in sorted(out_of_memory.items()))


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def _reduce_over_ranks(per_rank: list[list[list[GenerationResult]]], replica: str) -> list[list[GenerationResult]]:
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
                seconds = [v.device_seconds_all_ranks for v in views if v.device_seconds_all_ranks is not None]
                result.device_seconds_all_ranks = sum(seconds) if seconds else None
            merged.append(result)
        out.append(merged)
    return out


class ReplicaPool:
    """Replicas of one model behind one request queue. See the module docstring."""

    def __init__(self, config: EngineConfig):
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.config = config
        self._replicas: list[_Replica] = []
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

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ReplicaPool:
        import ray

        config = self.config
        try:
            config.model_spec.check_exists()
        except FileNotFoundError as error:
            raise EngineStartupError(f"cannot start the engine: {error}") from None
        if not ray.is_initialized():
            # None means a private local cluster: ray.init(None) would join whatever RAY_ADDRESS or
            # the last `ray start` on this machine points to.
            ray.init(address="local" if config.ray_address is None else config.ray_address)
        self._device_type = self._check_resources()
        names = [f"replica-{i}" for i in range(config.replicas)]
        self._replicas = [_Replica(name, config, self._device_type) for name in names]
        errors = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(self._replicas)) as pool:
            for replica, future in [(r, pool.submit(r.start)) for r in self._replicas]:
                try:
                    future.result()
                except Exception as error:  # noqa: BLE001 - reported together below
                    errors.append(error)
        if errors:
            self.shutdown()
            raise errors[0] if isinstance(errors[0], EngineStartupError) else EngineStartupError(_short(errors[0]))
        self._vocab_size = self._replicas[0].vocab_size
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
        entry = _Entry(request, future)
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

    def run(self, requests: Iterable[GenerationRequest], max_in_flight: int = 16) -> Iterator[list[GenerationResult]]:
        """Submits lazily (at most max_in_flight waiting or running) and yields results as they complete."""
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

    def _replica_summary(self) -> str:
        return ", ".join(f"{r.name} alive={r.alive} last_error={r.last_error}" for r in self._replicas) or "none"

    def stats(self) -> dict:
        """Per replica: load_s, served (requests answered), failures (batches lost to a dead or
        stuck rank), restarts, alive, tp_size, device."""
        return {
            r.name: {
                "load_s": r.load_s, "served": r.served, "failures": r.failures, "restarts": r.restarts,
                "alive": r.alive, "tp_size": self.config.tp_size, "device": r.device_type,
                "last_error": r.last_error,
            }
            for r in self._replicas
        }

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
        vocab = self._vocab_size
        if vocab is not None:
            for ids in (request.prefix_ids, *request.suffix_ids):
                bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
                if bad:
                    return INVALID_INPUT, f"request {request.request_id}: token ids {bad[:5]} outside the vocabulary [0, {vocab})"
        return None

    def _fail(self, entry: _Entry, error_type: str, message: str) -> None:
        request = entry.request
        suffixes = getattr(request, "suffix_ids", None) or [[]]
        prefix = len(getattr(request, "prefix_ids", []) or [])
        results = [
            GenerationResult.error(
                getattr(request, "request_id", "?"), i, error_type, message,
                prompt_tokens=prefix + len(s), attempts=max(1, entry.attempts),
            )
            for i, s in enumerate(suffixes)
        ]
        self._resolve(entry, results)

    @staticmethod
    def _resolve(entry: _Entry, results: list[GenerationResult]) -> None:
        """Answers a request once; a second answer (a race with shutdown) is dropped."""
        try:
            entry.future.set_result(results)
        except concurrent.futures.InvalidStateError:
            pass

    # -- serving -------------------------------------------------------------------------------

    def _next_batch(self) -> list[_Entry] | None:
        """Oldest request first; later single-suffix ones join while the padded batch fits."""
        config = self.config
        first = self._queue.popleft()
        batch = [first]
        if first.alone:
            return batch
        width = first.request.prompt_tokens
        if width * 2 > config.max_batch_tokens:
            return batch
        for entry in list(self._queue):
            if len(batch) >= config.max_batch_size:
                break
            if entry.alone:
                continue
            new_width = max(width, entry.request.prompt_tokens)
            if new_width * (len(batch) + 1) > config.max_batch_tokens:
                continue
            batch.append(entry)
            width = new_width
            self._queue.remove(entry)
        return batch

    def _serve(self, replica: _Replica) -> None:
        """A serving thread: one replica's loop. Whatever happens, it leaves no request unanswered."""
        died = None
        try:
            while self._serve_one(replica):
                pass
        except BaseException as error:  # noqa: BLE001 - a bug in the loop: answer, then end
            died = f"{replica.name}'s serving thread died: {_short(error)}"
            log.error("%s", died, exc_info=error)
        finally:
            self._serving_ended(replica, died)

    def _serve_one(self, replica: _Replica) -> bool:
        """Takes one batch and answers it. False: this thread ends (stopping, or replica given up)."""
        with self._cond:
            while not self._stopping and not self._queue:
                self._cond.wait()
            if self._stopping:
                return False
            batch = self._next_batch()
            self._running[replica.name] = batch
        try:
            keep = self._run_batch(replica, batch)
        except Exception as error:  # noqa: BLE001 - a bug in the engine: the batch gets internal_error
            keep = self._batch_crashed(replica, batch, error)
        with self._cond:
            self._running.pop(replica.name, None)
        return keep

    def _run_batch(self, replica: _Replica, batch: list[_Entry]) -> bool:
        for entry in batch:
            entry.attempts += 1
        try:
            results = replica.run([e.request for e in batch], self._on_dispatch)
        except _ReplicaDown as error:
            if self._stopping:  # shutdown() killed the actors under this batch
                for entry in batch:
                    self._fail(entry, INTERNAL, "the engine was shut down while this request ran")
                return False
            replica.failures += 1
            replica.last_error = str(error)
            log.warning("%s went down (%s); %d request(s) go back to the queue", replica.name, error, len(batch))
            self._requeue(batch, f"{replica.name}: {error}")
            return self._rebuild(replica)
        except _OutOfMemory as error:
            self._out_of_memory(replica, batch, error)
            return replica.alive or self._rebuild(replica)
        except _RankError as error:
            replica.failures += 1
            replica.last_error = _short(error.args[0])
            for entry in batch:
                self._fail(entry, INTERNAL, f"{replica.name} raised: {replica.last_error}")
            return replica.alive or self._rebuild(replica)
        for entry, result in zip(batch, results, strict=True):
            for r in result:
                r.attempts = entry.attempts
            replica.served += 1
            self._resolve(entry, result)
        return True

    def _out_of_memory(self, replica: _Replica, batch: list[_Entry], error: _OutOfMemory) -> None:
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
        self._fail(entry, OUT_OF_MEMORY, (
            f"request {request.request_id}: out of memory for a {request.prompt_tokens}-token prompt on "
            f"{replica.name} (tp_size={self.config.tp_size}, running alone): {error.message}"
            + (f"; the replica was rebuilt ({error.lost})" if error.lost is not None else "")
            + "; lower max_input_tokens or max_new_tokens, or use more tensor-parallel ranks"
        ))

    def _batch_crashed(self, replica: _Replica, batch: list[_Entry], error: Exception) -> bool:
        """An unexpected exception while running a batch: it gets internal_error results; a
        replica whose ranks may still be running it is rebuilt."""
        replica.failures += 1
        replica.last_error = f"engine error: {_short(error)}"
        log.error("%s: the engine failed on a batch of %d: %s", replica.name, len(batch), _short(error),
                  exc_info=error)
        for entry in batch:
            self._fail(entry, INTERNAL, f"{replica.name}: the engine failed while running request "
                                        f"{entry.request.request_id}: {_short(error)}")
        if self._stopping:
            return False
        if replica.busy or not replica.alive:
            replica.kill()
            return self._rebuild(replica)
        return True

    def _serving_ended(self, replica: _Replica, died: str | None) -> None:
        """A serving thread ends: its batch, and when it was the last one the queue, get answers."""
        if died is not None:
            replica.last_error = died
            try:
                replica.kill()  # nothing serves it any more
            except Exception as error:  # noqa: BLE001
                log.warning("%s: kill failed: %s", replica.name, _short(error))
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

    def _rebuild(self, replica: _Replica) -> bool:
        """Restarts a replica within max_restarts. False: it is given up (and maybe the pool)."""
        while replica.restarts < self.config.max_restarts and not self._stopping:
            replica.restarts += 1
            try:
                replica.start()
                log.warning("%s rebuilt (restart %d)", replica.name, replica.restarts)
                return True
            except Exception as error:  # noqa: BLE001
                replica.last_error = f"rebuild {replica.restarts} failed: {_short(error)}"
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

"""One rank of a replica: a Ray actor holding one shard of the model.

torch, transformers, deepspeed and `dca` are imported inside its methods only, in the actor's
process: the driver imports this module (to wrap `RankWorker` with `ray.remote`) without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import time

from pipeline.config.engine import EngineConfig
from pipeline.engine.messages import OutOfMemoryAnswer, StepResult
from pipeline.engine.requests import GenerationRequest, GenerationResult

SHM_PREFIX = "deepspeed_allreduce_buffer"
# TEST SEAM (fault injection), never set in production: "module:function", called with no
# arguments in every rank worker at the start of `setup`, before the model is loaded and its DCA
# backend chosen. The job tests use it to make a CPU rank choose and self-check DCA's Triton
# kernels as a GPU rank does, with a failure injected into them (tests/pipeline/backend_faults.py).
# The driver forwards its own value to the rank workers it starts (pipeline.engine.replica).
RANK_TEST_HOOK_ENV = "DCA_PIPELINE_RANK_TEST_HOOK"


def _run_test_hook() -> None:
    """RANK_TEST_HOOK_ENV's function, when set (a test seam, see there)."""
    hook = os.environ.get(RANK_TEST_HOOK_ENV)
    if not hook:
        return
    import importlib

    module, _, name = hook.partition(":")
    getattr(importlib.import_module(module), name)()


BACKEND_HINT = "a job sets it with --dca-backend or the dca: block's backend"


@contextlib.contextmanager
def _backend_errors(rank: int):
    """dca.BackendUnavailable raised while the model loads (apply_dca: a backend asked for by
    name whose package is not installed here) as AttentionBackendUnavailable: a setting, one line,
    never retried."""
    from dca import BackendUnavailable
    from pipeline.engine.errors import AttentionBackendUnavailable

    try:
        yield
    except BackendUnavailable as error:
        raise AttentionBackendUnavailable(f"rank {rank}: {' '.join(str(error).split())} ({BACKEND_HINT})") from None


def _choose_attention(model, config: EngineConfig, rank: int, world_size: int, device) -> dict:
    """This rank's attention record (pipeline.engine.attention_record), chosen now, before any
    request: with DCA, `dca.prepare_backend` picks the backend for the job's KV dtype and runs its
    start-up self-check (a backend that fails it is replaced by flash or torch under "auto": the
    record says why). A backend asked for by name that cannot run raises
    AttentionBackendUnavailable on every rank of the replica (the ranks agree first, so that no
    rank waits in a collective for one that gave up)."""
    from dca import BackendUnavailable, dca_config_of, prepare_backend
    from pipeline.engine.attention_record import dca_attention_record, model_attention_record
    from pipeline.engine.errors import AttentionBackendUnavailable

    dtype = str(model.dtype).removeprefix("torch.")
    if dca_config_of(model) is None:
        return model_attention_record(rank=rank, requested=config.model_spec.attn_implementation,
                                      ran=getattr(model.config, "_attn_implementation", None), device=str(device),
                                      dtype=dtype, kv_dtype=config.kv_cache_dtype)
    failure = None
    try:
        # The job's KV dtype first: its report is what the requests run. A forward without a
        # cache (the warm-up below) uses the "auto" key: chosen (and checked) here too, so that
        # an explicit backend failing there also stops the replica with this error.
        report = prepare_backend(model, kv_dtype=config.kv_cache_dtype)
        if config.kv_cache_dtype != "auto":
            prepare_backend(model, kv_dtype="auto")
    except BackendUnavailable as error:
        failure = " ".join(str(error).split())  # one line
    if world_size > 1:
        import torch
        import torch.distributed as dist

        failed = torch.tensor([1 if failure else 0], device=device)
        dist.all_reduce(failed)
        if failed.item() and failure is None:
            failure = "another rank of this replica cannot run the DCA backend asked for (its own error says why)"
    if failure is not None:
        raise AttentionBackendUnavailable(f"rank {rank}: {failure} ({BACKEND_HINT})")
    return dca_attention_record(rank=rank, report=report.to_dict())


def _memory_plan(config: EngineConfig, model, device, world_size: int, prefill_block, attention_backend: str):
    """The planner requests are checked against on this rank, for the attention backend this rank
    runs. Device memory: device_memory_bytes when set, else the GPU's total memory on CUDA, else on
    CPU this rank's share of the machine (its memory, or the cgroup limit, divided by all ranks of
    the pool: tp_size x replicas)."""
    memory = config.device_memory_bytes
    if memory is None and device.type == "cuda":
        import torch

        memory = torch.cuda.get_device_properties(device).total_memory
    if memory is None:
        machine = _cpu_memory_bytes()
        memory = machine // (config.tp_size * config.replicas) if machine else None
    from dca import dca_config_of
    from pipeline.engine.memory_plan import MemoryPlan, ModelShape, ServingConfig

    dca = dca_config_of(model)
    dtype = str(model.dtype).removeprefix("torch.")
    serving = ServingConfig(
        tp_size=world_size, weight_dtype=dtype, kv_cache_dtype=config.kv_cache_dtype,
        prefill_block=prefill_block, logits="last",
        attention_backend=attention_backend,
        chunk_len=dca.chunk_len if dca is not None else None, device=device.type, device_memory=memory,
    )
    return MemoryPlan(ModelShape.from_config(model.config), serving)


def _planned_backend(device, model) -> str:
    """The planner's backend for a model without DCA (the static scheduler's plan; DCA's planner
    terms stand in for the model's own attention): what DCA would choose here."""
    from dca.kernels import flash_available, triton_available, triton_interpreted
    from pipeline.config.resolve import planned_attention_backend

    return planned_attention_backend(device.type, dtype=str(model.dtype).removeprefix("torch."),
                                     triton_available=triton_available() and not triton_interpreted(),
                                     flash_available=flash_available())


def _cpu_memory_bytes() -> int | None:
    """The machine's memory, or the cgroup's limit when lower (containers)."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
            if text.isdigit():
                sizes.append(int(text))
        except OSError:
            pass
    return min(sizes) if sizes else None


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
        # The running batch (continuous scheduler), or None (static).
        self.batch = None

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
        _run_test_hook()

        from datetime import timedelta

        import torch

        from pipeline.engine.generation import RankContext
        from pipeline.engine.models import load_model, load_model_for_tp, load_tokenizer
        from pipeline.engine.tokens import eos_token_ids

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
            with _backend_errors(self.rank):
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
            with _backend_errors(self.rank):
                model = load_model(spec, str(device))
        model.eval()
        # The attention backend, decided once for the whole life of this rank: before the memory
        # plan (made for it) and the warm-up forward, and before any request.
        attention = _choose_attention(model, config, self.rank, self.world_size, device)

        tokenizer, pad = None, 0
        if self.rank == 0:
            tokenizer = load_tokenizer(spec)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        from dca import dca_config_of
        from pipeline.config.resolve import static_prefill_block
        from pipeline.engine.continuous import ContinuousBatch, resolve_prefill_tokens

        # Continuous batching packs rows through DCA's attention; a model without DCA runs static.
        scheduler = config.scheduler if dca_config_of(model) is not None else "static"
        if scheduler == "continuous":
            prefill_block = resolve_prefill_tokens(config.prefill_block, model)
        else:
            prefill_block = static_prefill_block(config.prefill_block)
        planned = attention["ran"] if attention["dca"] else _planned_backend(device, model)
        plan = _memory_plan(config, model, device, self.world_size, prefill_block, planned)
        self.ctx = RankContext(model=model, device=device, rank=self.rank, world_size=self.world_size,
                               tokenizer=tokenizer, eos_token_ids=eos_token_ids(tokenizer, model), pad_token_id=pad,
                               kv_cache_dtype=config.kv_cache_dtype, prefill_block=prefill_block,
                               memory_plan=plan if scheduler == "static" else None)
        if sync is not None:
            self.ctx.sync = sync
        if scheduler == "continuous":
            self.batch = ContinuousBatch(self.ctx, prefill_block)
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
            "dtype": str(model.dtype), "scheduler": scheduler, "prefill_tokens": prefill_block,
            "plan": {"shape": dataclasses.asdict(plan.shape), "serving": plan.config.to_dict()},
            "attention": attention,
            "pipeline_path": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        }

    def run_batch(self, requests: list[GenerationRequest]) -> list[list[GenerationResult]] | OutOfMemoryAnswer:
        """Static scheduler: -> this rank's results, or `OutOfMemoryAnswer` (tp_size > 1; the
        pool decides what next)."""
        from pipeline.engine.generation import RankOutOfMemory, generate_batch

        try:
            return generate_batch(self.ctx, requests)
        except RankOutOfMemory as error:  # answered, not raised: the driver need not import torch
            return OutOfMemoryAnswer(rank=self.rank, message=error.message)

    def step(self, admit: list, drop: list[int], time_budget_s: float | None) -> StepResult | OutOfMemoryAnswer:
        """Continuous scheduler: admits [(seq, request)], drops requests by seq, then runs steps of
        the running batch until a row ends or time_budget_s passes (`ContinuousBatch.step`).
        Out of memory is answered, with what was measured before it; the rows stay (rolled back)
        until the pool drops them."""
        from pipeline.engine.continuous import BatchOutOfMemory

        if self.batch is None:
            raise RuntimeError(f"{self.replica} rank {self.rank} runs the static scheduler: call run_batch")
        try:
            return self.batch.step(admit, drop, time_budget_s)
        except BatchOutOfMemory as error:
            return OutOfMemoryAnswer(rank=self.rank, message=error.message, report=error.report)

    def call(self, fn, args: tuple):
        """Runs fn(ctx, *args) on this rank's model (no grad) and returns its value. Every rank of
        the replica gets the same call (`ReplicaPool.call_ranks`), so collectives inside meet."""
        import torch

        with torch.inference_mode():
            return fn(self.ctx, *args)

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


def remove_shm_task(master_addr: str, master_port: int) -> int:
    """A Ray task on a replica's node: removes the /dev/shm files its ranks left (died before
    unlinking them); -> how many."""
    return _remove_shm_files(master_addr, master_port)


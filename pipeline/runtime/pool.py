"""The engine of a job: its ReplicaPool, started with the job's settings, after printing the memory
planner's estimate for the job's longest request."""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys

from pipeline.config.engine import EngineConfig
from pipeline.config.job import JobConfig
from pipeline.config.model import dca_config_for
from pipeline.config.resolve import (
    COMPUTE_DTYPES, planned_attention_backend, planned_device, planned_weight_dtype, prefill_block_for_dca, static_prefill_block,
)
from pipeline.engine.memory_plan import COMPONENTS, MemoryPlan, ModelShape, ServingConfig, fmt_bytes
from pipeline.engine.models import load_model_config

log = logging.getLogger("pipeline.job")


class PlanDoesNotFit(ValueError):
    """The job's own longest request (--max-input-tokens + --max-new-tokens) cannot fit the device:
    refused before the output is claimed (a configuration error, exit 2), not discovered document
    by document."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobMemoryPlan:
    """The memory planner's estimate for a job's longest request on one device kind."""

    plan: MemoryPlan
    estimate: object  # MemoryEstimate
    flags: list  # the jobs.plan flags that print the same plan

    @classmethod
    def of(cls, config: JobConfig, engine_config: EngineConfig, device: str) -> "JobMemoryPlan":
        dtype = planned_weight_dtype(config.model_spec.dtype, device)
        shape = ModelShape.load(config.model_spec.model)
        chunk_len = None
        if config.model_spec.dca is not None:
            chunk_len = dca_config_for(config.model_spec, load_model_config(config.model_spec)).chunk_len
        # "auto" is one shot with the static scheduler (pipeline.engine.worker).
        block = engine_config.prefill_block
        block = static_prefill_block(block) if engine_config.scheduler == "static" else block
        serving = ServingConfig(
            tp_size=config.tp, weight_dtype=dtype, kv_cache_dtype=engine_config.kv_cache_dtype,
            prefill_block=block, device=device, chunk_len=chunk_len,
            attention_backend=planned_attention_backend(device, (config.model_spec.dca or {}).get("backend", "auto"),
                                                        dtype=dtype if dtype in COMPUTE_DTYPES else None),
        )
        plan = MemoryPlan(shape, serving)
        flags = ["--model", config.model_spec.model, "--tp", str(config.tp), "--max-input-tokens",
                 str(config.max_input_tokens), "--max-new-tokens", str(config.max_new_tokens), "--dtype", dtype,
                 "--kv-cache-dtype", engine_config.kv_cache_dtype, "--prefill-block",
                 "none" if block is None else str(block), "--device", device]
        for key in ("pretraining_length", "chunk_size", "local_window", "backend"):
            if (config.model_spec.dca or {}).get(key) is not None:
                flags += [f"--dca-{key.replace('_', '-')}", str(config.model_spec.dca[key])]
        return cls(plan=plan, estimate=plan.estimate(config.max_input_tokens, config.max_new_tokens), flags=flags)

    def refusal(self, config: JobConfig, memory: int, where: str) -> str | None:
        """One line when the longest request does not fit `memory` bytes per rank, else None."""
        if self.estimate.total <= memory:
            return None
        fitted = MemoryPlan(self.plan.shape, dataclasses.replace(self.plan.config, device_memory=memory))
        longest = fitted.longest_prompt(config.max_new_tokens)
        return (f"--max-input-tokens {config.max_input_tokens} cannot fit: the longest request "
                f"({config.max_input_tokens} + {config.max_new_tokens} tokens) needs {fmt_bytes(self.estimate.total)} "
                f"per rank, one rank has {fmt_bytes(memory)} ({where}); the longest prompt that fits is {longest} "
                f"tokens: lower --max-input-tokens (python -m jobs.plan "
                f"{shlex.join(self.flags + ['--gpu-memory', str(memory)])})")


def local_device_memory(device: str, ranks: int) -> tuple[int | None, str]:
    """(bytes one rank can use, what they are) for the job-start check, or (None, why not).

    cuda: the total memory of this process's first GPU where it sees one (a driver without a GPU
    leaves the check to the ranks, which refuse each request that will not fit). cpu: this
    machine's memory shared by the job's ranks (they run here on a local cluster)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None, "no GPU visible to the driver"
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    import psutil  # a Ray dependency

    total = psutil.virtual_memory().total
    return total // max(1, ranks), f"this machine's {fmt_bytes(total)} over {ranks} rank(s)"


def _device_known_before_ray(config: JobConfig) -> str | None:
    """The device the ranks will use, where it is known before Ray starts: set in the config, or
    "auto" with a GPU in this process, or "auto" on the local cluster this process starts (no
    GPU here: the ranks run on CPU). None on a remote cluster (its nodes decide)."""
    if config.device in ("cpu", "cuda"):
        return config.device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    remote = config.ray_address or os.environ.get("RAY_ADDRESS")
    return None if remote else "cpu"


def check_plan_fits(config: JobConfig, device_memory: tuple[int, str] | None = None) -> None:
    """Raises PlanDoesNotFit when the job's longest request cannot fit what one rank has
    (`local_device_memory` on the device known before Ray starts, or `device_memory` as (bytes,
    description)). Called before the output is claimed; a plan the planner cannot make is left to
    the ranks (they refuse each request that will not fit)."""
    device = _device_known_before_ray(config)
    if device is None:
        return
    try:
        job_plan = JobMemoryPlan.of(config, engine_config_for(config), device)
        memory, where = device_memory or local_device_memory(device, config.tp * config.replicas)
    except Exception as error:  # the plan is advice: a model the planner cannot read still runs
        log.debug("no memory plan check for %s: %s", config.model_spec.model, error)
        return
    refusal = job_plan.refusal(config, memory, where) if memory is not None else None
    if refusal is not None:
        raise PlanDoesNotFit(refusal)


def print_memory_plan(config: JobConfig, engine_config) -> None:
    """Prints the memory planner's estimate for this job's longest request on one line (a GPU plan
    where the job runs on GPUs; on CPU the same components, without a device limit), with the
    jobs.plan command that prints the full table: the planner takes the job's own flags."""
    import ray

    try:
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        device = planned_device(config.device, gpus)
        job_plan = JobMemoryPlan.of(config, engine_config, device)
    except Exception as error:  # the plan is advice: a model the planner cannot read still runs
        log.warning("no memory plan for %s: %s", config.model_spec.model, error)
        return
    estimate = job_plan.estimate
    parts = ", ".join(f"{c.replace('_', ' ')} {fmt_bytes(getattr(estimate, c))}" for c in COMPONENTS
                      if getattr(estimate, c))
    print(f"memory plan: {fmt_bytes(estimate.total)} per rank for the longest request "
          f"({config.max_input_tokens} + {config.max_new_tokens} tokens): {parts}; {job_plan.plan.config.describe()}\n"
          f"  (python -m jobs.plan {shlex.join(job_plan.flags)} for the table)", file=sys.stderr, flush=True)


def engine_config_for(config: JobConfig) -> EngineConfig:
    """The engine settings of a job (what start_pool starts)."""
    engine_kwargs = {k: getattr(config, k) for k in (
        "scheduler", "max_batch_tokens", "max_batch_size", "max_restarts", "request_retries", "device",
        "cpus_per_rank", "kv_cache_dtype") if getattr(config, k) is not None}
    # "chunk" is one DCA chunk: without DCA there is none, and the prompt goes in one shot.
    engine_kwargs["prefill_block"] = prefill_block_for_dca(config.prefill_block, config.model_spec.dca is not None)
    return EngineConfig(
        model_spec=config.model_spec, tp_size=config.tp, replicas=config.replicas,
        max_input_tokens=config.max_input_tokens, **engine_kwargs,
    )


def start_pool(config: JobConfig):
    """A started ReplicaPool for this job (the engine of pipeline.engine), after printing its
    memory plan."""
    from pipeline.engine import ReplicaPool

    engine_config = engine_config_for(config)
    print_memory_plan(config, engine_config)
    pool = ReplicaPool(engine_config)
    pool.start()
    return pool

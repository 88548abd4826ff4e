"""The engine of a job: its ReplicaPool, started with the job's settings, after printing the memory
planner's estimate for the job's longest request."""

from __future__ import annotations

import logging
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


def print_memory_plan(config: JobConfig, engine_config) -> None:
    """Prints the memory planner's estimate for this job's longest request on one line (a GPU plan
    where the job runs on GPUs; on CPU the same components, without a device limit), with the
    jobs.plan command that prints the full table: the planner takes the job's own flags."""
    import ray

    try:
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        device = planned_device(config.device, gpus)
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
    for key in ("pretraining_length", "chunk_size", "local_window", "backend"):
        if (config.model_spec.dca or {}).get(key) is not None:
            flags += [f"--dca-{key.replace('_', '-')}", str(config.model_spec.dca[key])]
    print(f"memory plan: {fmt_bytes(estimate.total)} per rank for the longest request "
          f"({config.max_input_tokens} + {config.max_new_tokens} tokens): {parts}; {serving.describe()}\n"
          f"  (python -m jobs.plan {shlex.join(flags)} for the table)", file=sys.stderr, flush=True)


def start_pool(config: JobConfig):
    """A started ReplicaPool for this job (the engine of pipeline.engine), after printing its
    memory plan."""
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
    print_memory_plan(config, engine_config)
    pool = ReplicaPool(engine_config)
    pool.start()
    return pool

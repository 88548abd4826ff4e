"""Engine settings: how many replicas of which model, how each is sharded and scheduled, and the
limits it enforces (pure Python: the driver imports it without torch)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from pipeline.config.files import reject_unknown_fields
from pipeline.config.model import ModelSpec
from pipeline.config.resolve import KV_CACHE_DTYPES, check_prefill_block
from pipeline.config.validate import check_choice, check_int_at_least, check_positive_ints

DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = ("continuous", "static")
# Rows (one per suffix) in a replica's running batch at most, by default.
DEFAULT_MAX_BATCH_SIZE = 8


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
    # How a replica batches requests (pipeline.engine.scheduler): "continuous" (requests join and
    # leave the running batch step by step; admission by the memory planner's KV budget) or
    # "static" (a left-padded batch runs until its last row ends; kept for comparison). A model
    # without DCA always runs static (continuous batching packs rows through DCA's attention).
    scheduler: str = "continuous"
    # Static scheduler only: padded prompt tokens (rows x longest prompt) of one batch; a
    # longer prompt runs alone.
    max_batch_tokens: int = 8192
    # Rows (one per suffix) in a replica's batch at most.
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
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
    # A batch running longer than this (continuous scheduler: a request resident in the running
    # batch that long) counts as a hung replica: it is killed and rebuilt, and the batch retried
    # (None: no limit; then only a dead rank ends a stuck batch). One hour is
    # far above any legitimate batch at the defaults (max_input_tokens 32k, max_batch_tokens 8k):
    # on GPU a 100k-token request of a 70B model takes minutes; on 2 CPU cores SmolLM2-135M
    # prefills 16k tokens in about 100 s, and a 2k-token prompt plus 48 new tokens took up to
    # 5.5 minutes on loaded cores (measured on a shared 2-core machine). Each timeout costs a
    # rebuild (max_restarts), so a limit close to real batch times would take healthy replicas
    # down; raise it for slower setups.
    request_timeout_s: float | None = 3600.0
    # How long the other ranks may still run after one rank answered with an error before the
    # replica is considered stuck in a collective and rebuilt.
    rank_grace_s: float = 60.0
    # Used only when Ray is not initialised: None starts a local cluster, "auto" joins `ray start`.
    ray_address: str | None = None
    # KV cache storage (pipeline.config.resolve.KV_CACHE_DTYPES): "auto" (the model dtype) or
    # "int8" (dca.kv_quant.Int8KVCache: per-token, per-head scales, about half of bf16).
    # docs/memory.md measures its cost.
    kv_cache_dtype: str = "auto"
    # Prompt tokens per prefill forward: None = one shot, "chunk" = one DCA chunk (activation
    # memory then depends on the block, not the prompt), a number of tokens, or "auto": one DCA
    # chunk but at least 1024 tokens with the continuous scheduler (a long prefill then advances
    # a block per step while the other rows keep decoding), one shot with the static one.
    prefill_block: int | str | None = "auto"
    # Device memory per rank the memory planner (pipeline/engine/memory_plan.py) checks every request
    # against before running it, and the continuous scheduler admits requests by: None = the
    # GPU's total memory on CUDA; on CPU the machine's memory divided by the pool's ranks.
    device_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_spec, ModelSpec):
            raise TypeError(f"model_spec must be a ModelSpec, got {type(self.model_spec).__name__}")
        check_positive_ints(self, ("tp_size", "replicas", "max_input_tokens", "max_batch_tokens", "max_batch_size",
                                   "cpus_per_rank"), rule="an int >= 1")
        for name in ("max_restarts", "request_retries"):
            check_int_at_least(name, getattr(self, name), 0, rule="an int >= 0")
        check_choice("device", self.device, DEVICES)
        check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES, shown="'auto' or 'int8'")
        check_prefill_block(self.prefill_block, rule="None, 'chunk', 'auto' or an int >= 1")
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_int_at_least("device_memory_bytes", self.device_memory_bytes, optional=True, rule="None or an int >= 1")
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


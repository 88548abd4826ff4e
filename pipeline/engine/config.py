"""Engine configuration and errors (pure Python: the driver imports it without torch)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from pipeline.config_files import reject_unknown_fields
from pipeline.models import ModelSpec

_DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = ("continuous", "static")


class EngineError(RuntimeError):
    """The engine cannot answer: the message says what happened."""


class EngineStartupError(EngineError):
    """The pool cannot start: the message says what is missing."""


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
    # A batch running longer than this (continuous scheduler: a request resident in the running
    # batch that long) counts as a hung replica: it is killed and rebuilt, and the batch retried
    # (None: no limit; then only a dead rank ends a stuck batch). One hour is
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
    # memory then depends on the block, not the prompt), a number of tokens, or "auto": one DCA
    # chunk but at least 1024 tokens with the continuous scheduler (a long prefill then advances
    # a block per step while the other rows keep decoding), one shot with the static one.
    prefill_block: int | str | None = "auto"
    # Device memory per rank the memory planner (pipeline/memory_plan.py) checks every request
    # against before running it, and the continuous scheduler admits requests by: None = the
    # GPU's total memory on CUDA; on CPU the machine's memory divided by the pool's ranks.
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
        if not (block is None or block in ("chunk", "auto")
                or (isinstance(block, int) and not isinstance(block, bool) and block >= 1)):
            raise ValueError(f"prefill_block must be None, 'chunk', 'auto' or an int >= 1, got {block!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
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


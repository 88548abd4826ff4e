"""Settings derived from other settings, each resolved here and nowhere else.

Pure Python: the driver, the planner (jobs.plan) and the rank workers all call these, so what a
job plans for, what it prints and what its ranks run are the same by construction.

- prefill block: what `prefill_block` ("auto", "chunk", None or a number) means for the
  continuous scheduler (`prefill_tokens`), for the static scheduler (`static_prefill_block`), for a
  model without DCA (`prefill_block_for_dca`), and how the job's "none" spelling reads
  (`normalize_prefill_block`); `MIN_AUTO_PREFILL_TOKENS` is the smallest "auto" block;
- KV-cache dtype: `KV_CACHE_DTYPES` (what the jobs and the engine store), `PLANNED_KV_DTYPES` (the
  planner also takes an explicit dtype) and `kv_cache_dtype_of` ("auto" is the compute dtype);
- device and weight dtype the planner assumes (`planned_device`, `planned_weight_dtype`);
- attention backend the planner assumes (`planned_attention_backend`, `ATTENTION_BACKENDS`).
"""

from __future__ import annotations

from pipeline.config.validate import is_int

# Prompt tokens per continuous-batching step when prefill_block is "auto": one DCA chunk, but at
# least this many (a tiny chunk would cost a forward per few tokens).
MIN_AUTO_PREFILL_TOKENS = 1024
# Compute dtypes (activations, attention, the KV cache of "auto").
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# KV-cache storage of a job and of the engine: "auto" (the model's dtype) or "int8"
# (dca.kv_quant.Int8KVCache: per-token, per-head scales, about half of bf16).
KV_CACHE_DTYPES = ("auto", "int8")
# What the memory planner takes: the same, or a compute dtype named explicitly.
PLANNED_KV_DTYPES = ("auto", *COMPUTE_DTYPES, "int8")


def check_prefill_block(value, *, rule: str) -> None:
    """prefill_block is "auto", "chunk", None (one shot) or a positive number of tokens; the message
    reads "prefill_block must be <rule>, got <value>" (each config states the rule in its own words:
    the jobs' spell one shot 'none')."""
    if not (value is None or value in ("auto", "chunk") or (is_int(value) and value > 0)):
        raise ValueError(f"prefill_block must be {rule}, got {value!r}")


def normalize_prefill_block(value):
    """The jobs' spellings of one shot ("none", "one-shot") -> None; other values unchanged."""
    return None if value in ("none", "one-shot") else value


def prefill_block_for_dca(value, dca_enabled: bool):
    """A job's prefill_block for its engine: "chunk" means one DCA chunk, so without DCA there is
    none and the prompt goes in one shot."""
    return None if value == "chunk" and not dca_enabled else value


def static_prefill_block(value):
    """prefill_block under the static scheduler: "auto" is one shot there (it is the continuous
    scheduler's interleaving of prompt blocks with decode steps)."""
    return None if value == "auto" else value


def prefill_tokens(value, chunk_len: int | None) -> int | None:
    """Prompt tokens per continuous-batching step for prefill_block `value` on a model whose DCA
    chunk_len is `chunk_len` (None: DCA off). None: a whole prompt per step.

    "auto": one DCA chunk, at least MIN_AUTO_PREFILL_TOKENS; "chunk": one DCA chunk (one shot
    without DCA); a number: that many; None: one shot."""
    if value == "auto":
        return max(chunk_len or 0, MIN_AUTO_PREFILL_TOKENS)
    if value == "chunk":
        return chunk_len
    return value


def kv_cache_dtype_of(kv_cache_dtype: str, compute_dtype: str) -> str:
    """The dtype a KV cache is stored in: "auto" is the compute dtype."""
    return compute_dtype if kv_cache_dtype == "auto" else kv_cache_dtype


def planned_device(device: str | None, cluster_gpus: float) -> str:
    """The device a job's replicas will run on, for its memory plan: "cuda" when asked for, or
    "auto" (or unset) on a cluster that has GPUs; else "cpu"."""
    return "cuda" if device == "cuda" or (device in (None, "auto") and cluster_gpus > 0) else "cpu"


def planned_weight_dtype(dtype: str, device: str) -> str:
    """The weight dtype the planner assumes for ModelSpec.dtype on `device`: "auto" is bfloat16 on
    CUDA and float32 on CPU (the rank resolves "auto" to float16 on a GPU without bf16, which
    takes the same memory)."""
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype


# DCA attention backends (dca.config.BACKENDS less "auto"), each planned for by the memory planner.
# Written out rather than imported so that a driver that only validates settings loads nothing of
# dca; tests/test_architecture.py checks that the two lists agree.
ATTENTION_BACKENDS = ("torch", "flash", "triton")


def planned_attention_backend(device: str, requested: str = "auto", *, dtype: str | None = None,
                              triton_available: bool = True, flash_available: bool = True) -> str:
    """The DCA attention backend the memory planner plans for on `device` ("cuda" or "cpu"): the
    one `dca.kernels.resolve_backend` chooses for `requested` (DCAConfig.backend), written
    without torch so that the driver and jobs.plan can call it.

    "auto": on CUDA the Triton kernels when triton is importable (it ships with CUDA builds of
    torch: a driver, which imports no torch, assumes it is), else flash-attn in float16/bfloat16
    when installed, else torch; on CPU torch. A name asked for ("torch", "flash", "triton") is
    planned as it is: if it cannot run, the job stops at start (dca.BackendUnavailable).

    On CUDA the start-up self-check may still replace Triton by flash or torch (dca.selfcheck):
    a rank plans with the backend that passed it (`dca.prepare_backend`'s report), never with
    this guess. dtype: the compute dtype ("float32", "bfloat16", "float16"; None: a half type)."""
    if requested != "auto":
        if requested not in ATTENTION_BACKENDS:
            raise ValueError(f"DCA backend must be 'auto' or one of {ATTENTION_BACKENDS}, got {requested!r}")
        return requested
    if device != "cuda":
        return "torch"
    if triton_available and dtype in (None, *COMPUTE_DTYPES):
        return "triton"
    half = dtype in (None, "bfloat16", "float16")
    return "flash" if flash_available and half else "torch"

"""Memory planner: predicted peak memory per GPU of one request, by component, before running it.

    shape = ModelShape.load("llama2-70b")            # a preset, a HF directory, a config or a dict
    plan = MemoryPlan(shape, ServingConfig(tp_size=2, kv_cache_dtype="int8", prefill_block="chunk",
                                           device_memory=parse_bytes("a100-80g")))
    plan.estimate(prompt_tokens=100_000, new_tokens=512, batch=1)   # -> MemoryEstimate
    plan.check(100_000, 512)           # raises WontFit (error_type "wont_fit") with the numbers
    plan.longest_prompt(new_tokens=512) # the largest prompt that fits

Pure Python (no torch): the driver and the engine can consult it before a model is loaded.

What is modelled (per GPU, the rank holding the most heads when tensor parallelism splits them
unevenly, spec section 7; the layout DeepSpeed AutoTP gives: q/k/v/o, gate/up/down and lm_head
split, embedding and norms replicated):

- weights: parameters in the weight dtype (embedding and lm_head stay in the compute dtype when
  the weights are quantised);
- kv_cache: 2 x layers x kv_heads x head_dim x (prompt + new tokens) x batch, in the KV dtype
  (int8: 1 byte + a float32 scale per (token, head), see dca/kv_quant.py);
- activations: the larger of the prefill peak (the last prefill block: its tokens through one
  decoder layer, attention over all keys) and the decode peak. With the torch and flash backends
  both include the transients the current code creates from one layer's KV: torch.cat when
  appending (the old keys, then the old values, next to the new), the int8 cache's dequantised K
  and V, and on CUDA with the torch backend the memory-efficient kernel's .contiguous() copies of
  key ranges (flash-attn and the CPU flash kernel read strided keys without a copy). The Triton
  backend makes none of them (keys written into the cache in place by its store kernel, queries
  rotated in registers, int8 read inside the kernels): its attention holds the new tokens' q, k,
  v, the layer's output and the kernel's, plus, at decode, the split partial outputs;
- logits: the last position only (generate, `dca.prefill.chunked_prefill`) or every position of
  the forward (a plain `model(input_ids)` call);
- runtime_overhead: on CUDA a fixed part (CUDA context, cuBLAS workspace, NCCL buffers, which
  `torch.cuda.max_memory_allocated` does not see) plus a fragmentation share of the dynamic
  memory. 0 on CPU: the kernels' scratch buffers (6-8 MiB measured) stay allocated after the
  first request and belong to the process baseline.

The terms are summed (logits and layer activations never coexist in full, so the sum is a small
over-estimate for "last" logits). docs/memory.md compares the predictions with measured peaks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.model import dca_chunk_len
from pipeline.config.resolve import (
    ATTENTION_BACKENDS, MIN_AUTO_PREFILL_TOKENS, PLANNED_KV_DTYPES, check_prefill_block, kv_cache_dtype_of,
    prefill_tokens,
)
from pipeline.config.validate import check_choice, check_int_at_least
from pipeline.engine.requests import WONT_FIT

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Bytes per stored element. int8/int4 weights: per-channel / per-group (128) bf16 scales included.
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5 + 2 / 128}
COMPUTE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
INT8_SCALE_BYTES = 4  # dca/kv_quant.py: one float32 scale per (token, head)
BACKENDS = ATTENTION_BACKENDS
# The Triton decode kernel (dca/triton_kernels.py `decode`): at most this many new tokens per row
# and this many (query heads of a KV head x new tokens) rows per program take the split-KV path;
# its keys are split over at most MAX_SPLITS programs of key blocks of DECODE_BLOCK_N slots (the
# first CUDA tile), each writing a float32 partial output and LSE.
TRITON_DECODE_MAX_QUERIES = 16
TRITON_DECODE_MAX_ROWS = 128
TRITON_DECODE_MAX_SPLITS = 256
TRITON_DECODE_BLOCK_N = 64
DEVICES = ("cuda", "cpu")

# What devices report as total memory (torch.cuda.get_device_properties(i).total_memory): a
# card sold as "80 GB" reports about 79.2 GiB.
DEVICE_MEMORY = {
    "a100-40g": int(39.39 * GiB),
    "a100-80g": int(79.15 * GiB),
    "h100-80g": int(79.10 * GiB),
    "h200": int(139.8 * GiB),
    "l40s": int(44.4 * GiB),
}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The dimensions of a Llama-layout decoder that decide its memory."""

    name: str = "custom"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    # A tied lm_head shares the embedding's storage (unless tensor parallelism splits it).
    tie_word_embeddings: bool = False
    # P of DCA (max_position_embeddings): the default chunk_len is 5P/8.
    pretraining_length: int = 4096

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size", "pretraining_length"):
            check_int_at_least(f, getattr(self, f), rule="a positive int", owner=f"ModelShape {self.name!r}: ")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelShape {self.name!r}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )

    @property
    def num_parameters(self) -> int:
        return self._layer_params() * self.num_layers + self.vocab_size * self.hidden_size * (
            1 if self.tie_word_embeddings else 2
        ) + self.hidden_size

    def _layer_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        return attn + 3 * h * self.intermediate_size + 2 * h

    @classmethod
    def from_config(cls, config, name: str = "custom") -> ModelShape:
        """From a transformers config object or a dict of config.json fields."""
        get = config.get if isinstance(config, dict) else (lambda k, default=None: getattr(config, k, default))
        missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                               "vocab_size") if get(k) is None]
        if missing:
            raise ValueError(f"model config {name!r} lacks {missing}: not a Llama-layout decoder config")
        heads = int(get("num_attention_heads"))
        return cls(
            name=name,
            num_layers=int(get("num_hidden_layers")),
            hidden_size=int(get("hidden_size")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or int(get("hidden_size")) // heads),
            intermediate_size=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            pretraining_length=int(get("max_position_embeddings") or 4096),
        )

    @classmethod
    def load(cls, model: str) -> ModelShape:
        """A preset name (see PRESETS), a Hugging Face directory (config.json), a config.json file or
        a .gguf file (read with transformers, no weights loaded)."""
        key = model.lower()
        if key in PRESETS:
            return PRESETS[key]
        path = Path(model).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if path.is_file() and path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                return cls.from_config(json.load(f), name=str(model))
        if path.is_file() and path.suffix == ".gguf":
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            return cls.from_config(config, name=str(model))
        raise FileNotFoundError(
            f"model {model!r}: not a preset ({', '.join(sorted(PRESETS))}), a Hugging Face directory with "
            "config.json, a config.json file or a .gguf file"
        )


PRESETS = {
    "llama2-7b": ModelShape(name="llama2-7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
                            head_dim=128, intermediate_size=11008, vocab_size=32000),
    "llama2-13b": ModelShape(name="llama2-13b", num_layers=40, hidden_size=5120, num_heads=40, num_kv_heads=40,
                             head_dim=128, intermediate_size=13824, vocab_size=32000),
    "llama2-70b": ModelShape(name="llama2-70b", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                             head_dim=128, intermediate_size=28672, vocab_size=32000),
    "llama3-8b": ModelShape(name="llama3-8b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                            head_dim=128, intermediate_size=14336, vocab_size=128256, pretraining_length=8192),
    "llama3-70b": ModelShape(name="llama3-70b", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                             head_dim=128, intermediate_size=28672, vocab_size=128256, pretraining_length=8192),
    # The embedded default model (pipeline.config.model.EMBEDDED_DEFAULT).
    "smollm2": ModelShape(name="smollm2", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3,
                          head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                          pretraining_length=8192),
}
PRESETS["smollm2-135m"] = PRESETS["smollm2"]


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """How a replica runs a model: the choices that change its memory."""

    # Tensor-parallel ranks (GPUs) per replica.
    tp_size: int = 1
    # Stored weight dtype: float32 | bfloat16 | float16 | int8 | int4 (int8/int4 need a weight
    # quantisation library; this project does not ship one).
    weight_dtype: str = "bfloat16"
    # Dtype of activations and attention; None = the weight dtype (bfloat16 for quantised weights).
    compute_dtype: str | None = None
    # KV cache dtype, as the jobs' --kv-cache-dtype: "auto" (= compute dtype) | float32 | bfloat16 |
    # float16 | int8 (dca/kv_quant.py).
    kv_cache_dtype: str = "auto"
    # Prompt tokens per prefill forward, as the jobs' --prefill-block: "auto" = the engine's
    # default with continuous batching (one DCA chunk, at least MIN_AUTO_PREFILL_TOKENS), "chunk"
    # = one DCA chunk of chunk_len L = S - W tokens, None = one shot, or a number.
    prefill_block: int | str | None = "auto"
    # "last": logits of the last position only; "all": every position of each forward.
    logits: str = "last"
    # DCA attention backend (DCAConfig.backend as it resolves, pipeline.config.resolve.
    # planned_attention_backend): "triton" (dca/triton_kernels.py: in-place cache writes, no
    # per-chunk partial outputs, int8 read in the kernels), "flash" (flash-attn in the chunk loop,
    # no key copies) | "torch" (the chunk loop on aten kernels; on CUDA copies key ranges).
    attention_backend: str = "flash"
    # DCA chunk_len L = chunk_size S - local_window W (query chunk of the attention kernels);
    # None = the default 5P/8 of the model (S = 3P/4, W = P/8).
    chunk_len: int | None = None
    # "cuda" or "cpu" (CPU: no runtime overhead; used to validate the model against measured RSS).
    device: str = "cuda"
    # Memory of one device in bytes (parse_bytes("a100-80g")); None = unknown (nothing fits-checked).
    device_memory: int | None = None
    # CUDA context + cuBLAS workspace, bytes per GPU (not seen by torch's allocator).
    cuda_context: int = 1 * GiB
    # NCCL buffers per GPU when tp_size > 1.
    communication_buffers: int = GiB // 2
    # Allocator fragmentation: this share of KV + activations + logits is added (CUDA).
    fragmentation: float = 0.05
    # Deprecated name of kv_cache_dtype (the field was renamed to the jobs' term); None = unused.
    kv_dtype: str | None = None

    def __post_init__(self) -> None:
        check_int_at_least("tp_size", self.tp_size, rule="an int >= 1")
        if self.weight_dtype not in WEIGHT_BYTES:
            raise ValueError(f"weight_dtype must be one of {sorted(WEIGHT_BYTES)}, got {self.weight_dtype!r}")
        compute = self.compute_dtype or (self.weight_dtype if self.weight_dtype in COMPUTE_BYTES else "bfloat16")
        if compute not in COMPUTE_BYTES:
            raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_BYTES)}, got {self.compute_dtype!r}")
        object.__setattr__(self, "compute_dtype", compute)
        if self.kv_dtype is not None:
            check_choice("kv_dtype (deprecated name of kv_cache_dtype)", self.kv_dtype, PLANNED_KV_DTYPES)
            object.__setattr__(self, "kv_cache_dtype", self.kv_dtype)
            object.__setattr__(self, "kv_dtype", None)
        check_choice("kv_cache_dtype", self.kv_cache_dtype, PLANNED_KV_DTYPES)
        check_prefill_block(self.prefill_block, rule="None (one shot), 'auto', 'chunk' or a positive int")
        if self.logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', got {self.logits!r}")
        check_choice("attention_backend", self.attention_backend, BACKENDS)
        check_choice("device", self.device, DEVICES)
        check_int_at_least("chunk_len", self.chunk_len, optional=True, rule="a positive int or None")
        if self.device_memory is not None and self.device_memory <= 0:
            raise ValueError(f"device_memory must be a positive number of bytes, got {self.device_memory!r}")
        if not 0 <= self.fragmentation < 1:
            raise ValueError(f"fragmentation must be in [0, 1), got {self.fragmentation!r}")

    @property
    def resolved_kv_dtype(self) -> str:
        return kv_cache_dtype_of(self.kv_cache_dtype, self.compute_dtype)

    def describe(self) -> str:
        block = {None: "one-shot prefill", "chunk": "chunked prefill (1 DCA chunk)",
                 "auto": f"chunked prefill (1 DCA chunk, >= {MIN_AUTO_PREFILL_TOKENS} tokens)"}.get(
            self.prefill_block, f"chunked prefill ({self.prefill_block} tokens)"
        )
        return (f"tp={self.tp_size}, weights {self.weight_dtype}, KV {self.resolved_kv_dtype}, {block}, "
                f"logits {self.logits}, attention {self.attention_backend}")

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        del values["kv_dtype"]
        return values


COMPONENTS = ("weights", "kv_cache", "activations", "logits", "runtime_overhead")


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes per GPU of one request, by component."""

    prompt_tokens: int
    new_tokens: int
    batch: int
    weights: int
    kv_cache: int
    activations: int
    logits: int
    runtime_overhead: int
    # Which phase holds the activation peak: "prefill" or "decode".
    peak_phase: str
    device_memory: int | None

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in COMPONENTS)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["total"] = self.total
        values["fits"] = self.fits
        return values

    def summary(self) -> str:
        parts = ", ".join(f"{c} {fmt_bytes(getattr(self, c))}" for c in COMPONENTS)
        return f"{fmt_bytes(self.total)} per GPU ({parts})"


class WontFit(Exception):
    """A request the planner predicts cannot fit on the device. Carries the numbers."""

    error_type = WONT_FIT

    def __init__(self, estimate: MemoryEstimate, longest_prompt: int, remedies: tuple[str, ...] = ()):
        self.estimate = estimate
        self.longest_prompt = longest_prompt
        e = estimate
        options = ", ".join(("shorten the prompt", *remedies, "more tensor-parallel GPUs"))
        super().__init__(
            f"a request of {e.prompt_tokens} prompt tokens + {e.new_tokens} new tokens at batch {e.batch} needs "
            f"{e.summary()}, but a device has {fmt_bytes(e.device_memory)}; the longest prompt that fits with "
            f"{e.new_tokens} new tokens at batch {e.batch} is {longest_prompt} tokens. Options: {options} "
            "(python -m jobs.plan --compare shows what each gives)."
        )

    def to_dict(self) -> dict:
        return {"error_type": self.error_type, "message": str(self), "longest_prompt": self.longest_prompt,
                **self.estimate.to_dict()}


class MemoryPlan:
    """Predicts the memory of requests for one model shape served with one ServingConfig."""

    def __init__(self, shape: ModelShape, config: ServingConfig):
        self.shape = shape
        self.config = config
        tp = config.tp_size
        # The rank with the most heads (uneven splits, spec section 7).
        self.q_heads = math.ceil(shape.num_heads / tp)
        self.kv_heads = math.ceil(shape.num_kv_heads / tp)
        self.intermediate = math.ceil(shape.intermediate_size / tp)
        self.act_bytes = COMPUTE_BYTES[config.compute_dtype]
        kv = config.resolved_kv_dtype
        self.kv_elem_bytes = (1 + INT8_SCALE_BYTES / shape.head_dim) if kv == "int8" else COMPUTE_BYTES[kv]
        self.chunk_len = config.chunk_len or dca_chunk_len(shape.pretraining_length)

    # --- components --------------------------------------------------------------------------

    def weight_bytes(self) -> int:
        s, c = self.shape, self.config
        wb, ab = WEIGHT_BYTES[c.weight_dtype], self.act_bytes
        embed_bytes = ab if c.weight_dtype in ("int8", "int4") else wb
        h, d, tp = s.hidden_size, s.head_dim, c.tp_size
        per_layer = (2 * h * self.q_heads * d + 2 * h * self.kv_heads * d + 3 * h * self.intermediate) * wb
        norms = (2 * s.num_layers + 1) * h * ab
        embedding = s.vocab_size * h * embed_bytes  # not split by AutoTP
        lm_head = 0 if (s.tie_word_embeddings and tp == 1) else math.ceil(s.vocab_size / tp) * h * embed_bytes
        return int(per_layer * s.num_layers + norms + embedding + lm_head)

    def kv_bytes_per_token(self) -> float:
        """KV cache bytes per token per GPU, all layers."""
        return 2 * self.shape.num_layers * self.kv_heads * self.shape.head_dim * self.kv_elem_bytes

    def kv_cache_bytes(self, tokens: int, batch: int = 1) -> int:
        return int(self.kv_bytes_per_token() * tokens * batch)

    def block_size(self, prompt_tokens: int) -> int:
        """Prompt tokens of the largest prefill forward of a `prompt_tokens` prompt."""
        block = prefill_tokens(self.config.prefill_block, self.chunk_len)
        return prompt_tokens if block is None else min(block, prompt_tokens)

    def activation_bytes(self, new: int, keys: int, batch: int = 1) -> int:
        """Peak transient bytes of one forward of `new` tokens attending to `keys` (cache included)."""
        s, c = self.shape, self.config
        a, h, d = self.act_bytes, s.hidden_size, s.head_dim
        hq, hkv = self.q_heads * d, self.kv_heads * d
        t, k = new, keys
        # Alive through the forward: RoPE cos/sin of the new tokens; through a layer: the
        # embeddings output, the layer input (held by the caller) and, in the MLP, the residual.
        rope = 2 * t * d * a
        # Appending: torch.cat holds the old keys (then the old values) of the layer next to the new
        # ones, while q, k, v and the rotated k of the new tokens are alive.
        append = t * (hq + 3 * hkv) * a + (k - t) * hkv * self.kv_elem_bytes
        # DCA (dca/attention.py), per query chunk of tq rows: 3 rotated copies of the queries, 3
        # float32 partial outputs and the merge's float32 temporaries (peak at the merge); or, while
        # the inter-chunk kernel runs, 2 finished parts, its output and (torch backend on CUDA,
        # the memory-efficient kernel) .contiguous() copies of all older keys and values.
        # flash-attn and the CPU flash kernel read key ranges of the cache as strided views.
        if c.attention_backend == "triton":
            attention = self._triton_attention_bytes(t, k)
            attn_phase = rope + 3 * t * h * a + attention  # embeddings, layer input, normed
        else:
            tq = min(t, self.chunk_len)
            merge = tq * hq * (3 * a + 6 * 4)
            torch_cuda = c.attention_backend == "torch" and c.device == "cuda"
            copies = 2 * max(0, k - 2 * self.chunk_len) * hkv * a if torch_cuda else 0
            inter = tq * hq * (3 * a + 2 * 4 + a + (4 if a != 4 else 0)) + copies
            # int8 cache: the whole layer dequantised to the compute dtype while its attention runs.
            dequant = 2 * k * hkv * a if c.resolved_kv_dtype == "int8" else 0
            # q and the preallocated output (query dtype) stay alive across the chunks.
            attention = 2 * t * hq * a + dequant + max(merge, inter)
            attn_phase = rope + 3 * t * h * a + max(append, attention)  # embeddings, layer input, normed
        # MLP: act(gate), up and their product are alive at once.
        mlp_phase = rope + 4 * t * h * a + 3 * t * self.intermediate * a
        return int(batch * max(attn_phase, mlp_phase))

    def _triton_attention_bytes(self, new: int, keys: int) -> int:
        """One layer's attention on the Triton backend (dca/triton_kernels.py via
        dca.backends.TritonBackend), `new` tokens against `keys` keys (theirs included).

        The store kernel rotates the new keys at j mod L and writes them (and the values, int8
        with their scales where used) straight into the cache's preallocated storage: no torch.cat,
        no rotated copy. The attention kernels rotate the queries in registers, keep one online
        softmax per query row (no per-chunk partial outputs, no merge) and read int8 keys and
        values with their scales (no dequantised copy). Alive while the kernel runs: the q, k, v
        projections of the new tokens, the layer's (T, Hq, D) output buffer, the kernel's own
        output (copied into that buffer until the kernels take `out=`; an over-estimate of one
        (T, Hq, D) tensor afterwards), and for a decode launch (at most TRITON_DECODE_MAX_QUERIES
        new tokens) the split-KV partial outputs and LSEs in float32: (Hq, T, splits, D + 1) with
        splits at most min(TRITON_DECODE_MAX_SPLITS, key blocks); the real count also divides
        2 x the GPU's SMs between rows and KV heads, which the planner does not know (an upper
        bound: 4.2 MiB for 32 query heads of dim 128 and one new token)."""
        a, d = self.act_bytes, self.shape.head_dim
        hq, hkv = self.q_heads * d, self.kv_heads * d
        group = self.q_heads // self.kv_heads if self.kv_heads else 1
        projections = new * (hq + 2 * hkv) * a
        outputs = 2 * new * hq * a
        partials = 0
        if new <= TRITON_DECODE_MAX_QUERIES and group * new <= TRITON_DECODE_MAX_ROWS:
            splits = min(TRITON_DECODE_MAX_SPLITS, max(1, math.ceil(keys / TRITON_DECODE_BLOCK_N)))
            partials = new * splits * (hq + self.q_heads) * 4
        return projections + outputs + partials

    def logits_bytes(self, forward_tokens: int, batch: int = 1) -> int:
        v, a = self.shape.vocab_size, self.act_bytes
        kept = forward_tokens if self.config.logits == "all" else 1
        # lm_head output in the compute dtype, and a float32 copy of the last row for sampling.
        return int(batch * (kept * v * a + v * 4))

    # --- the plan ----------------------------------------------------------------------------

    def estimate(self, prompt_tokens: int, new_tokens: int = 0, batch: int = 1) -> MemoryEstimate:
        """Predicted peak memory per GPU for `batch` prompts of `prompt_tokens` plus `new_tokens` each."""
        check_int_at_least("prompt_tokens", prompt_tokens, 1, rule="an int >= 1")
        check_int_at_least("new_tokens", new_tokens, 0, rule="an int >= 0")
        check_int_at_least("batch", batch, 1, rule="an int >= 1")
        block = self.block_size(prompt_tokens)
        prefill = self.activation_bytes(block, prompt_tokens, batch)
        decode = self.activation_bytes(1, prompt_tokens + new_tokens, batch) if new_tokens else 0
        activations = max(prefill, decode)
        logits = self.logits_bytes(block, batch)
        kv = self.kv_cache_bytes(prompt_tokens + new_tokens, batch)
        overhead = 0
        if self.config.device == "cuda":
            overhead = self.config.cuda_context + (self.config.communication_buffers if self.config.tp_size > 1 else 0)
            overhead += int(self.config.fragmentation * (kv + activations + logits))
        return MemoryEstimate(
            prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch=batch,
            weights=self.weight_bytes(), kv_cache=kv, activations=activations, logits=logits,
            runtime_overhead=overhead, peak_phase="prefill" if prefill >= decode else "decode",
            device_memory=self.config.device_memory,
        )

    def fits(self, prompt_tokens: int, new_tokens: int = 0, batch: int = 1) -> bool:
        if self.config.device_memory is None:
            raise ValueError("this plan has no device_memory: set ServingConfig.device_memory to check fits")
        return self.estimate(prompt_tokens, new_tokens, batch).total <= self.config.device_memory

    def kv_budget(self, step_tokens: int, context_tokens: int, rows: int = 1) -> int:
        """KV cache bytes per GPU a running batch may hold (continuous batching): what is left of
        the device beside the weights, the runtime overhead, and the transients of one packed
        step of `step_tokens` tokens (a prefill block plus a decode token per row) attending to
        `context_tokens` keys, with logits at `rows` positions; 0 when nothing is left. Same
        components as `estimate`, solved for the KV cache (the plan needs device_memory)."""
        c = self.config
        if c.device_memory is None:
            raise ValueError("this plan has no device_memory: set ServingConfig.device_memory for a KV budget")
        activations = self.activation_bytes(max(1, step_tokens), max(1, context_tokens))
        v, a = self.shape.vocab_size, self.act_bytes
        logits = rows * (v * a + v * 4)
        fixed = self.weight_bytes()
        fragmentation = 0.0
        if c.device == "cuda":
            fixed += c.cuda_context + (c.communication_buffers if c.tp_size > 1 else 0)
            fragmentation = c.fragmentation
        return max(0, int((c.device_memory - fixed) / (1 + fragmentation)) - activations - logits)

    def check(self, prompt_tokens: int, new_tokens: int = 0, batch: int = 1) -> MemoryEstimate:
        """The estimate when the request fits; raises WontFit (with the numbers) when it does not."""
        estimate = self.estimate(prompt_tokens, new_tokens, batch)
        if estimate.fits is False:
            raise WontFit(estimate, self.longest_prompt(new_tokens, batch), self._remedies(batch))
        return estimate

    def _remedies(self, batch: int) -> tuple[str, ...]:
        c, out = self.config, []
        if batch > 1:
            out.append("a smaller batch")
        if c.resolved_kv_dtype != "int8":
            out.append("the int8 KV cache (--kv-cache-dtype int8)")
        if c.prefill_block is None:
            out.append("chunked prefill (--prefill-block chunk)")
        if c.logits == "all":
            out.append("last-position logits only")
        return tuple(out)

    def longest_prompt(self, new_tokens: int = 0, batch: int = 1, limit: int = 1 << 24) -> int:
        """The largest prompt (tokens) that fits with `new_tokens` at `batch`; 0 if none does."""
        if not self.fits(1, new_tokens, batch):
            return 0
        lo, hi = 1, limit
        if self.fits(hi, new_tokens, batch):
            return hi
        while hi - lo > 1:  # memory grows with the prompt: bisect
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.fits(mid, new_tokens, batch) else (lo, mid)
        return lo

    def format_table(self, prompt_tokens: int, new_tokens: int = 0, batch: int = 1) -> str:
        """A printable table of the estimate (what a job prints at start)."""
        e = self.estimate(prompt_tokens, new_tokens, batch)
        s = self.shape
        lines = [
            f"memory plan: {s.name} ({s.num_parameters / 1e9:.2f}B params, {s.num_layers} layers, "
            f"{s.num_kv_heads} kv heads x {s.head_dim}), {self.config.describe()}",
            f"request: {prompt_tokens} prompt + {new_tokens} new tokens, batch {batch}; "
            f"prefill block {self.block_size(prompt_tokens)} tokens"
            f"{' (DCA chunk_len L)' if self.block_size(prompt_tokens) == self.chunk_len else ''}; "
            f"peak activations in {e.peak_phase}",
            f"KV cache: {fmt_bytes(self.kv_bytes_per_token())} per token per GPU",
            "",
            f"{'component':<18} {'per GPU':>12}",
        ]
        for c in COMPONENTS:
            lines.append(f"{c:<18} {fmt_bytes(getattr(e, c)):>12}")
        lines.append(f"{'total':<18} {fmt_bytes(e.total):>12}")
        if e.device_memory is not None:
            verdict = "fits" if e.fits else "DOES NOT FIT"
            lines.append(f"{'device':<18} {fmt_bytes(e.device_memory):>12}  -> {verdict}")
            lines.append(f"longest prompt that fits with {new_tokens} new tokens at batch {batch}: "
                         f"{self.longest_prompt(new_tokens, batch)} tokens")
        return "\n".join(lines)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / KiB:.1f} KiB"


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": KiB, "m": 10**6, "mb": 10**6, "mib": MiB,
          "g": 10**9, "gb": 10**9, "gib": GiB, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """'80GiB', '79.2 GiB', '85e9', '40GB', or a device name (see DEVICE_MEMORY) -> bytes."""
    if isinstance(text, int):
        return text
    key = text.strip().lower()
    if key in DEVICE_MEMORY:
        return DEVICE_MEMORY[key]
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", key)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(
            f"cannot read memory size {text!r}: use e.g. '80GiB', '40GB', a number of bytes, or one of "
            f"{sorted(DEVICE_MEMORY)}"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2)])

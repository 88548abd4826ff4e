"""An int8 KV cache: one float32 scale per (token, head), dequantised for the attention that reads it.

Keys (already rotated at j mod L, spec section 4) and values are stored as symmetric int8 with
scale = max|x| / 127 over the head_dim of each (batch row, kv head, token): 1 + 4/D bytes per
element instead of 2 (bf16) or 4 (fp32), 0.52x of bf16 at D = 128. A token's scale depends on
that token only, so appending never re-quantises older tokens and the stored cache is the same
whatever block sizes filled it (one-shot and chunked prefill give the same cache, bit for bit).

`Int8KVCache` is a transformers `Cache`: pass it as `past_key_values=` to a forward or to
`generate`. Every `update` returns the layer's WHOLE cache dequantised to the model dtype, the
new tokens included (so a prefill block attends to exactly what later decode steps will see).
That costs transient memory: one layer's K and V in the model dtype while that layer's
attention runs (the memory planner counts it, `pipeline/memory_plan.py`). On the Triton backend
(the default on CUDA) an empty Int8KVCache is adopted by dca/cache.py: the same int8 format in
preallocated buffers, dequantised per key block inside the attention kernels, with no such copy.

With dca/cache.py, one of the two modules of `dca` besides `dca.hf` that depend on transformers
(its Cache base classes).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

INT8_MAX = 127
SCALE_DTYPE = torch.float32


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, T, D) float -> (int8 (B, H, T, D), scale (B, H, T, 1) float32), x ~= q * scale."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=torch.finfo(SCALE_DTYPE).tiny)
    q = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(int8 (B, H, T, D), scale (B, H, T, 1)) -> (B, H, T, D) in dtype, one allocation of that size."""
    out = q.to(dtype)
    return out.mul_(scale.to(dtype))


class BatchOpsByMap:
    """For cache layers that keep their own tensors instead of DynamicLayer's keys and values:
    the batch-wise operations transformers calls (beam reorder, repeat, select, offload), applying
    one function to all of them with `_map`, and a first-update initialisation that keeps only
    empty placeholders in `keys`/`values`."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        # Empty placeholders: transformers code that inspects `keys` sees dtype and device
        # without a full-precision copy being kept.
        self.keys = key_states.new_empty((0,))
        self.values = value_states.new_empty((0,))
        self.is_initialized = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))


class Int8KVLayer(BatchOpsByMap, DynamicLayer):
    """One layer's int8 keys and values with their per-(token, head) scales."""

    is_croppable = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cumulative_length = 0
        self.dtype: torch.dtype | None = None
        # (int8 (B, Hkv, T, D), scale (B, Hkv, T, 1)) for keys and for values
        self._keys: tuple[torch.Tensor, torch.Tensor] | None = None
        self._values: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_k, new_v = quantize_int8(key_states), quantize_int8(value_states)
        if self._keys is None:
            self._keys, self._values = new_k, new_v
        else:
            self._keys = tuple(torch.cat([old, new], dim=-2) for old, new in zip(self._keys, new_k))
            self._values = tuple(torch.cat([old, new], dim=-2) for old, new in zip(self._values, new_v))
        self.cumulative_length += key_states.shape[-2]
        return dequantize_int8(*self._keys, self.dtype), dequantize_int8(*self._values, self.dtype)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        """Bytes held (int8 data and scales)."""
        if self._keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values))

    def reset(self) -> None:
        super().reset()
        self._keys = self._values = None
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or self._keys is None:
            return
        keep = self.cumulative_length + tokens_to_remove
        self._keys = tuple(t[..., :keep, :] for t in self._keys)
        self._values = tuple(t[..., :keep, :] for t in self._values)
        self.cumulative_length = keep

    def _map(self, fn) -> None:
        if self._keys is not None:
            self._keys = tuple(fn(t) for t in self._keys)
            self._values = tuple(fn(t) for t in self._values)

    def prefetch(self):
        if self._keys is not None and self._keys[0].device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class Int8KVCache(Cache):
    """KV cache storing int8 keys/values with per-(token, head) scales; layers are created lazily.

        cache = Int8KVCache()
        out = model(input_ids, past_key_values=cache, use_cache=True)
        model.generate(input_ids, past_key_values=Int8KVCache(), max_new_tokens=32)
    """

    def __init__(self):
        super().__init__(layer_class_to_replicate=Int8KVLayer)

    def nbytes(self) -> int:
        """Bytes of the stored cache over all layers (int8 data + scales)."""
        return sum(layer.nbytes() for layer in self.layers)


def int8_bytes_per_element(head_dim: int) -> float:
    """Stored bytes per cached element: 1 (int8) + the per-(token, head) float32 scale spread over D."""
    return 1.0 + torch.finfo(SCALE_DTYPE).bits / 8 / head_dim

"""Per-row KV cache slots for continuous batching (rank side; imports torch).

Every output row of the running batch owns one `RowKV`: for each layer, keys and values for
`capacity` tokens (its prompt plus max_new_tokens), allocated once at the layer's first write and
never grown or copied after, filled to that layer's length. Rows come and go independently:
admitting a row allocates its slot, a finished row frees it at once. `PackedRows` presents the
rows of one step to the model as a single packed sequence (`dca.hf`'s `packed_rows` hook): each
row's tokens are appended to its own slot and attend to it alone, unpadded.

Why slots per row and not one (batch, heads, max_len, dim) tensor: a long-document corpus mixes
1k and 100k prompts, so padding every row to the longest would waste most of the memory the
planner admits requests against. A slot is exactly (1, Hkv, capacity, D) per layer, the shape a
preallocated static cache with per-row lengths has; when `dca` grows such a cache and a kernel
that reads per-row lengths (the kernels issue), a slot becomes a view into it and the packed
forward one kernel call per layer instead of a loop over rows.

int8 (`kv_cache_dtype="int8"`): the slot stores int8 values with one float32 scale per (token,
head) (`dca.kv_quant`), and `update` returns the row's keys and values dequantised to the model
dtype, as `dca.kv_quant.Int8KVCache` does.
"""

from __future__ import annotations

import functools
import inspect

import torch


class RowKV:
    """One row's KV cache: per layer, preallocated storage for `capacity` tokens.

    Duck-types the part of a transformers Cache that `dca.hf.DCAAttention` uses
    (`get_seq_length`, `update`, `dca_prompt_length`)."""

    def __init__(self, num_layers: int, capacity: int, kv_dtype: str = "auto"):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 token, got {capacity}")
        if kv_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_dtype must be 'auto' or 'int8', got {kv_dtype!r}")
        self.capacity = capacity
        self.kv_dtype = kv_dtype
        self.lengths = [0] * num_layers
        # auto: (1, Hkv, capacity, D) tensors; int8: (int8 data, float32 scales (1, Hkv, capacity, 1)).
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers
        self.dtype: torch.dtype | None = None
        # n of DCA's attention temperature (the request's prompt length), a (1,) tensor.
        self.dca_prompt_length: torch.Tensor | None = None

    # -- the Cache interface DCA uses ------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Appends key/value (1, Hkv, T, D) to the layer; -> the row's keys and values so far."""
        n, t = self.lengths[layer_idx], key.shape[-2]
        if n + t > self.capacity:
            raise ValueError(f"row KV slot overflow: {n} + {t} tokens > capacity {self.capacity}")
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = self._allocate(key)
            self.values[layer_idx] = self._allocate(value)
        self.lengths[layer_idx] = n + t
        if self.kv_dtype == "int8":
            from dca.kv_quant import dequantize_int8, quantize_int8

            for store, new in ((self.keys[layer_idx], key), (self.values[layer_idx], value)):
                data, scale = quantize_int8(new)
                store[0][:, :, n : n + t] = data
                store[1][:, :, n : n + t] = scale
            k, v = self.keys[layer_idx], self.values[layer_idx]
            return (dequantize_int8(k[0][:, :, : n + t], k[1][:, :, : n + t], self.dtype),
                    dequantize_int8(v[0][:, :, : n + t], v[1][:, :, : n + t], self.dtype))
        self.keys[layer_idx][:, :, n : n + t] = key
        self.values[layer_idx][:, :, n : n + t] = value
        return self.keys[layer_idx][:, :, : n + t], self.values[layer_idx][:, :, : n + t]

    def _allocate(self, like: torch.Tensor):
        self.dtype = like.dtype
        shape = (like.shape[0], like.shape[1], self.capacity, like.shape[3])  # (1, Hkv, capacity, D)
        if self.kv_dtype == "int8":
            from dca.kv_quant import SCALE_DTYPE

            return (torch.empty(shape, dtype=torch.int8, device=like.device),
                    torch.empty((*shape[:3], 1), dtype=SCALE_DTYPE, device=like.device))
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    # -- slot management -------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Tokens every layer holds (layers differ only inside a forward that failed)."""
        return min(self.lengths)

    def rollback(self, length: int) -> None:
        """Forgets everything past `length` tokens in every layer (after a forward that failed
        half way, e.g. out of memory: some layers had appended, others not)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def fill_from(self, other: RowKV) -> None:
        """Copies another row's cache (a shared QA prefix) into this empty slot."""
        if any(self.lengths) or other.length > self.capacity:
            raise ValueError("fill_from needs an empty slot at least as large as the source")
        n = other.length
        for layer, (k, v) in enumerate(zip(other.keys, other.values)):
            if k is None:
                continue
            if self.keys[layer] is None:
                self.keys[layer] = _empty_like_slot(k, self.capacity)
                self.values[layer] = _empty_like_slot(v, self.capacity)
            for dst, src in ((self.keys[layer], k), (self.values[layer], v)):
                for d, s in zip(_parts(dst), _parts(src)):
                    d[:, :, :n] = s[:, :, :n]
            self.lengths[layer] = n
        self.dtype = other.dtype
        self.dca_prompt_length = other.dca_prompt_length

    def nbytes(self) -> int:
        """Bytes allocated (the whole capacity of every layer written so far)."""
        return sum(t.numel() * t.element_size() for store in (*self.keys, *self.values) if store is not None
                   for t in _parts(store))

    def free(self) -> None:
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.lengths = [0] * len(self.lengths)


def _parts(store) -> tuple:
    return store if isinstance(store, tuple) else (store,)


def _empty_like_slot(store, capacity: int):
    if isinstance(store, tuple):
        return tuple(_empty_like_slot(t, capacity) for t in store)
    shape = list(store.shape)
    shape[2] = capacity
    return torch.empty(shape, dtype=store.dtype, device=store.device)


class PackedRows:
    """The cache argument of one packed forward: segment i of the (1, T) input continues row i.

    `packed_rows`: [(RowKV, start, stop)] in input order, covering the input without gaps."""

    def __init__(self, segments: list[tuple[RowKV, int, int]]):
        self.packed_rows = segments

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Only consulted by a model that is not DCA's (none reaches here): the packed input's
        # positions are passed explicitly.
        return 0


@functools.cache
def cache_argument(model_class: type) -> str:
    """The keyword a model's forward takes its cache by: transformers renamed `past_key_values` to
    `cache` during 5.x; use what this version takes."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"

"""A preallocated KV cache for DCA: one buffer per layer, written in place, never concatenated.

`StaticKVCache` is a transformers `Cache`: pass it as `cache=` / `past_key_values=` to a forward,
to `generate` or to `dca.prefill.chunked_prefill`. Each layer holds keys (rotated at j mod L,
spec section 4) and values in buffers of shape (B, Hkv, capacity, D), in the model dtype or as
int8 with one float32 scale per (row, head, token) (the format of dca/kv_quant.py). Slot s of
row b holds position s of the batch: left-padded rows keep their pads in the first slots, and
the per-row start is recorded in the cache's dca.state.CacheState (a field of StaticKVCache), so a
row's length is `length - start`.

- `max_tokens=N`: the buffers hold exactly N tokens from the first forward on (static shape: a
  decode step that writes into them can be captured in a CUDA graph); more raises.
- `max_tokens=None`: the buffers grow in steps (the first to the prompt length given by
  `dca.prefill.chunked_prefill`, then by ~3%), copying what they hold, so a long decode
  reallocates every few thousand tokens instead of copying the whole cache at every step as
  DynamicCache's torch.cat does.

On the Triton backend (the default on CUDA) the DCA layers write new tokens with one kernel
(rotation, int8 quantisation, the write at a device-side position) and the attention kernels read
the buffers directly, int8 included: nothing is dequantised outside the kernels. On the torch
backend `update` returns views of the filled part (dequantised for int8), as DynamicCache and
Int8KVCache do.

The Triton path also takes over an EMPTY DynamicCache or Int8KVCache passed to it
(`writes_in_place`, `in_place_layer`): their layers are replaced by growable `StaticKVLayer`s of the
same storage, so callers that build those caches get the in-place buffers without a change. Row
caches with the slot layout (`has_slot_layout`: the engine's per-row caches) are written in place
too, through `SlotLayer`.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from dca.kv_quant import BatchOpsByMap, Int8KVCache, Int8KVLayer, dequantize_int8, quantize_int8
from dca.state import CacheState

KV_DTYPES = ("auto", "int8")
# Capacity granularity in tokens, and the growth step of growable buffers (1/32 of the length).
_ALIGN = 256
_GROWTH_DIVISOR = 32


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class StaticKVLayer(BatchOpsByMap, DynamicLayer):
    """One layer's preallocated keys and values, `length` tokens of them filled."""

    is_croppable = True

    def __init__(self, max_tokens: int | None = None, kv_dtype: str = "auto"):
        super().__init__()
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        self.max_tokens = max_tokens
        self.kv_dtype = kv_dtype
        self.length = 0
        self.dtype: torch.dtype | None = None
        self.k: torch.Tensor | None = None  # (B, Hkv, capacity, D), model dtype or int8
        self.v: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None  # (B, Hkv, capacity) float32, int8 only
        self.v_scale: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def reserve(self, key_states: torch.Tensor, needed: int, hint: int | None = None):
        """Room for `needed` tokens in all; returns (k, v, k_scale, v_scale) buffers.

        key_states (B, Hkv, T, D) gives the shape, dtype and device. `hint` is the length the
        cache is expected to reach (the prompt); growable buffers allocate at least that.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, key_states)
        b, h, _, d = key_states.shape
        if self.k is not None and (self.k.shape[0], self.k.shape[1], self.k.shape[3]) != (b, h, d):
            raise ValueError(
                f"this cache holds (batch, kv heads, head_dim) = {(self.k.shape[0], self.k.shape[1], self.k.shape[3])}, "
                f"got new states of {(b, h, d)}"
            )
        if needed > self.capacity:
            if self.max_tokens is not None:
                if needed > self.max_tokens:
                    raise ValueError(
                        f"StaticKVCache(max_tokens={self.max_tokens}) is full: {needed} tokens needed; "
                        "build it with the prompt plus the new tokens, or max_tokens=None to let it grow"
                    )
                capacity = self.max_tokens
            else:
                target = max(needed, hint or 0)
                capacity = _round_up(target + max(_ALIGN, target // _GROWTH_DIVISOR), _ALIGN)
            self._grow(b, h, d, capacity)
        return self.k, self.v, self.k_scale, self.v_scale

    def _grow(self, b: int, h: int, d: int, capacity: int) -> None:
        storage = torch.int8 if self.kv_dtype == "int8" else self.dtype
        n = self.length
        k = torch.zeros(b, h, capacity, d, dtype=storage, device=self.device)
        v = torch.zeros_like(k)
        if n:
            k[:, :, :n] = self.k[:, :, :n]
            v[:, :, :n] = self.v[:, :, :n]
        self.k, self.v = k, v
        if self.kv_dtype == "int8":
            ks = torch.zeros(b, h, capacity, dtype=torch.float32, device=self.device)
            vs = torch.zeros_like(ks)
            if n:
                ks[:, :, :n] = self.k_scale[:, :, :n]
                vs[:, :, :n] = self.v_scale[:, :, :n]
            self.k_scale, self.v_scale = ks, vs

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends (keys already rotated) and returns the filled part: views, or dequantised for int8."""
        t = key_states.shape[-2]
        start = self.length
        self.reserve(key_states, start + t)
        if self.kv_dtype == "int8":
            (kq, ks), (vq, vs) = quantize_int8(key_states), quantize_int8(value_states)
            self.k[:, :, start : start + t] = kq
            self.v[:, :, start : start + t] = vq
            self.k_scale[:, :, start : start + t] = ks[..., 0]
            self.v_scale[:, :, start : start + t] = vs[..., 0]
        else:
            self.k[:, :, start : start + t] = key_states
            self.v[:, :, start : start + t] = value_states
        self.length = start + t
        return self.filled()

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.length
        if self.kv_dtype == "int8":
            return (dequantize_int8(*self._keys, self.dtype), dequantize_int8(*self._values, self.dtype))
        return self.k[:, :, :n], self.v[:, :, :n]

    # Int8KVLayer's view of the stored data: (int8 (B, H, T, D), scale (B, H, T, 1)).
    @property
    def _keys(self):
        n = self.length
        return (self.k[:, :, :n], self.k_scale[:, :, :n, None]) if self.k is not None else None

    @property
    def _values(self):
        n = self.length
        return (self.v[:, :, :n], self.v_scale[:, :, :n, None]) if self.v is not None else None

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_tokens if self.max_tokens is not None else -1

    def nbytes(self) -> int:
        """Bytes allocated (the whole capacity, scales included)."""
        tensors = (self.k, self.v, self.k_scale, self.v_scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def reset(self) -> None:
        self.length = 0  # the buffers stay allocated

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)

    def _map(self, fn) -> None:
        for name in ("k", "v", "k_scale", "v_scale"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def prefetch(self):
        if self.k is not None and self.k.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class StaticKVCache(Cache):
    """Preallocated KV cache (see the module docstring); layers are created at their first update.

        cache = StaticKVCache(max_tokens=prompt + new_tokens)          # model dtype
        cache = StaticKVCache(max_tokens=prompt + new_tokens, kv_dtype="int8")
        model.generate(input_ids, past_key_values=cache, max_new_tokens=new_tokens)
    """

    def __init__(self, max_tokens: int | None = None, kv_dtype: str = "auto"):
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        self.max_tokens = max_tokens
        self.kv_dtype = kv_dtype
        # DCA's bookkeeping of this cache (dca.state): a field, so that a copy of the cache
        # carries it (the per-row starts recorded at the prefill included).
        self.dca_cache_state = CacheState()
        super().__init__(layer_class_to_replicate=functools.partial(StaticKVLayer, max_tokens, kv_dtype))

    def nbytes(self) -> int:
        """Bytes allocated over all layers."""
        return sum(layer.nbytes() for layer in self.layers)


def kv_dtype_of(cache) -> str:
    """"auto" or "int8": how a cache stores keys and values (an Int8KVCache, or a cache with a
    `kv_dtype` field: StaticKVCache, the engine's row caches); "auto" for anything else."""
    if isinstance(cache, Int8KVCache):
        return "int8"
    kv_dtype = getattr(cache, "kv_dtype", "auto")
    return kv_dtype if kv_dtype in KV_DTYPES else "auto"


def adoptable(cache) -> bool:
    """An empty DynamicCache or Int8KVCache, whose layers `in_place_layer` may replace."""
    return type(cache) in (DynamicCache, Int8KVCache) and cache.get_seq_length() == 0


def _holds_static_layers(cache) -> bool:
    """A DynamicCache / Int8KVCache adopted earlier (e.g. a copy of one: the copy has no DCA state)."""
    return type(cache) in (DynamicCache, Int8KVCache) and any(isinstance(layer, StaticKVLayer) for layer in cache.layers)


def writes_in_place(cache, state) -> bool:
    """Whether the Triton path writes `cache` in place (`in_place_layer` returns its layers).

    state: the cache's dca.state.CacheState; its `adopted` flag is decided here at the cache's
    first DCA forward (an empty DynamicCache / Int8KVCache is adopted; one filled by another
    path is not)."""
    if isinstance(cache, StaticKVCache) or has_slot_layout(cache):
        return True
    if state.adopted is None:
        state.adopted = adoptable(cache) or _holds_static_layers(cache)
    return state.adopted


def in_place_layer(cache, layer_idx: int, state):
    """The storage of one layer of a cache the Triton path writes in place, or None.

    Returns an object with `length` (tokens filled, settable) and `reserve(key_states, needed,
    hint) -> (k, v, k_scale, v_scale)` (buffers (B, Hkv, capacity, D), model dtype or int8 with
    (B, Hkv, capacity) float32 scales): a StaticKVLayer for a StaticKVCache or an adopted
    DynamicCache / Int8KVCache (created here), a `SlotLayer` for a row cache with the slot layout
    (`has_slot_layout`). None for any other cache (its own `update` is used)."""
    if isinstance(cache, StaticKVCache):
        while len(cache.layers) <= layer_idx:
            cache.layers.append(cache.layer_class_to_replicate())
        return cache.layers[layer_idx]
    if has_slot_layout(cache):
        return SlotLayer(cache, layer_idx)
    if not writes_in_place(cache, state):
        return None
    kv_dtype = "int8" if isinstance(cache, Int8KVCache) else "auto"
    while len(cache.layers) <= layer_idx:
        cache.layers.append(StaticKVLayer(kv_dtype=kv_dtype))
    layer = cache.layers[layer_idx]
    if isinstance(layer, StaticKVLayer):
        return layer
    if type(layer) in (DynamicLayer, Int8KVLayer) and layer.get_seq_length() == 0:
        cache.layers[layer_idx] = StaticKVLayer(kv_dtype=kv_dtype)
        return cache.layers[layer_idx]
    raise RuntimeError(f"layer {layer_idx} of this {type(cache).__name__} was filled outside DCA; use one cache per model")


# --- row caches with the slot layout -----------------------------------------------------------
#
# The engine's continuous batching gives each row its own cache object (pipeline.engine.kv_cache
# .RowKV), duck-typed: `get_seq_length(layer)`, `update(k, v, layer)` returning the row's WHOLE
# keys and values (dequantised for int8), `dca_prompt_length`. Going through `update` on the
# Triton path would dequantise an int8 row whole at every step and layer. Such a cache that also
# exposes its storage in the slot layout below is written in place by the cache-write kernel and
# read by the attention kernels directly (int8 dequantised inside them), like a StaticKVLayer.


def has_slot_layout(cache) -> bool:
    """A row cache exposing its storage in the slot layout, public fields:

        capacity: int                 tokens each layer's storage holds
        kv_dtype: "auto" | "int8"
        lengths: list[int]            tokens filled, per layer
        keys, values: list            per layer, None until the layer's first write, then
                                      "auto": a (1, Hkv, capacity, D) tensor in the model dtype,
                                      "int8": (int8 (1, Hkv, capacity, D), float32 scales
                                      (1, Hkv, capacity, 1)), dca.kv_quant's format
        update(k, v, layer_idx)       allocates a layer's storage at its first call (also for
                                      zero new tokens)

    pipeline.engine.kv_cache.RowKV has it."""
    return (
        not isinstance(cache, Cache)
        and isinstance(getattr(cache, "lengths", None), list)
        and isinstance(getattr(cache, "keys", None), list)
        and isinstance(getattr(cache, "values", None), list)
        and isinstance(getattr(cache, "capacity", None), int)
        and getattr(cache, "kv_dtype", None) in KV_DTYPES
    )


class SlotLayer:
    """One layer of a slot-layout row cache, seen as the Triton path sees a StaticKVLayer."""

    def __init__(self, cache, layer_idx: int):
        self.cache = cache
        self.layer_idx = layer_idx

    @property
    def length(self) -> int:
        return self.cache.lengths[self.layer_idx]

    @length.setter
    def length(self, value: int) -> None:
        self.cache.lengths[self.layer_idx] = value

    def reserve(self, key_states: torch.Tensor, needed: int, hint: int | None = None):
        """The layer's whole storage (k, v, k_scale, v_scale), allocated by the cache itself at
        the first write; `needed` tokens must fit its capacity."""
        cache, layer = self.cache, self.layer_idx
        if needed > cache.capacity:
            raise ValueError(f"row KV slot overflow: {needed} tokens > capacity {cache.capacity}")
        if cache.keys[layer] is None:
            empty = key_states[:, :, :0]  # (1, Hkv, 0, D): the cache allocates, nothing is written
            cache.update(empty, empty, layer)
        k, v = cache.keys[layer], cache.values[layer]
        if isinstance(k, tuple):  # int8 data and (1, Hkv, capacity, 1) scales
            return k[0], v[0], k[1][..., 0], v[1][..., 0]
        return k, v, None, None

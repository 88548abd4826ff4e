"""The DCA backends: one object per (device, dtype, KV dtype) that the DCA layers call.

A backend is chosen once per model, device, dtype and KV dtype (`select`), from the configured
name (`DCAConfig.backend`, resolved by `dca.kernels.resolve_backend`) and, on CUDA, a start-up
self-check of the kernels against the torch backend (`dca.selfcheck`); a backend that fails it is
replaced by the next one that can run (flash where installed, else torch) unless it was asked for
by name. `BackendReport` says what was asked for, what ran, and why.

The contract the layers (dca/hf.py) rely on, per forward and per layer:

    forward = backend.begin_forward(inputs)          # once per forward (the first layer)
    kv = backend.write(forward, layer_idx, key, value)   # per layer: the cache write
    backend.attend(forward, query, kv, out)          # per layer: DCA of the new queries

and for a packed forward (continuous batching: one sequence holding several rows, each with
its own cache, `packed_rows` in dca/hf.py):

    packed = backend.begin_packed(inputs, rows)      # once per forward
    backend.attend_packed(packed, layer_idx, query, key, value, out)   # per layer

`attention(...)` is DCA on plain tensors (`dca.backends.dca_attention`). Shapes: B rows, Hq query
heads, Hkv key/value heads (Hq a multiple of Hkv), T new tokens, D head_dim, C cache slots.

Nothing outside this module and `dca.kernels.resolve_backend` tests a backend's name: the layers
call these methods, and the few capabilities that differ are attributes (`left_padding_only`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from dca import kernels, positions
from dca.attention import RopeTable, chunked_dca, decode_queries, decode_row, rotate_keys
from dca.state import CacheState, cache_state, prompt_length_of



class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run here (not installed, wrong device or dtype, or its
    start-up self-check failed). The message says why."""


@dataclass(frozen=True)
class BackendKey:
    """What a backend is chosen for: the model's device and dtype, and how the KV cache stores
    keys and values ("auto": the model dtype, "int8": dca.kv_quant's format)."""

    device: torch.device
    dtype: torch.dtype
    kv_dtype: str = "auto"

    @staticmethod
    def of(query: torch.Tensor, key: torch.Tensor) -> BackendKey:
        return BackendKey(query.device, query.dtype, "int8" if key.dtype == torch.int8 else "auto")


@dataclass(frozen=True, kw_only=True)
class BackendReport:
    """Which DCA backend runs for one (device, dtype, KV dtype), and why (`dca.backend_report`).

    requested        DCAConfig.backend: "auto" | "torch" | "flash" | "triton"
    chosen           what that resolved to on this device and dtype, before the self-check
    ran              the backend that runs
    fallback_reason  why `ran` differs from `chosen` (the self-check's finding), else None
    checked          a start-up self-check ran for this key (it passed when fallback_reason is
                     None); False for the torch backend (the reference) and where no check is
                     required (CPU, `dca.selfcheck.required`)
    device, dtype    e.g. "cuda:0", "bfloat16"
    kv_dtype         "auto" | "int8"
    check_seconds    wall time of the self-check(s) in this process, None when none ran here
                     (also when an earlier model of the process ran it for the same key)
    """

    requested: str
    chosen: str
    ran: str
    fallback_reason: str | None
    checked: bool
    device: str
    dtype: str
    kv_dtype: str
    check_seconds: float | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready values (for a manifest, _metrics.json, output rows)."""
        return asdict(self)


# --- what a forward gives the backend, and what the backend keeps per forward ------------------


@dataclass(frozen=True, kw_only=True)
class ForwardInputs:
    """One forward as the DCA layers see it (built once per forward by dca/hf.py).

    cache         the KV cache object (transformers Cache, StaticKVCache, a row cache) or None
    padding_mask  (B, past + T) 0/1 of the whole sequence, already checked 2D and of that length
                  (and left-padded, for CPU masks, where the backend is `left_padding_only`); or None
    position_ids  (B or 1, T) or None
    past          tokens the cache held before this forward (host)
    scaling       the model's softmax scale (head_dim ** -0.5)
    rope          the model's rotary table at DCA's ids (dca.attention.RopeTable)
    """

    cache: object | None
    padding_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    bsz: int
    q_len: int
    past: int
    device: torch.device
    scaling: float
    rope: RopeTable


@dataclass(kw_only=True, eq=False)
class ForwardState:
    """Bookkeeping shared by every layer of one forward; each backend extends it."""

    inputs: ForwardInputs
    # Layers that used it: a layer seen again means a new forward (layers called directly).
    layers: set = field(default_factory=set)


@dataclass(kw_only=True, eq=False)
class LayerKV:
    """What attention reads for one layer: keys rotated at j mod L and values.

    keys, values  (B, Hkv, C, D): the model dtype, or int8 with key_scale, value_scale
                  (B, Hkv, C) float32 (one scale per (row, head, token), dca.kv_quant's format)
    length        slots filled; C >= length (C > length: an in-place cache's spare capacity)
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of the filled slots, (B, Hkv, length, D) in `dtype` (dequantised)."""
        n = self.length
        k, v = self.keys[:, :, :n].to(dtype), self.values[:, :, :n].to(dtype)
        if self.key_scale is not None:
            k = k * self.key_scale[:, :, :n, None].to(dtype)
            v = v * self.value_scale[:, :, :n, None].to(dtype)
        return k, v


@dataclass(kw_only=True, eq=False)
class PackedRow:
    """One row of a packed forward: tokens start:stop continue `cache`'s sequence."""

    cache: object
    start: int
    stop: int
    past: int  # tokens the row's cache held before this forward
    forward: ForwardState | None  # the row as a batch of one (None: a row in a batched decode)
    temperature: float = 1.0  # m^2 of a batched decode row


@dataclass(kw_only=True, eq=False)
class PackedForward(ForwardState):
    """A packed forward: several rows in one sequence (B = 1), each with its own cache."""

    rows: list
    # Rows that add one token to a non-empty cache, batched by the chunked backends:
    decode_rows: list = field(default_factory=list)
    decode_at: torch.Tensor | None = None  # (R,) their positions in the packed sequence
    decode_index: torch.Tensor | None = None  # (R,) their new token's index


# --- the contract ------------------------------------------------------------------------------


class DCABackend(ABC):
    """One way of computing DCA on one device, dtype and KV dtype (`key`).

    Subclasses implement `begin_forward`, `write`, `attend` and `attention`; packed forwards run
    row by row through those unless a subclass does better.
    """

    name: ClassVar[str]
    # The layers reject CPU padding masks that are not left-padded before `begin_forward`
    # (a backend that reads row starts from the mask cannot check them on the device).
    left_padding_only: ClassVar[bool] = False

    def __init__(self, key: BackendKey):
        self.key = key

    @classmethod
    def available(cls, key: BackendKey) -> bool:
        """Whether this backend can be tried for `key` as a fallback (no error if not)."""
        return True

    @abstractmethod
    def begin_forward(self, inputs: ForwardInputs) -> ForwardState:
        """Per-forward bookkeeping (token layout, write positions, softmax scales with the
        temperature), computed once and shared by every layer of the forward."""

    @abstractmethod
    def write(self, forward: ForwardState, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> LayerKV:
        """The cache write of one layer: key, value (B, Hkv, T, D) of the new tokens, keys NOT
        rotated (rotated here at j mod L), appended to the forward's cache (or, without a cache,
        kept for this layer's attention). Returns what `attend` reads: every key and value of the
        rows so far, new ones included."""

    @abstractmethod
    def attend(self, forward: ForwardState, query: torch.Tensor, kv: LayerKV, out: torch.Tensor) -> torch.Tensor:
        """DCA of the new queries, query (B, Hq, T, D) not rotated, against `kv` (from `write`),
        each query at its own token index with its row's temperature. Written into `out`
        (B, Hq, T, D) in the query dtype, any strides (the layer passes a transposed view of the
        (B, T, Hq, D) buffer its output projection reads); returns `out`. Pad query rows: zeros."""

    @abstractmethod
    def attention(self, query, key, value, query_index, key_index, rope: RopeTable, scale: float,
                  prompt_length=None, out=None) -> torch.Tensor:
        """DCA on plain tensors: the contract of `dca.backends.dca_attention`."""

    def begin_packed(self, inputs: ForwardInputs, segments) -> PackedForward:
        """Per-forward bookkeeping of a packed forward. inputs: the whole packed sequence (B = 1,
        cache: the packed container); segments: [(row_cache, start, stop)] covering it. Each row
        continues its own cache, unpadded."""
        rows = []
        for cache, start, stop in segments:
            past = cache.get_seq_length(0)
            row_inputs = _row_inputs(inputs, cache, past, stop - start)
            rows.append(PackedRow(cache=cache, start=start, stop=stop, past=past, forward=self.begin_forward(row_inputs)))
        return PackedForward(inputs=inputs, rows=rows)

    def attend_packed(self, packed: PackedForward, layer_idx: int, query, key, value, out) -> torch.Tensor:
        """DCA of a packed forward for one layer: query (1, Hq, T, D), key, value (1, Hkv, T, D)
        of the whole sequence (not rotated); row i's tokens start:stop are appended to its cache
        and attend to it alone. Written into `out` (1, Hq, T, D), returned."""
        for row in packed.rows:
            if row.forward is None:
                continue
            s, e = row.start, row.stop
            kv = self.write(row.forward, layer_idx, key[:, :, s:e], value[:, :, s:e])
            self.attend(row.forward, query[:, :, s:e], kv, out[:, :, s:e])
        return out


def _row_inputs(inputs: ForwardInputs, cache, past: int, q_len: int) -> ForwardInputs:
    return ForwardInputs(cache=cache, padding_mask=None, position_ids=None, bsz=1, q_len=q_len, past=past,
                         device=inputs.device, scaling=inputs.scaling, rope=inputs.rope)


# --- torch and flash: partial attentions per chunk, merged by their LSE ------------------------


@dataclass(kw_only=True, eq=False)
class ChunkedForward(ForwardState):
    query_index: torch.Tensor  # (B, T) token index of each new query from the row's first real token, -1: pad
    key_index: torch.Tensor  # (B, past + T) the same for every key
    prompt_length: torch.Tensor | None  # n of the temperature per row; None: the real keys


class ChunkedBackend(DCABackend):
    """DCA as up to three partial attentions per query chunk, merged by their log-sum-exps
    (dca.attention.chunked_dca); the cache's own `update` stores and returns the keys."""

    @staticmethod
    @abstractmethod
    def partial(q, k, v, scale: float, causal: bool):
        """dca/kernels.py's contract: (out, lse)."""

    def begin_forward(self, inputs: ForwardInputs) -> ChunkedForward:
        query_index, key_index = token_indices(inputs)
        prompt = None
        cache = inputs.cache
        if cache is not None:
            state = cache_state(cache)
            prompt = prompt_length_of(cache, state)
            if prompt is None and inputs.past == 0:
                prompt = state.auto_prompt_length = (key_index >= 0).sum(-1)
        return ChunkedForward(inputs=inputs, query_index=query_index, key_index=key_index, prompt_length=prompt)

    def write(self, forward: ChunkedForward, layer_idx, key, value) -> LayerKV:
        inputs = forward.inputs
        key = rotate_keys(key, forward.key_index[:, -inputs.q_len :], inputs.rope)
        if inputs.cache is not None:
            key, value = inputs.cache.update(key, value, layer_idx)
        return LayerKV(keys=key, values=value, length=key.shape[2])

    def attend(self, forward: ChunkedForward, query, kv: LayerKV, out) -> torch.Tensor:
        inputs = forward.inputs
        return chunked_dca(query, kv.keys, kv.values, forward.query_index, forward.key_index, inputs.rope,
                           inputs.scaling, self.partial, forward.prompt_length, out)

    def attention(self, query, key, value, query_index, key_index, rope, scale, prompt_length=None, out=None):
        return chunked_dca(query, key, value, query_index, key_index, rope, scale, self.partial, prompt_length, out)

    def begin_packed(self, inputs: ForwardInputs, segments) -> PackedForward:
        """Rows that add one token to a non-empty cache (decode steps) are batched: their keys and
        queries rotated once for all of them, then `decode_row` per row (`_decode_rows`); prompt
        blocks run as batches of one."""
        rows, decoding = [], []
        config = inputs.rope.config
        for cache, start, stop in segments:
            past = cache.get_seq_length(0)
            if stop - start == 1 and past > 0:
                row = PackedRow(cache=cache, start=start, stop=stop, past=past, forward=None,
                                temperature=_decode_temperature(cache, past + 1, config))
                decoding.append(row)
            else:
                row = PackedRow(cache=cache, start=start, stop=stop, past=past,
                                forward=self.begin_forward(_row_inputs(inputs, cache, past, stop - start)))
            rows.append(row)
        packed = PackedForward(inputs=inputs, rows=rows, decode_rows=decoding)
        if decoding:
            packed.decode_at = torch.tensor([row.start for row in decoding], device=inputs.device)
            packed.decode_index = torch.tensor([row.past for row in decoding], device=inputs.device)
        return packed

    def attend_packed(self, packed: PackedForward, layer_idx, query, key, value, out) -> torch.Tensor:
        super().attend_packed(packed, layer_idx, query, key, value, out)
        if packed.decode_rows:
            self._decode_rows(packed, layer_idx, query, key, value, out)
        return out

    def _decode_rows(self, packed: PackedForward, layer_idx, query, key, value, out) -> None:
        """Same values as running each decode row as a batch of one, without its per-row kernel
        calls: rotations batched over the rows, then `decode_row` (exactly-sized matmuls, one
        softmax) per row, written into `out` with one scatter."""
        inputs = packed.inputs
        rope = inputs.rope
        at, index = packed.decode_at, packed.decode_index
        q = query[0, :, at].transpose(0, 1)  # (R, Hq, D)
        k = rotate_keys(key[0, :, at].transpose(0, 1)[:, :, None], index[:, None], rope)  # (R, Hkv, 1, D)
        v = value[0, :, at].transpose(0, 1)[:, :, None]
        q3 = decode_queries(q, index, rope)  # (R, Hq, 3, D)
        done = []
        for r, row in enumerate(packed.decode_rows):
            keys, values = row.cache.update(k[r : r + 1], v[r : r + 1], layer_idx)
            done.append(decode_row(q3[r], keys[0], values[0], row.past, rope.config.chunk_len,
                                   inputs.scaling * row.temperature))  # (Hq, D)
        out[0, :, at] = torch.stack(done).transpose(0, 1).to(out.dtype)


class TorchBackend(ChunkedBackend):
    """The aten attention kernels that return the LSE (any device): the reference, and the CPU path."""

    name = "torch"
    partial = staticmethod(kernels.torch_attend)


class FlashBackend(ChunkedBackend):
    """flash-attn's kernels (CUDA, fp16/bf16) in the chunk loop."""

    name = "flash"
    partial = staticmethod(kernels.flash_attend)

    @classmethod
    def available(cls, key: BackendKey) -> bool:
        return key.device.type == "cuda" and key.dtype in (torch.float16, torch.bfloat16) and kernels.flash_available()


def token_indices(inputs: ForwardInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(query_index (B, T), key_index (B, past + T)): token index from the row's first real token,
    -1 for pads; from the padding mask, else the position ids, else an unpadded batch."""
    bsz, q_len, past, device = inputs.bsz, inputs.q_len, inputs.past, inputs.device
    k_len = past + q_len
    if inputs.padding_mask is not None:
        key_index = positions.token_indices_from_mask(inputs.padding_mask.to(device))
        return key_index[:, past:], key_index
    if inputs.position_ids is None:
        query_index = torch.arange(past, k_len, device=device).expand(bsz, -1)
    else:
        query_index = inputs.position_ids.to(device).expand(bsz, -1)
    # Unpadded: keys are the tokens just before and including the queries.
    key_index = torch.arange(k_len, device=device) - (k_len - 1 - query_index[:, -1:])
    return query_index, key_index.clamp(min=-1)


def _decode_temperature(cache, keys: int, config) -> float:
    """m^2 of a row's decode steps, read from its prompt length once and kept in its CacheState
    (reading a GPU tensor at every step and layer would stall the device). `keys`: the row's keys,
    the prompt length when the cache has none."""
    state = cache_state(cache)
    stored = prompt_length_of(cache, state)
    memo = state.decode_temperature_memo
    if stored is not None and memo is not None and memo[0] is stored:
        return memo[1]
    n = int(stored.reshape(-1)[0]) if stored is not None else keys
    factor = positions.temperature_factor(n, config)
    if stored is not None:
        state.decode_temperature_memo = (stored, factor)
    return factor


# --- triton: one pass over the cache as it is stored -------------------------------------------
#
# No GPU value is read back on the host here: per-row starts, lengths and softmax scales are
# device tensors computed once per forward from shapes and host counters the cache already knows,
# and the kernels read them. With a StaticKVCache of fixed capacity every tensor a decode step
# touches keeps its address, so the step can be captured in a CUDA graph.


@dataclass(kw_only=True, eq=False)
class TritonForward(ForwardState):
    in_place: bool  # the cache's layers are written in place by the cache-write kernel
    row_start: torch.Tensor  # (B,) int32: slot of each row's first real token
    write_start: torch.Tensor  # (1,) int32: slot of the first new token
    seq_end: torch.Tensor  # (1,) int32: slots filled after this forward
    scale: torch.Tensor  # (B,) float32 (float64 for float64 models): softmax scale x m^2
    key_ids: torch.Tensor | None  # (B, T) key rotation ids j mod L, when keys are rotated in torch


@dataclass(kw_only=True, eq=False)
class TritonPacked(PackedForward):
    """A packed forward on Triton: `one_launch` rows (forward None) run in one store and one
    attention launch per layer over `layout` (triton_kernels.PackedRows, built once per forward);
    the other rows have a row forward and run row by row."""

    one_launch: list
    layout: object | None  # None: no row in one launch


class TritonBackend(DCABackend):
    """dca/triton_kernels.py: one cache-write kernel and one attention kernel per layer (two at
    decode), whatever the number of DCA chunks; int8 dequantised inside the kernels. A packed
    forward's rows with in-place caches share one store and one attention launch per layer."""

    name = "triton"
    left_padding_only = True

    @property
    def kernels(self):
        # Imported at first use, inside the self-check where one runs: a triton that fails to
        # import is then a finding of the check (and "auto" falls back), not a crash. Not kept on
        # the instance: a model holding this backend stays deep-copyable.
        from dca import triton_kernels

        return triton_kernels

    def begin_forward(self, inputs: ForwardInputs) -> TritonForward:
        from dca import cache as kv_cache

        config = inputs.rope.config
        cache, device = inputs.cache, inputs.device
        bsz, q_len, past = inputs.bsz, inputs.q_len, inputs.past
        k_len = past + q_len
        state = cache_state(cache) if cache is not None else None
        in_place = cache is not None and kv_cache.writes_in_place(cache, state)
        recorded = state.row_start if state is not None else None

        mask = inputs.padding_mask
        if mask is not None:
            row_start = (k_len - mask.to(device).sum(-1)).to(torch.int32)
        elif in_place and recorded is not None and recorded.shape[0] == bsz:
            # The cache's own per-row starts, recorded when a mask came: a maskless decode step
            # (and a CUDA graph of one) keeps each row's padding.
            row_start = recorded
        elif inputs.position_ids is not None:
            position_ids = inputs.position_ids.to(device)
            row_start = (k_len - 1 - position_ids[:, -1]).to(torch.int32).expand(bsz).contiguous()
        else:
            row_start = torch.zeros(bsz, dtype=torch.int32, device=device)
        if state is not None and recorded is not row_start:
            if recorded is not None and recorded.shape == row_start.shape:
                recorded.copy_(row_start)  # same address for a captured graph
                row_start = recorded
            else:
                state.row_start = row_start

        if in_place:
            counter = state.length
            if counter is None or counter.device != device:
                counter = state.length = torch.full((1,), past, dtype=torch.int32, device=device)
            elif state.length_host != past:
                counter.fill_(past)  # the host length moved (crop, reset, rollback): follow it
            write_start = counter.clone()
            counter.add_(q_len)
            seq_end = counter.clone()
            state.length_host = k_len
            key_ids = None
        else:
            write_start = torch.full((1,), past, dtype=torch.int32, device=device)
            seq_end = torch.full((1,), k_len, dtype=torch.int32, device=device)
            tokens = torch.arange(past, k_len, device=device)[None, :] - row_start[:, None]  # (B, T)
            key_ids = tokens.clamp(min=0) % config.chunk_len

        prompt = prompt_length_of(cache, state) if cache is not None else None
        if prompt is None:
            prompt = k_len - row_start  # real tokens per row (device)
            if state is not None and past == 0:
                state.auto_prompt_length = prompt
        scale = self._softmax_scales(state, prompt, config, inputs.scaling, bsz, device)
        return TritonForward(inputs=inputs, in_place=in_place, row_start=row_start, write_start=write_start,
                             seq_end=seq_end, scale=scale, key_ids=key_ids)

    def _softmax_scales(self, state: CacheState | None, prompt, config, scaling: float, bsz: int, device) -> torch.Tensor:
        """(B,) scaling x m^2 (spec section 5), kept in the cache's state: the prompt length is
        fixed per request. Host prompt lengths are moved once; device ones are never read."""
        dtype = torch.float64 if self.key.dtype == torch.float64 else torch.float32
        memo_key = (id(prompt), scaling, dtype, bsz)
        memo = state.scale_memo if state is not None else None
        if memo is not None and memo[0] == memo_key and memo[1] is prompt:
            return memo[2]
        if config.temperature_alpha == 0.0:
            scale = torch.full((bsz,), scaling, dtype=dtype, device=device)
        else:
            factors = positions.temperature_factors(torch.as_tensor(prompt).reshape(-1), config)
            scale = (scaling * factors).to(dtype).to(device, non_blocking=True)
            if scale.numel() not in (1, bsz):
                raise ValueError(f"the cache's prompt length has {scale.numel()} values for a batch of {bsz} rows "
                                 "(dca.set_prompt_length takes one per row, or one for all)")
            scale = scale.expand(bsz).contiguous() if scale.numel() == 1 else scale
        if state is not None:
            state.scale_memo = (memo_key, prompt, scale)
        return scale

    def write(self, forward: TritonForward, layer_idx, key, value) -> LayerKV:
        from dca import cache as kv_cache

        inputs = forward.inputs
        rope = inputs.rope
        cache = inputs.cache
        storage = kv_cache.in_place_layer(cache, layer_idx, cache_state(cache)) if forward.in_place else None
        if storage is not None:
            if storage.length != inputs.past:
                raise RuntimeError(f"cache layer {layer_idx} holds {storage.length} tokens, layer 0 held {inputs.past}")
            needed = inputs.past + inputs.q_len
            k, v, k_scale, v_scale = storage.reserve(key, needed, hint=cache_state(cache).capacity_hint)
            cos, sin = rope.tables(key.device, key.dtype)
            self.kernels.store(key, value, k, v, cos, sin, forward.row_start, forward.write_start,
                               rope.config.chunk_len, k_scale, v_scale)
            storage.length = needed
            return LayerKV(keys=k, values=v, length=needed, key_scale=k_scale, value_scale=v_scale)
        key = rope.rotate(key, forward.key_ids)
        if cache is not None:
            key, value = cache.update(key, value, layer_idx)
        return LayerKV(keys=key, values=value, length=key.shape[2])

    def attend(self, forward: TritonForward, query, kv: LayerKV, out) -> torch.Tensor:
        rope = forward.inputs.rope
        cos, sin = rope.tables(query.device, query.dtype)
        args = (query, kv.keys, kv.values, forward.row_start, forward.seq_end, forward.scale, cos, sin, rope.config,
                kv.key_scale, kv.value_scale)
        self.kernels.attention(*args, out=out)  # written in place: no copy of a layer's output
        return out

    def attention(self, query, key, value, query_index, key_index, rope, scale, prompt_length=None, out=None):
        """Left padding is assumed (not checked: that would read the GPU): a row's pads are its
        first slots, so their count is the slot of its first real token."""
        row_start = (key_index < 0).sum(-1).to(torch.int32)  # (B,)
        n = prompt_length if prompt_length is not None else key_index.shape[1] - row_start
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        scales = scale * positions.temperature_factors(torch.as_tensor(n, device=query.device), rope.config)
        scales = scales.to(dtype).expand(query.shape[0]).contiguous()
        seq_end = torch.full((1,), key.shape[2], dtype=torch.int32, device=query.device)
        cos, sin = rope.tables(query.device, query.dtype)
        return self.kernels.attention(query, key, value, row_start, seq_end, scales, cos, sin, rope.config, out=out)

    def begin_packed(self, inputs: ForwardInputs, segments) -> TritonPacked:
        """Per-forward bookkeeping of a packed forward, on the host: the rows whose caches the
        kernels write in place get one `PackedRows` table (columns, cached lengths, softmax scale
        x m^2 per row) shared by every layer; the others a row forward of their own.

        Which rows go into the one launch: a cache whose layers are written in place
        (`dca.cache.writes_in_place`: StaticKVCache, an adopted DynamicCache / Int8KVCache, a
        slot-layout row cache such as the engine's RowKV) and that stores keys as this backend's
        KV dtype (the kernels read one storage dtype per launch). Any other row cache keeps the
        row-by-row path: its `update` is the only way to write it (its storage is not exposed),
        and it returns keys already rotated, which the one-launch kernels cannot take.

        Bookkeeping of a one-launch row, compared with the row-by-row path (`begin_forward` per
        row): the per-layer lengths are set the same way (in `attend_packed`); a prompt length
        recorded at the row's first forward the same; a recorded row start is zeroed the same
        (a row continues its cache unpadded), but none is created where none was; the device
        write position (CacheState.length) is not advanced: it stays equal to the host length it
        was set from (`length_host`), and `begin_forward` resets it when the host length moved,
        so the next forward of any kind starts from the cache's true length. Nothing is read
        from the GPU here except, once per request, a row's prompt length (kept in its state).
        """
        from dca import cache as kv_cache

        config = inputs.rope.config
        rows, one_launch = [], []
        for cache, start, stop in segments:
            past, q_len = cache.get_seq_length(0), stop - start
            state = cache_state(cache)
            if kv_cache.writes_in_place(cache, state) and kv_cache.kv_dtype_of(cache) == self.key.kv_dtype:
                if prompt_length_of(cache, state) is None and past == 0:
                    # as begin_forward: the first forward's real tokens are the temperature's n
                    # (its m^2 memoised from the host count, so nothing is read back below)
                    prompt = state.auto_prompt_length = torch.full((1,), q_len, dtype=torch.int32,
                                                                   device=inputs.device)
                    state.decode_temperature_memo = (prompt, positions.temperature_factor(q_len, config))
                if state.row_start is not None:
                    state.row_start.zero_()
                temperature = _decode_temperature(cache, past + q_len, config)  # host float, memoised per request
                row = PackedRow(cache=cache, start=start, stop=stop, past=past, forward=None, temperature=temperature)
                one_launch.append(row)
            else:
                row_inputs = _row_inputs(inputs, cache, past, q_len)
                row = PackedRow(cache=cache, start=start, stop=stop, past=past, forward=self.begin_forward(row_inputs))
            rows.append(row)
        layout = None
        if one_launch:
            # float64 models keep float64 scales, as the row-by-row path does
            scale_dtype = torch.float64 if self.key.dtype == torch.float64 else torch.float32
            layout = self.kernels.PackedRows.build(
                [row.start for row in one_launch], [row.stop - row.start for row in one_launch],
                [row.past for row in one_launch], [inputs.scaling * row.temperature for row in one_launch],
                inputs.device, scale_dtype=scale_dtype)
        return TritonPacked(inputs=inputs, rows=rows, one_launch=one_launch, layout=layout)

    def attend_packed(self, packed: TritonPacked, layer_idx, query, key, value, out) -> torch.Tensor:
        """One layer of a packed forward: the rows of `packed.one_launch` in one cache-write
        launch (`triton_kernels.packed_store`) and one attention launch (`packed_attention`) over
        their own storage in place, int8 dequantised inside the kernels only; any other row row
        by row (`write` + `attend` on its row forward). Written into `out`, returned."""
        from dca import cache as kv_cache

        super().attend_packed(packed, layer_idx, query, key, value, out)  # the rows with a row forward
        if packed.layout is None:
            return out
        rope = packed.inputs.rope
        storages, buffers = [], []
        for row in packed.one_launch:
            state = cache_state(row.cache)
            storage = kv_cache.in_place_layer(row.cache, layer_idx, state)
            if storage.length != row.past:
                raise RuntimeError(f"cache layer {layer_idx} holds {storage.length} tokens, layer 0 held {row.past}")
            new = key[:, :, row.start : row.stop]  # (1, Hkv, t, D): shape, dtype, device of the storage
            buffers.append(storage.reserve(new, row.stop - row.start + row.past, hint=state.capacity_hint))
            storages.append(storage)
        keys, values, k_scales, v_scales = (list(part) for part in zip(*buffers))
        int8 = k_scales[0] is not None
        caches = self.kernels.RowCaches.from_tensors(keys, values, k_scales if int8 else None,
                                                     v_scales if int8 else None)  # (R, 8) addresses, one copy
        cos, sin = rope.tables(query.device, query.dtype)
        self.kernels.packed_store(key, value, packed.layout, caches, cos, sin, rope.config.chunk_len)
        for row, storage in zip(packed.one_launch, storages):
            storage.length = row.past + row.stop - row.start
        self.kernels.packed_attention(query, packed.layout, caches, cos, sin, rope.config, out=out)
        return out


# --- choice ------------------------------------------------------------------------------------

_BACKENDS: dict[str, type[DCABackend]] = {cls.name: cls for cls in (TorchBackend, FlashBackend, TritonBackend)}
# What replaces a backend whose self-check failed, in order (the first `available` one).
FALLBACKS: dict[type[DCABackend], tuple[type[DCABackend], ...]] = {
    TritonBackend: (FlashBackend, TorchBackend),
    FlashBackend: (TorchBackend,),
}


def create(name: str, key: BackendKey) -> DCABackend:
    """The backend called `name` for `key`, as it is: no resolution, no self-check."""
    try:
        return _BACKENDS[name](key)
    except KeyError:
        raise ValueError(f"unknown DCA backend {name!r}; known: {sorted(_BACKENDS)}") from None


def dca_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    rope: RopeTable,
    scale: float,
    backend="torch",
    prompt_length: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dual Chunk Attention output, (B, Hq, Tq, D) in the query dtype.

    backend       a dca.backends.DCABackend, or its name ("torch", "flash", "triton"): a backend
                  built for these tensors as they are (no self-check; "triton" on CPU needs the
                  interpreter)
    query         (B, Hq, Tq, D)  not rotated
    key           (B, Hkv, Tk, D) rotated at j mod L (see `rotate_keys`)
    value         (B, Hkv, Tk, D)
    query_index   (B, Tq)  token index of each query, -1 for a pad
    key_index     (B, Tk)  token index of each key, -1 for a pad
    prompt_length (B,)     n of the temperature (spec section 5); None = number of real keys per row
    out           (B, Hq, Tq, D) query dtype, any strides: written and returned (None: allocated)

    The real tokens of a row must be contiguous and its queries the last of its keys, which is
    what left padding and a KV cache give. Pad query rows come out as zeros.
    """
    if isinstance(backend, str):
        backend = create(backend, BackendKey.of(query, key))
    return backend.attention(query, key, value, query_index, key_index, rope, scale, prompt_length, out)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


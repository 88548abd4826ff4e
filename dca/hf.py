"""`apply_dca`: turns one loaded transformers model into its DCA version, in place.

The module of `dca` that knows transformers' models (dca/kv_quant.py and dca/cache.py know its
Cache classes). It swaps the attention module of every decoder
layer of THIS instance for a `DCAAttention` that reuses the layer's own q/k/v/o projections (no
copy), and gives the instance a private copy of its config whose attention implementation is
"dca". That name is not in transformers' mask registry, so the model builds no (B, 1, n, n)
mask at all: nothing n x n is ever allocated. The 2D padding mask reaches the layers through a
forward pre-hook on this instance's base model. No transformers class or global registry is
touched.

Packed rows: a cache object with a `packed_rows` attribute, a list of (row_cache, start, stop),
marks a forward whose one sequence (batch 1) packs several independent rows: tokens start:stop
continue row_cache's sequence (appended after what it holds) and attend to that cache only.
Rows of different lengths (prefill blocks and decode tokens alike) then share one forward's
projections and MLP without padding; attention runs per row (rows that decode one token have
their rotations batched over the rows, `DCAAttention._decode_rows`). Continuous batching in
`pipeline.engine` uses it. A row cache needs `get_seq_length(layer)`, `update(k, v, layer)`
returning the row's whole keys and values, and may carry `dca_prompt_length`.

On the "triton" backend (the default on CUDA) a layer writes its new keys and values into the
cache with one kernel and attends with one more (two at decode); the bookkeeping they share is
computed once per forward, on the device, without reading anything back (`_ForwardPlan`).
Packed rows on that backend still run row by row (one Triton launch per row and layer, through
`dca_attention(backend="triton")`).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from dca import kernels, positions
from dca.attention import RopeTable, dca_attention, decode_queries, decode_row, rotate_keys
from dca.config import DCAConfig

# model_type -> attention layout identical to Llama's (q/k/v/o projections, rotate-half RoPE
# from the base model's `rotary_emb`); qwen3 adds per-head q/k RMSNorm before RoPE.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DCA_ATTN_IMPLEMENTATION = "dca"
# Static rope scalings map any position id to fixed frequencies; "dynamic" rescales with the
# sequence length, which DCA replaces.
_UNSUPPORTED_ROPE_TYPES = ("dynamic",)


def apply_dca(model: nn.Module, config: DCAConfig) -> nn.Module:
    """Makes `model` (a transformers *ForCausalLM or base model) use Dual Chunk Attention.

    Works whatever attn_implementation the model was loaded with; `model.generate` works after.
    Calling it again on the same model replaces the DCA settings. Returns the model.
    """
    if not isinstance(config, DCAConfig):
        raise TypeError(f"config must be a DCAConfig, got {type(config).__name__}")
    base = _base_model(model)
    _check_supported(model.config)
    # Device and dtype are checked at the first forward: the model may still move to a GPU.
    if config.backend == "flash" and not kernels.flash_available():
        kernels.resolve_backend("flash", torch.device("cpu"), torch.float32)
    if config.backend == "triton" and not kernels.triton_available():
        kernels.resolve_backend("triton", torch.device("cuda"), torch.bfloat16)

    rotary = base.rotary_emb

    def build(ids: torch.Tensor, dtype: torch.dtype):
        probe = torch.zeros((), device=ids.device, dtype=dtype)
        cos, sin = rotary(probe, ids[None])
        return cos[0], sin[0]

    state = _DCAState(config, RopeTable(config, build))
    old_state = getattr(base, "_dca_state", None)
    if old_state is not None:
        old_state.hook.remove()
    state.hook = base.register_forward_pre_hook(state.capture_padding_mask, with_kwargs=True)
    base._dca_state = state

    own_config = copy.deepcopy(model.config)
    own_config._attn_implementation = DCA_ATTN_IMPLEMENTATION
    old_config = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = own_config

    for layer in base.layers:
        attn = layer.self_attn
        if isinstance(attn, DCAAttention):
            attn.set_state(state)
        else:
            layer.self_attn = DCAAttention(attn, state)
    return model


def dca_config_of(model: nn.Module) -> DCAConfig | None:
    """The DCAConfig a model was patched with, or None."""
    for module in model.modules():
        if isinstance(module, DCAAttention):
            return module.dca_state.config
    return None


def set_prompt_length(cache, prompt_length: int | torch.Tensor) -> None:
    """Fixes n of the attention temperature for a request whose prompt is fed in several blocks.

    Without it, n is the number of real tokens of the first forward that fills `cache`.
    """
    cache.dca_prompt_length = torch.as_tensor(prompt_length).reshape(-1)


class _DCAState:
    """Shared by the DCA layers of one model: settings, rope tables, the resolved backend."""

    def __init__(self, config: DCAConfig, rope: RopeTable):
        self.config = config
        self.rope = rope
        self._backends: dict = {}
        self.hook = None
        # The 2D (B, keys) padding mask of the forward in progress, or None.
        self.padding_mask: torch.Tensor | None = None
        # The Triton path's per-forward bookkeeping, computed by the first layer of a forward.
        self.plan: _ForwardPlan | None = None

    def capture_padding_mask(self, module, args, kwargs):
        # Base model forward(input_ids, attention_mask, ...): the mask may come positionally.
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.padding_mask = mask if isinstance(mask, torch.Tensor) else None
        self.plan = None

    def backend(self, device: torch.device, dtype: torch.dtype) -> str:
        key = (device, dtype)
        if key not in self._backends:
            self._backends[key] = kernels.resolve_backend(self.config.backend, device, dtype)
        return self._backends[key]


class DCAAttention(nn.Module):
    """Drop-in replacement of a Llama-layout attention module that computes DCA.

    Holds the original module's projection layers (the same objects: weights are not copied,
    and tensor-parallel replacements of them keep working); head counts come from the
    projected tensors' shapes.
    """

    def __init__(self, original: nn.Module, state: _DCAState):
        super().__init__()
        self.config = original.config
        self.layer_idx = original.layer_idx
        self.head_dim = original.head_dim
        self.scaling = original.scaling
        self.q_proj = original.q_proj
        self.k_proj = original.k_proj
        self.v_proj = original.v_proj
        self.o_proj = original.o_proj
        for norm in ("q_norm", "k_norm"):
            if hasattr(original, norm):
                setattr(self, norm, getattr(original, norm))
        self.set_state(state)

    def set_state(self, state: _DCAState) -> None:
        # Not a submodule: the state is shared and holds no parameters.
        object.__setattr__(self, "dca_state", state)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        state = self.dca_state
        bsz, q_len = hidden_states.shape[:-1]
        hidden_shape = (bsz, q_len, -1, self.head_dim)

        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        if hasattr(self, "q_norm"):
            query, key = self.q_norm(query), self.k_norm(key)
        query = query.transpose(1, 2)  # (B, Hq, T, D)
        key = key.transpose(1, 2)  # (B, Hkv, T, D)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        rows = getattr(cache, "packed_rows", None)
        if rows is None and state.backend(query.device, query.dtype) == "triton":
            # The Triton kernels (dca.triton_kernels) with their static cache and one plan per forward.
            out = _triton_attention(self, query, key, value, cache, position_ids)  # (B, Hq, T, D)
        elif rows is None:
            out = self._attend(query, key, value, cache, state.padding_mask, position_ids)  # (B, Hq, T, D)
        else:
            # One packed sequence (B = 1) holding several independent rows, each with its own
            # cache: rows of different lengths share the projections and the MLP of one forward
            # (continuous batching, pipeline.engine). Attention runs per row, unpadded: decode
            # rows through `_decode_rows`, prompt blocks (and every row on Triton) through the
            # layer backend's kernels.
            out = torch.empty_like(query)  # (1, Hq, T, D)
            per_token = state.backend(query.device, query.dtype) != "triton"
            decoding = []
            for row_cache, start, stop in rows:
                if per_token and stop - start == 1 and row_cache.get_seq_length(self.layer_idx) > 0:
                    decoding.append((row_cache, start))
                    continue
                out[:, :, start:stop] = self._attend(
                    query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop], row_cache, None, None
                )
            if decoding:
                self._decode_rows(query, key, value, decoding, out)
        out = out.transpose(1, 2).reshape(bsz, q_len, -1)
        return self.o_proj(out), None

    def _decode_rows(self, query, key, value, rows, out) -> None:
        """Packed rows that each add one token to a non-empty cache (decode steps): rotations of
        keys and queries batched over the rows, then `dca.attention.decode_row` per row, written
        into `out` (1, Hq, T, D) with one scatter. Same values as `_attend` row by row (which
        takes this path for a single decode row), without its per-row kernel calls."""
        state = self.dca_state
        config = state.config
        at = torch.tensor([start for _, start in rows], device=query.device)
        past = [cache.get_seq_length(self.layer_idx) for cache, _ in rows]
        index = torch.tensor(past, device=query.device)  # each row's new token index
        q = query[0, :, at].transpose(0, 1)  # (R, Hq, D)
        k = rotate_keys(key[0, :, at].transpose(0, 1)[:, :, None], index[:, None], state.rope)  # (R, Hkv, 1, D)
        v = value[0, :, at].transpose(0, 1)[:, :, None]
        q3 = decode_queries(q, index, state.rope)
        done = []
        for r, (cache, _) in enumerate(rows):
            keys, values = cache.update(k[r : r + 1], v[r : r + 1], self.layer_idx)
            done.append(decode_row(q3[r], keys[0], values[0], past[r], config.chunk_len,
                                   self.scaling * _decode_temperature(cache, past[r] + 1, config)))
        out[0, :, at] = torch.stack(done).transpose(0, 1).to(out.dtype)

    def _attend(self, query, key, value, cache, padding_mask, position_ids) -> torch.Tensor:
        """New queries/keys/values (not rotated) of one batch -> DCA output (B, Hq, T, D); the
        keys and values are appended to `cache`."""
        state = self.dca_state
        bsz, _, q_len, _ = query.shape
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        query_index, key_index = _token_indices(padding_mask, position_ids, bsz, q_len, past, query.device)

        key = rotate_keys(key, key_index[:, -q_len:], state.rope)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        prompt_length = _prompt_length(cache, past, key_index)
        return dca_attention(
            query, key, value, query_index, key_index, state.rope, self.scaling,
            backend=state.backend(query.device, query.dtype), prompt_length=prompt_length,
        )


def _check_mask(attention_mask, k_len):
    if attention_mask.dim() != 2:
        raise ValueError(f"a DCA model takes a 2D (batch, keys) padding mask, got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[-1] != k_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} tokens but the cache plus input hold "
            f"{k_len}; pass the mask of the whole sequence (as generate does)"
        )


def _token_indices(attention_mask, position_ids, bsz, q_len, past, device):
    """(query_index (B, Tq), key_index (B, Tk)): token index from the first real token, -1 for pads."""
    k_len = past + q_len
    if attention_mask is not None:
        _check_mask(attention_mask, k_len)
        key_index = positions.token_indices_from_mask(attention_mask.to(device))
        return key_index[:, past:], key_index
    if position_ids is None:
        query_index = torch.arange(past, k_len, device=device).expand(bsz, -1)
    else:
        query_index = position_ids.to(device).expand(bsz, -1)
    # Unpadded: keys are the tokens just before and including the queries.
    key_index = torch.arange(k_len, device=device) - (k_len - 1 - query_index[:, -1:])
    return query_index, key_index.clamp(min=-1)


def _decode_temperature(cache, keys: int, config: DCAConfig) -> float:
    """m^2 of a row's decode steps, read from its cache's prompt length once and kept on the cache
    (reading a GPU tensor at every step and layer would stall the device). `keys`: the row's keys,
    the prompt length when the cache has none."""
    stored = getattr(cache, "dca_prompt_length", None)
    memo = getattr(cache, "_dca_decode_temperature", None)
    if stored is not None and memo is not None and memo[0] is stored:
        return memo[1]
    n = int(stored.reshape(-1)[0]) if stored is not None else keys
    factor = positions.temperature_factor(n, config)
    if stored is not None:
        cache._dca_decode_temperature = (stored, factor)
    return factor


def _prompt_length(cache, past, key_index):
    if cache is None:
        return None
    stored = getattr(cache, "dca_prompt_length", None)
    if stored is None and past == 0:
        stored = (key_index >= 0).sum(-1)
        cache.dca_prompt_length = stored
    return stored


# --- the Triton path ---------------------------------------------------------------------------
#
# No GPU value is read back on the host here: per-row starts, lengths and softmax scales are
# device tensors computed once per forward (`_ForwardPlan`) from shapes and host counters the
# cache already knows, and the kernels read them. With a StaticKVCache of fixed capacity every
# tensor a decode step touches keeps its address, so the step can be captured in a CUDA graph.


@dataclass
class _ForwardPlan:
    """Bookkeeping shared by every layer of one forward (all device tensors but the ints)."""

    past: int  # tokens cached before this forward (host)
    bsz: int
    q_len: int
    cache: object  # weakref to the cache, or None
    managed: bool  # a StaticKVCache (or an adopted empty DynamicCache/Int8KVCache)
    row_start: torch.Tensor  # (B,) int32: slot of each row's first real token
    write_start: torch.Tensor  # (1,) int32: slot of the first new token
    seq_end: torch.Tensor  # (1,) int32: slots filled after this forward
    scale: torch.Tensor  # (B,): softmax scale x temperature m^2
    key_ids: torch.Tensor | None  # (B, T) key rotation ids j mod L, when keys are rotated in torch
    layers: set = field(default_factory=set)


def _triton_attention(layer: DCAAttention, query, key, value, cache, position_ids) -> torch.Tensor:
    """DCA through dca.triton_kernels: one cache write and one attention launch (two at decode)."""
    from dca import cache as static_cache
    from dca import triton_kernels

    state = layer.dca_state
    config = state.config
    plan = _plan_for(state, layer, cache, query, position_ids)
    cos, sin = state.rope.tables(query.device, query.dtype)
    store = static_cache.static_layer(cache, layer.layer_idx) if plan.managed else None
    if store is not None:
        if store.length != plan.past:
            raise RuntimeError(f"cache layer {layer.layer_idx} holds {store.length} tokens, layer 0 held {plan.past}")
        needed = plan.past + plan.q_len
        k, v, k_scale, v_scale = store.reserve(key, needed, hint=getattr(cache, "dca_capacity_hint", None))
        triton_kernels.store(key, value, k, v, cos, sin, plan.row_start, plan.write_start, config.chunk_len,
                             k_scale, v_scale)
        store.length = needed
    else:
        key = state.rope.rotate(key, plan.key_ids)
        if cache is not None:
            key, value = cache.update(key, value, layer.layer_idx)
        k, v, k_scale, v_scale = key, value, None, None
    return triton_kernels.attention(query, k, v, plan.row_start, plan.seq_end, plan.scale, cos, sin, config,
                                    k_scale, v_scale)


def _plan_for(state: _DCAState, layer: DCAAttention, cache, query, position_ids) -> _ForwardPlan:
    bsz, q_len = query.shape[0], query.shape[2]
    plan = state.plan
    # A new forward: the base model's pre-hook cleared the plan, or (layers called directly) this
    # layer already used it, or it was made for another cache or shape.
    if (
        plan is None or layer.layer_idx in plan.layers or (plan.bsz, plan.q_len) != (bsz, q_len)
        or (plan.cache() if plan.cache is not None else None) is not cache
    ):
        plan = state.plan = _make_plan(state, cache, layer.layer_idx, bsz, q_len, query, position_ids, layer.scaling)
    plan.layers.add(layer.layer_idx)
    return plan


def _make_plan(state, cache, layer_idx, bsz, q_len, query, position_ids, scaling) -> _ForwardPlan:
    from dca import cache as static_cache

    config = state.config
    device = query.device
    past = cache.get_seq_length(layer_idx) if cache is not None else 0
    k_len = past + q_len
    if cache is not None and not hasattr(cache, "_dca_adopted"):
        cache._dca_adopted = static_cache.adoptable(cache)
    managed = cache is not None and (isinstance(cache, static_cache.StaticKVCache) or cache._dca_adopted)
    stored = getattr(cache, "_dca_row_start", None) if cache is not None else None

    mask = state.padding_mask
    if mask is not None:
        _check_mask(mask, k_len)
        if mask.device.type == "cpu":
            _check_left_padded(mask)
        row_start = (k_len - mask.to(device).sum(-1)).to(torch.int32)
    elif managed and stored is not None and stored.shape[0] == bsz:
        # The cache's own per-row starts, recorded when a mask came: a maskless decode step (and a
        # CUDA graph of one) keeps each row's padding.
        row_start = stored
    elif position_ids is not None:
        row_start = (k_len - 1 - position_ids.to(device)[:, -1]).to(torch.int32).expand(bsz).contiguous()
    else:
        row_start = torch.zeros(bsz, dtype=torch.int32, device=device)
    if cache is not None and stored is not row_start:
        if stored is not None and stored.shape == row_start.shape:
            stored.copy_(row_start)  # same address for a captured graph
        else:
            cache._dca_row_start = row_start

    if managed:
        counter = getattr(cache, "_dca_length", None)
        if counter is None or counter.device != device:
            counter = cache._dca_length = torch.full((1,), past, dtype=torch.int32, device=device)
        elif cache._dca_length_host != past:
            counter.fill_(past)  # the host counter moved (crop, reset): follow it
        write_start = counter.clone()
        counter.add_(q_len)
        seq_end = counter.clone()
        cache._dca_length_host = k_len
        key_ids = None
    else:
        write_start = torch.full((1,), past, dtype=torch.int32, device=device)
        seq_end = torch.full((1,), k_len, dtype=torch.int32, device=device)
        tokens = torch.arange(past, k_len, device=device)[None, :] - row_start[:, None]  # (B, T)
        key_ids = tokens.clamp(min=0) % config.chunk_len

    prompt = getattr(cache, "dca_prompt_length", None) if cache is not None else None
    if prompt is None:
        prompt = k_len - row_start  # real tokens per row (device)
        if cache is not None and past == 0:
            cache.dca_prompt_length = prompt
    scale = _softmax_scales(cache, prompt, config, scaling, bsz, query)
    return _ForwardPlan(past=past, bsz=bsz, q_len=q_len, cache=weakref.ref(cache) if cache is not None else None,
                        managed=managed, row_start=row_start, write_start=write_start, seq_end=seq_end,
                        scale=scale, key_ids=key_ids)


def _softmax_scales(cache, prompt, config: DCAConfig, scaling: float, bsz: int, query) -> torch.Tensor:
    """(B,) scaling x m^2 (spec section 5), kept on the cache: the prompt length is fixed per request."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    key = (id(prompt), scaling, dtype, bsz)
    memo = getattr(cache, "_dca_scale", None) if cache is not None else None
    if memo is not None and memo[0] == key and memo[1] is prompt:
        return memo[2]
    device = query.device
    if config.temperature_alpha == 0.0:
        scale = torch.full((bsz,), scaling, dtype=dtype, device=device)
    else:
        # m^2 where the prompt lengths live: host values are moved once, GPU values never read.
        factors = positions.temperature_factors(torch.as_tensor(prompt).reshape(-1), config)
        scale = (scaling * factors).to(dtype).to(device, non_blocking=True)
        if scale.numel() not in (1, bsz):
            raise ValueError(f"the cache's prompt length has {scale.numel()} values for a batch of {bsz} rows "
                             "(dca.set_prompt_length takes one per row, or one for all)")
        scale = scale.expand(bsz).contiguous() if scale.numel() == 1 else scale
    if cache is not None:
        cache._dca_scale = (key, prompt, scale)
    return scale


def _check_left_padded(mask: torch.Tensor) -> None:
    """CPU masks only (a CUDA mask would need a device read): real tokens must end each row."""
    m = mask.bool()
    if m.shape[-1] > 1 and not bool((m[:, 1:] >= m[:, :-1]).all()):
        raise ValueError(
            "DCA needs each row's real tokens contiguous (left padding only) with the queries the "
            "last tokens of the keys; got positions that are not. Right padding with a cache, or "
            "packed sequences, are not supported."
        )


_ABSOLUTE_POSITION_MODULES = ("wpe", "embed_positions", "position_embeddings")


def _base_model(model: nn.Module) -> nn.Module:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in _ABSOLUTE_POSITION_MODULES:
            raise ValueError(
                f"model type {model_type!r} uses absolute position embeddings ({name}); DCA remaps "
                "rotary (RoPE) positions and cannot apply to it"
            )
    base = getattr(model, "model", model)
    if not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        raise ValueError(
            f"model type {model_type!r} is not supported by apply_dca (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return base


def _check_supported(model_config) -> None:
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported by apply_dca (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(model_config, "sliding_window", None) is not None and (
        model_type == "mistral" or "sliding_attention" in (getattr(model_config, "layer_types", None) or [])
    ):
        raise ValueError(
            f"this {model_type} model uses sliding-window attention (sliding_window={model_config.sliding_window}); "
            "DCA replaces full attention only"
        )
    rope = getattr(model_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type in _UNSUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} rescales positions with the sequence length; DCA needs a static "
            "rotary embedding (default, linear, llama3, yarn)"
        )

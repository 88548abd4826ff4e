"""`apply_dca`: turns one loaded transformers model into its DCA version, in place.

The module of `dca` that knows transformers' models (dca/kv_quant.py and dca/cache.py know its
Cache classes). It swaps the attention module of every decoder
layer of THIS instance for a `DCAAttention` that reuses the layer's own q/k/v/o projections (no
copy), and gives the instance a private copy of its config whose attention implementation is
"dca". That name is not in transformers' mask registry, so the model builds no (B, 1, n, n)
mask at all: nothing n x n is ever allocated. The 2D padding mask reaches the layers through a
forward pre-hook on this instance's base model. No transformers class or global registry is
touched.

The layers compute attention through a backend object (dca/backends.py: torch, flash or triton),
chosen once per device, dtype and KV dtype at the first forward (or at `prepare_backend`), with a
start-up self-check on CUDA and a fallback; `backend_report(model)` says which one runs and why.
Per-forward bookkeeping is the backend's typed `ForwardState`, made by the first layer of a
forward; per-cache bookkeeping is dca.state's `CacheState`, never attributes on the caches.

Packed rows: a cache object with a `packed_rows` attribute, a list of (row_cache, start, stop),
marks a forward whose one sequence (batch 1) packs several independent rows: tokens start:stop
continue row_cache's sequence (appended after what it holds) and attend to that cache only.
Rows of different lengths (prefill blocks and decode tokens alike) then share one forward's
projections and MLP without padding (`DCABackend.attend_packed`). Continuous batching in
`pipeline.engine` uses it. A row cache needs `get_seq_length(layer)`, `update(k, v, layer)`
returning the row's whole keys and values, and may carry `dca_prompt_length`; one that also
exposes the slot layout (dca.cache.has_slot_layout) is written in place on the Triton path,
where such rows share one cache-write and one attention launch per layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dca import backends, kernels, selfcheck
from dca.attention import RopeTable
from dca.backends import BackendKey, BackendReport, BackendUnavailable, ForwardInputs, PackedForward
from dca.config import DCAConfig
from dca.state import cache_state

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
    Calling it again on the same model replaces the DCA settings. Returns the model. A backend
    asked for by name that is not installed raises BackendUnavailable here; device, dtype and the
    self-check are settled at the first forward or `prepare_backend`.
    """
    if not isinstance(config, DCAConfig):
        raise TypeError(f"config must be a DCAConfig, got {type(config).__name__}")
    base = _base_model(model)
    _check_supported(model.config)
    # Device and dtype are checked at the first forward: the model may still move to a GPU.
    try:
        kernels.check_installed(config.backend)
    except RuntimeError as error:
        raise BackendUnavailable(str(error)) from error

    rotary = base.rotary_emb

    def build(ids: torch.Tensor, dtype: torch.dtype):
        probe = torch.zeros((), device=ids.device, dtype=dtype)
        cos, sin = rotary(probe, ids[None])
        return cos[0], sin[0]

    state = _DCAState(config, RopeTable(config, build))
    old_state = getattr(base, "_dca_state", None)
    if old_state is not None:
        for hook in old_state.hooks:
            hook.remove()
    state.hooks = [base.register_forward_pre_hook(state.begin_model_forward, with_kwargs=True),
                   base.register_forward_hook(state.end_model_forward)]
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
    state = _state_of(model)
    return state.config if state is not None else None


def set_prompt_length(cache, prompt_length: int | torch.Tensor) -> None:
    """Fixes n of the attention temperature for a request whose prompt is fed in several blocks.

    prompt_length: one int (or (1,) tensor) for all rows, or one per row. Without it, n is the
    number of real tokens of the first forward that fills `cache` (or the cache's own
    `dca_prompt_length`, where its class carries one).
    """
    cache_state(cache).prompt_length = torch.as_tensor(prompt_length).reshape(-1)


def backend_report(model: nn.Module) -> BackendReport | None:
    """The DCA backend of the model's latest forward (or `prepare_backend`): requested, chosen,
    ran, fallback_reason, checked, device, dtype, kv_dtype (dca.backends.BackendReport;
    `.to_dict()` for JSON). None for a model without DCA or before its first forward."""
    state = _state_of(model)
    if state is None or state.last_key is None:
        return None
    return state.reports[state.last_key]


def backend_reports(model: nn.Module) -> tuple[BackendReport, ...]:
    """One report per (device, dtype, KV dtype) the model has run with, in first-use order."""
    state = _state_of(model)
    return tuple(state.reports.values()) if state is not None else ()


@torch.no_grad()
def prepare_backend(model: nn.Module, kv_dtype: str = "auto") -> BackendReport:
    """Chooses the model's DCA backend now, for its current device and dtype and `kv_dtype`
    ("auto" | "int8": how its KV caches will store keys and values), running the start-up
    self-check where one is required; returns the report (`backend_report` returns it after).

    Call it once per process after the model is on its device, before the first document: an
    explicit backend that cannot run (or fails the check) raises BackendUnavailable here, and
    "auto"'s fallback is decided before any output is written. Without it the same happens at
    the first forward."""
    from dca.cache import KV_DTYPES

    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    state = _state_of(model)
    if state is None:
        raise ValueError("prepare_backend needs a model patched by apply_dca")
    attn = next(m for m in model.modules() if isinstance(m, DCAAttention))
    weight = next(attn.q_proj.parameters())
    hidden = getattr(attn.q_proj, "in_features", None) or attn.config.hidden_size
    probe = torch.zeros(1, 1, hidden, device=weight.device, dtype=weight.dtype)
    # Head counts as the forward sees them (the projections' outputs: tensor-parallel shards).
    geometry = (attn.q_proj(probe).shape[-1] // attn.head_dim, attn.k_proj(probe).shape[-1] // attn.head_dim,
                attn.head_dim)
    state.backend_for(weight.device, weight.dtype, kv_dtype, geometry)
    return state.reports[state.last_key]


def _state_of(model: nn.Module):
    for module in model.modules():
        if isinstance(module, DCAAttention):
            return module.dca_state
    return None


class _DCAState:
    """Shared by the DCA layers of one model: settings, rope tables, the backends chosen (one
    per device, dtype and KV dtype) with their reports, and the forward in progress."""

    def __init__(self, config: DCAConfig, rope: RopeTable):
        self.config = config
        self.rope = rope
        self.hooks: list = []
        # The 2D (B, keys) padding mask of the forward in progress, or None.
        self.padding_mask: torch.Tensor | None = None
        # The backend's bookkeeping of the forward in progress, made by its first layer.
        self.forward: backends.ForwardState | None = None
        self.backends: dict[BackendKey, backends.DCABackend] = {}
        self.reports: dict[BackendKey, BackendReport] = {}
        self.last_key: BackendKey | None = None

    def begin_model_forward(self, module, args, kwargs):
        # Base model forward(input_ids, attention_mask, ...): the mask may come positionally.
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.padding_mask = mask if isinstance(mask, torch.Tensor) else None
        self.forward = None

    def end_model_forward(self, module, args, output):
        # The forward's state holds its cache: drop it so a finished request's cache can go.
        self.forward = None
        self.padding_mask = None

    def backend_for(self, device: torch.device, dtype: torch.dtype, kv_dtype: str,
                    geometry: tuple[int, int, int]) -> backends.DCABackend:
        """The backend for this device, dtype and KV dtype, chosen (and self-checked) once."""
        key = BackendKey(device, dtype, kv_dtype)
        backend = self.backends.get(key)
        if backend is None:
            backend, report = selfcheck.select(self.config.backend, key, geometry, self.rope.build)
            self.backends[key], self.reports[key] = backend, report
        self.last_key = key
        return backend

    def forward_for(self, layer_idx: int, scaling: float, backend, cache, position_ids, query) -> backends.ForwardState:
        """The forward in progress, or a new one: the pre-hook cleared it, or (layers called
        directly) this layer already used it, or it was made for another cache, shape or device."""
        bsz, q_len = query.shape[0], query.shape[2]
        forward = self.forward
        if (
            forward is None or layer_idx in forward.layers or isinstance(forward, PackedForward)
            or forward.inputs.cache is not cache or (forward.inputs.bsz, forward.inputs.q_len) != (bsz, q_len)
            or forward.inputs.device != query.device  # layers spread over devices: indices on each
        ):
            past = cache.get_seq_length(layer_idx) if cache is not None else 0
            mask = self.padding_mask
            if mask is not None:
                _check_mask(mask, past + q_len)
                if backend.left_padding_only and mask.device.type == "cpu":
                    _check_left_padded(mask)
            inputs = ForwardInputs(cache=cache, padding_mask=mask, position_ids=position_ids, bsz=bsz, q_len=q_len,
                                   past=past, device=query.device, scaling=scaling, rope=self.rope)
            forward = self.forward = backend.begin_forward(inputs)
        forward.layers.add(layer_idx)
        return forward

    def packed_for(self, layer_idx: int, scaling: float, backend, packed_cache, query) -> PackedForward:
        """`forward_for` of a packed forward (`packed_cache.packed_rows`)."""
        forward = self.forward
        if (
            forward is None or layer_idx in forward.layers or not isinstance(forward, PackedForward)
            or forward.inputs.cache is not packed_cache or forward.inputs.q_len != query.shape[2]
        ):
            inputs = ForwardInputs(cache=packed_cache, padding_mask=None, position_ids=None, bsz=1,
                                   q_len=query.shape[2], past=0, device=query.device,
                                   scaling=scaling, rope=self.rope)
            forward = self.forward = backend.begin_packed(inputs, packed_cache.packed_rows)
        forward.layers.add(layer_idx)
        return forward


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
        from dca.cache import kv_dtype_of

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

        # One packed sequence (B = 1) holding several independent rows, each with its own cache
        # (continuous batching, pipeline.engine), or an ordinary batch.
        rows = getattr(cache, "packed_rows", None)
        kv_dtype = kv_dtype_of(rows[0][0] if rows else cache)
        backend = state.backend_for(query.device, query.dtype, kv_dtype, (query.shape[1], key.shape[1], self.head_dim))
        # The backend writes the heads straight into the layout the output projection reads.
        out = torch.empty(bsz, q_len, query.shape[1], self.head_dim, dtype=query.dtype, device=query.device)
        heads = out.transpose(1, 2)  # (B, Hq, T, D) view of out
        if rows is None:
            forward = state.forward_for(self.layer_idx, self.scaling, backend, cache, position_ids, query)
            kv = backend.write(forward, self.layer_idx, key, value)
            backend.attend(forward, query, kv, heads)
        else:
            packed = state.packed_for(self.layer_idx, self.scaling, backend, cache, query)
            backend.attend_packed(packed, self.layer_idx, query, key, value, heads)
        return self.o_proj(out.view(bsz, q_len, -1)), None


def _check_mask(attention_mask, k_len):
    if attention_mask.dim() != 2:
        raise ValueError(f"a DCA model takes a 2D (batch, keys) padding mask, got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[-1] != k_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} tokens but the cache plus input hold "
            f"{k_len}; pass the mask of the whole sequence (as generate does)"
        )


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

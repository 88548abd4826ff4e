"""`apply_dca`: turns one loaded transformers model into its DCA version, in place.

The only module of `dca` that knows transformers. It swaps the attention module of every decoder
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
projections and MLP without padding; attention runs row by row. Continuous batching in
`pipeline.engine` uses it. A row cache needs `get_seq_length(layer)`, `update(k, v, layer)`
returning the row's whole keys and values, and may carry `dca_prompt_length`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dca import kernels, positions
from dca.attention import RopeTable, dca_attention, rotate_keys
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
    if config.backend == "flash":
        # Device and dtype are checked at the first forward: the model may still move to a GPU.
        if not kernels.flash_available():
            kernels.resolve_backend("flash", torch.device("cpu"), torch.float32)

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

    def capture_padding_mask(self, module, args, kwargs):
        # Base model forward(input_ids, attention_mask, ...): the mask may come positionally.
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.padding_mask = mask if isinstance(mask, torch.Tensor) else None

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
        if rows is None:
            out = self._attend(query, key, value, cache, state.padding_mask, position_ids)  # (B, Hq, T, D)
        else:
            # One packed sequence (B = 1) holding several independent rows, each with its own
            # cache: rows of different lengths share the projections and the MLP of one forward
            # (continuous batching, pipeline.engine). Attention runs row by row, unpadded.
            out = torch.empty_like(query)  # (1, Hq, T, D)
            for row_cache, start, stop in rows:
                out[:, :, start:stop] = self._attend(
                    query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop], row_cache, None, None
                )
        out = out.transpose(1, 2).reshape(bsz, q_len, -1)
        return self.o_proj(out), None

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


def _token_indices(attention_mask, position_ids, bsz, q_len, past, device):
    """(query_index (B, Tq), key_index (B, Tk)): token index from the first real token, -1 for pads."""
    k_len = past + q_len
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"a DCA model takes a 2D (batch, keys) padding mask, got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask.shape[-1] != k_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens but the cache plus input hold "
                f"{k_len}; pass the mask of the whole sequence (as generate does)"
            )
        key_index = positions.token_indices_from_mask(attention_mask.to(device))
        return key_index[:, past:], key_index
    if position_ids is None:
        query_index = torch.arange(past, k_len, device=device).expand(bsz, -1)
    else:
        query_index = position_ids.to(device).expand(bsz, -1)
    # Unpadded: keys are the tokens just before and including the queries.
    key_index = torch.arange(k_len, device=device) - (k_len - 1 - query_index[:, -1:])
    return query_index, key_index.clamp(min=-1)


def _prompt_length(cache, past, key_index):
    if cache is None:
        return None
    stored = getattr(cache, "dca_prompt_length", None)
    if stored is None and past == 0:
        stored = (key_index >= 0).sum(-1)
        cache.dca_prompt_length = stored
    return stored


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

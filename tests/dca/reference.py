"""A naive float64 Dual Chunk Attention written straight from docs/dca.md.

Independent of dca/: it computes RoPE from the model config itself (default and linear
scaling), picks the query id of every (i, j) pair explicitly and rotates the query for that pair,
then takes one softmax per row. O(n^2) memory: for tests on tiny models only.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def rope_cos_sin(config, ids: torch.Tensor, head_dim: int):
    """cos, sin (..., D) of HF's rotate-half RoPE at integer ids (default and linear scaling).

    Computed in float32 and widened, as transformers' rotary embedding does for every model
    dtype: that is the model's own RoPE whose positions DCA remaps.
    """
    rope = config.rope_parameters
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.get("rope_type", "default") == "linear":
        inv_freq = inv_freq / rope["factor"]
    freqs = ids.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(torch.float64), angles.sin().to(torch.float64)


def rotate(x: torch.Tensor, cos_sin) -> torch.Tensor:
    cos, sin = cos_sin
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def reference_scores(q, k, model_config, dca, prompt_length: int | None = None):
    """q (H, T, D), k (H, T, D) unrotated, tokens 0..T-1 -> (H, T, T) DCA logits, -inf above the diagonal."""
    h, t, d = q.shape
    S, L = dca.chunk_size, dca.chunk_len
    i = torch.arange(t)[:, None].expand(t, t)
    j = torch.arange(t)[None, :].expand(t, t)
    ci, cj = i // L, j // L
    qid = torch.where(
        ci == cj,
        i % L,
        torch.where(ci == cj + 1, torch.clamp(L + i % L, max=S), torch.full_like(i, min(2 * L - 1, S))),
    )
    kid = j % L
    q_pair = rotate(q[:, :, None, :].expand(h, t, t, d), rope_cos_sin(model_config, qid, d))  # (H, T, T, D)
    k_pair = rotate(k[:, None, :, :].expand(h, t, t, d), rope_cos_sin(model_config, kid, d))
    scores = (q_pair * k_pair).sum(-1) / math.sqrt(d)
    n = t if prompt_length is None else prompt_length
    if dca.temperature_alpha and n > dca.pretraining_length:
        m = 1 + dca.temperature_alpha * math.log(n / dca.pretraining_length)
        scores = scores * m * m
    return scores.masked_fill(j > i, float("-inf"))


class ReferenceAttention(nn.Module):
    """Replaces a Llama-layout attention module; no cache, no padding."""

    def __init__(self, original, model_config, dca, prompt_length=None):
        super().__init__()
        self.orig = original
        self.model_config = model_config
        self.dca = dca
        self.prompt_length = prompt_length

    def forward(self, hidden_states, *args, **kwargs):
        o = self.orig
        b, t, _ = hidden_states.shape
        d = o.head_dim
        q = o.q_proj(hidden_states).view(b, t, -1, d)
        k = o.k_proj(hidden_states).view(b, t, -1, d)
        if hasattr(o, "q_norm"):
            q, k = o.q_norm(q), o.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = o.v_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        outs = []
        for row in range(b):
            s = reference_scores(q[row], k[row], self.model_config, self.dca, self.prompt_length)
            outs.append(torch.softmax(s, dim=-1) @ v[row])
        out = torch.stack(outs).transpose(1, 2).reshape(b, t, -1)
        return o.o_proj(out), None


def reference_model(model, dca, prompt_length=None):
    """A float64 copy of an UNPATCHED model whose attention is the spec's DCA."""
    ref = copy.deepcopy(model).to(torch.float64)
    for layer in ref.model.layers:
        layer.self_attn = ReferenceAttention(layer.self_attn, ref.config, dca, prompt_length)
    return ref


@torch.no_grad()
def reference_logits(model, dca, input_ids, prompt_length=None):
    ref = reference_model(model, dca, prompt_length)
    return ref(input_ids, use_cache=False).logits


def reference_cache_attention(q, k, v, row_start, seq_end: int, scale, cos, sin, dca, k_scale=None, v_scale=None):
    """float64 DCA over a cache laid out as the Triton kernels read it (docs/dca.md, "Triton").

    q (B, Hq, Tq, D) unrotated; k (B, Hkv, C, D) rotated at j mod L (int8 with k_scale (B, Hkv, C));
    slot s of row b is token s - row_start[b]; the cache holds slots [0, seq_end) and the queries are
    the last Tq of them. cos, sin (S + 1, D): the rope table. scale (B,): softmax scale per row.
    Pairwise: every (query, key) pair picks its query id and is rotated on its own.
    """
    b, hq, tq, d = q.shape
    group = hq // k.shape[1]
    S, L = dca.chunk_size, dca.chunk_len
    kf, vf = k.double(), v.double()
    if k_scale is not None:
        kf, vf = kf * k_scale.double()[..., None], vf * v_scale.double()[..., None]
    cos, sin = cos.double(), sin.double()
    out = torch.zeros(b, hq, tq, d, dtype=torch.float64)
    for row in range(b):
        start = int(row_start[row])
        n = seq_end - start
        keys = kf[row, :, start:seq_end].repeat_interleave(group, 0)  # (Hq, n, D)
        values = vf[row, :, start:seq_end].repeat_interleave(group, 0)
        j = torch.arange(n)[None, :]  # (1, n)
        for t0 in range(0, tq, 16):  # (Hq, 16, n, D) at a time
            i = torch.arange(n - tq + t0, n - tq + min(tq, t0 + 16))[:, None]  # token of each query
            ic = i.clamp(min=0)
            ci, cj = ic // L, j // L
            qid = torch.where(ci == cj, ic % L,
                              torch.where(ci == cj + 1, torch.clamp(L + ic % L, max=S),
                                          torch.full_like(ci + cj, min(2 * L - 1, S))))  # (Tq, n)
            qr = q[row, :, t0 : t0 + 16].double()[:, :, None, :]  # (Hq, Tq, 1, D)
            q_pair = rotate(qr, (cos[qid], sin[qid]))  # (Hq, Tq, n, D)
            scores = (q_pair * keys[:, None]).sum(-1) * float(scale[row])  # (Hq, Tq, n)
            scores = scores.masked_fill((j > i) | (i < 0), float("-inf"))
            out[row, :, t0 : t0 + 16] = torch.softmax(scores, -1).nan_to_num(0.0) @ values
    return out

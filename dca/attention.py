"""Dual Chunk Attention on plain tensors (spec sections 2-5). Knows nothing of transformers.

Shapes: B batch, Hq query heads, Hkv key/value heads (Hq a multiple of Hkv), T tokens, D head_dim.
Head counts are read from the tensors, never from a model config, so a tensor-parallel shard
holding any subset of heads works.
"""

from __future__ import annotations

import torch

from dca import kernels, positions
from dca.config import DCAConfig

# Padded batches of a few new tokens (decode steps) with at most this many score elements
# (B * Hq * Tq * Tk) are computed in one batched pass with per-pair query selection; anything
# else row by row, chunk by chunk. Both bounds keep that pass linear in the key count.
_DENSE_PAD_QUERIES = 16
_DENSE_PAD_ELEMENTS = 1 << 25


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeTable:
    """cos/sin of the model's own rotary embedding for the only ids DCA ever uses: 0..S.

    `build(ids)` must return (cos, sin), each (len(ids), D), from the model's rotary embedding, so
    linear (PI) and other static rope scalings apply to DCA's ids unchanged. Tables are built once
    per (device, dtype) instead of at every step.
    """

    def __init__(self, config: DCAConfig, build):
        self.config = config
        self.build = build
        self._tables: dict = {}

    def tables(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        if key not in self._tables:
            ids = torch.arange(self.config.chunk_size + 1, device=device)
            self._tables[key] = self.build(ids, dtype)
        return self._tables[key]

    def rotate_range(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """x (B, H, T, D) rotated at ids min(start + t, S) for t = 0..T-1: slices, no gather."""
        cos, sin = self.tables(x.device, x.dtype)
        cap = self.config.chunk_size
        c, s = cos[start : min(stop, cap + 1)], sin[start : min(stop, cap + 1)]
        if stop > cap + 1:
            extra = stop - max(start, cap + 1)
            c = torch.cat([c, cos[cap].expand(extra, -1)])
            s = torch.cat([s, sin[cap].expand(extra, -1)])
        return x * c + rotate_half(x) * s

    def rotate(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, D) rotated at ids (B, T) or a python int."""
        cos, sin = self.tables(x.device, x.dtype)
        if isinstance(ids, int):
            c, s = cos[ids], sin[ids]  # (D,)
        else:
            c, s = cos[ids][:, None], sin[ids][:, None]  # (B, 1, T, D)
        return x * c + rotate_half(x) * s


def rotate_keys(key: torch.Tensor, key_index: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """Keys as the cache stores them: rotated at pk = j mod L (never re-rotated later)."""
    return rope.rotate(key, positions.key_ids(key_index, rope.config))


def chunked_dca(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    rope: RopeTable,
    scale: float,
    partial,
    prompt_length: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`dca_attention` (same arguments and result) computed from partial attentions that return
    their LSE, `partial(q, k, v, scale, causal) -> (out, lse)` (dca/kernels.py's contract): up to
    three calls per query chunk merged in float32, a decode step by `decode_row`, padded batches
    of a few new tokens by `_dense`, other padded batches row by row. The torch and flash backends."""
    config = rope.config
    b, _, tq, _ = query.shape
    tk = key.shape[2]
    real_keys = (key_index >= 0).sum(-1)  # (B,)
    if prompt_length is None:
        prompt_length = real_keys
    n = [int(x) for x in prompt_length.tolist()]
    if out is None:
        out = torch.empty_like(query)

    # Common case: every row is the same unpadded sequence -> one batched pass.
    first_q, first_k = query_index[:1], key_index[:1]
    if (
        bool((first_k[0, 0] == 0).item())
        and bool((query_index == first_q).all())
        and bool((key_index == first_k).all())
        and len(set(n)) == 1
    ):
        _check_contiguous(first_q[0], first_k[0])
        scale_b = scale * positions.temperature_factor(n[0], config)
        if b == 1 and tq == 1:  # one decode step
            q3 = decode_queries(query[:, :, 0], [tk - 1], rope)
            out[0, :, 0] = decode_row(q3[0], key[0], value[0], tk - 1, config.chunk_len, scale_b)
            return out
        return _chunked(query, key, value, tk - tq, rope, scale_b, partial, out)

    if tq <= _DENSE_PAD_QUERIES and b * query.shape[1] * tq * tk <= _DENSE_PAD_ELEMENTS:
        # In the accumulation dtype: float32 factors would cost float64 inputs 1e-8 of precision.
        factors = torch.tensor([positions.temperature_factor(x, config) for x in n],
                               dtype=kernels.accumulation_dtype(query.dtype), device=query.device)
        out.copy_(_dense(query, key, value, query_index, key_index, rope, scale * factors))
        return out

    out.zero_()
    for row in range(b):
        q_real = torch.nonzero(query_index[row] >= 0).flatten()
        k_real = torch.nonzero(key_index[row] >= 0).flatten()
        if q_real.numel() == 0:
            continue
        q0, k0 = int(q_real[0]), int(k_real[0])
        _check_contiguous(query_index[row, q0:], key_index[row, k0:])
        scale_b = scale * positions.temperature_factor(n[row], config)
        kr, vr = key[row : row + 1, :, k0:], value[row : row + 1, :, k0:]
        t0 = kr.shape[2] - (tq - q0)
        _chunked(query[row : row + 1, :, q0:], kr, vr, t0, rope, scale_b, partial, out[row : row + 1, :, q0:])
    return out


def decode_queries(query: torch.Tensor, tokens, rope: RopeTable) -> torch.Tensor:
    """The three rotations of one new query per row, for `decode_row`.

    query (R, Hq, D) not rotated; tokens: each row's token index (R ints or an (R,) tensor) ->
    (R, Hq, 3, D) in the
    accumulation dtype, rotated at the intra, successive and inter query ids (spec section 2).
    Batched over the rows: three rotations per layer whatever the number of rows.
    """
    config = rope.config
    index = torch.as_tensor(tokens, device=query.device).reshape(-1, 1)  # (R, 1)
    q = query[:, :, None]  # (R, Hq, 1, D)
    parts = (
        rope.rotate(q, positions.intra_query_ids(index, config)),
        rope.rotate(q, positions.successive_query_ids(index, config)),
        rope.rotate(q, config.inter_query_id),
    )
    return torch.cat(parts, dim=2).to(kernels.accumulation_dtype(query.dtype))


def decode_row(q3: torch.Tensor, key: torch.Tensor, value: torch.Tensor, token: int, chunk_len: int,
               scale: float) -> torch.Tensor:
    """DCA of ONE new query of one row against its keys: tokens 0..token, unpadded.

    q3 (Hq, 3, D) from `decode_queries`; key, value (Hkv, token + 1, D), keys rotated at j mod L.
    -> (Hq, D) in the accumulation dtype.

    Why not `_chunked` for a decode step: it makes three attention calls and an LSE merge, and
    the CPU attention kernel's fixed cost per call (~0.1 ms) dominates a one-query problem.
    Here the three key ranges (inter: chunks before the previous one, successive: the previous
    chunk, intra: the query's own chunk) are scored with exactly-sized matmuls, each with its own
    query rotation, and joined by ONE softmax: the same value as the merge, in five small ops.
    Continuous batching runs this once per decoding row and layer.
    """
    hq, _, d = q3.shape
    hkv = key.shape[0]
    q = q3.reshape(hkv, hq // hkv, 3, d)  # query heads of a group share their KV head
    acc = q3.dtype
    chunk = token // chunk_len
    bounds = ((0, (chunk - 1) * chunk_len, 2), ((chunk - 1) * chunk_len, chunk * chunk_len, 1),
              (chunk * chunk_len, token + 1, 0))
    scores = [torch.matmul(q[:, :, which], key[:, lo:hi].to(acc).transpose(-1, -2))
              for lo, hi, which in bounds if hi > max(lo, 0)]  # (Hkv, g, keys)
    s = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)
    p = torch.softmax(s * scale, dim=-1)
    return torch.matmul(p, value.to(acc)).reshape(hq, d)


def _check_contiguous(q_idx: torch.Tensor, k_idx: torch.Tensor) -> None:
    """Keys must be tokens 0..K-1 in order, queries the last Tq of them."""
    k_len, q_len = k_idx.shape[0], q_idx.shape[0]
    expected = torch.arange(k_len, device=k_idx.device)
    if q_len > k_len or not torch.equal(k_idx, expected) or not torch.equal(q_idx, expected[k_len - q_len :]):
        raise ValueError(
            "DCA needs each row's real tokens contiguous (left padding only) with the queries the "
            "last tokens of the keys; got positions that are not. Right padding with a cache, or "
            "packed sequences, are not supported."
        )


def _chunked(q, k, v, t0: int, rope: RopeTable, scale: float, partial, out: torch.Tensor) -> torch.Tensor:
    """Rows with keys = tokens 0..K-1 and queries = tokens t0..K-1, query chunk by query chunk,
    written into `out` (the shape of q, any strides).

    For queries in chunk c: intra keys are chunk c (causal), successive keys chunk c-1, inter keys
    everything older. Each is one `partial` call with its own query rotation; memory is linear in K.
    """
    config = rope.config
    L = config.chunk_len
    b, _, tq, _ = q.shape
    k_len = k.shape[2]
    # Each chunk's merged float32 result goes straight into the output (query dtype): no
    # full-length float32 copy and no concatenation.
    first_chunk, last_chunk = t0 // L, (k_len - 1) // L
    for c in range(first_chunk, last_chunk + 1):
        qa, qb = max(t0, c * L), min(k_len, (c + 1) * L)  # token range of this block's queries
        qs = q[:, :, qa - t0 : qb - t0]  # (B, Hq, qb-qa, D)
        # Queries of one chunk have consecutive ids: i mod L = offset in the chunk, and the
        # successive id L + (i mod L) capped at S.
        a0, a1 = qa - c * L, qb - c * L
        intra_q = rope.rotate_range(qs, a0, a1)
        parts = [partial(intra_q, k[:, :, c * L : qb], v[:, :, c * L : qb], scale, True)]
        if c >= 1:
            succ_q = rope.rotate_range(qs, L + a0, L + a1)
            lo = (c - 1) * L
            parts.append(partial(succ_q, k[:, :, lo : c * L], v[:, :, lo : c * L], scale, False))
        if c >= 2:
            inter_q = rope.rotate(qs, config.inter_query_id)
            hi = (c - 1) * L
            parts.append(partial(inter_q, k[:, :, :hi], v[:, :, :hi], scale, False))
        out[:, :, qa - t0 : qb - t0] = kernels.merge(parts)[0]
    return out


def _dense(q, k, v, q_idx, k_idx, rope: RopeTable, scale: torch.Tensor) -> torch.Tensor:
    """Padded batches with few queries (decode steps): per-pair query choice over all keys at once.

    Memory is B * Hq * Tq * Tk, linear in the key count for a bounded number of new tokens.
    """
    config = rope.config
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    rel = positions.relation(q_idx, k_idx, config)[:, None]  # (B, 1, Tq, Tk)
    acc = kernels.accumulation_dtype(q.dtype)
    kf = k.to(acc).transpose(-1, -2)  # (B, Hkv, D, Tk)

    def scores(ids):
        qr = rope.rotate(q, ids).to(acc).reshape(b, hkv, (hq // hkv) * tq, d)
        return torch.matmul(qr, kf).reshape(b, hq, tq, -1)  # (B, Hq, Tq, Tk)

    s = scores(positions.intra_query_ids(q_idx, config))
    s = torch.where(rel == 1, scores(positions.successive_query_ids(q_idx, config)), s)
    s = torch.where(rel == 2, scores(config.inter_query_id), s)
    s = s * scale.view(b, 1, 1, 1)
    s = s.masked_fill(rel < 0, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-pad query rows -> 0
    out = torch.matmul(p.reshape(b, hkv, -1, s.shape[-1]), v.to(acc))  # (B, Hkv, g*Tq, D)
    return out.reshape(b, hq, tq, d)

"""Triton kernels of Dual Chunk Attention: one prefill pass, split-KV decode, and the cache write.

Every kernel computes exactly the DCA of docs/dca.md for rows laid out as a KV cache stores them
(left padding, one column per position of the batch):

    slot s of row b holds token s - row_start[b] (a pad when that is negative);
    the cache holds slots [0, seq_end); the Tq queries are the last Tq slots.

Keys are stored already rotated at `j mod L` (spec section 4). The query rotation is chosen per
(query, key) pair INSIDE the kernels from the chunks of i and j (intra `i mod L`, successive
`min(L + i mod L, S)`, inter `min(2L - 1, S)`): queries are rotated in registers from the model's
own cos/sin table, so there is no merge pass and the number of launches per layer does not depend
on the number of DCA chunks.

- `prefill`: one program per (block of queries, query head), online softmax over key blocks;
  the key head is indexed (h // group), never copied. Keys more than one chunk behind a query block
  all use the inter rotation and need no mask: they run in a plain loop; only the band near the
  diagonal (at most ~2 chunks) picks rotations per pair.
- `decode`: flash-decoding for 1..few new tokens per row: the query heads of one KV head (and
  the new tokens) are folded into the rows of one program, the keys are split over programs, and
  `_decode_reduce_kernel` merges the splits. The grid depends only on tensor shapes (the cache's
  capacity), never on lengths, so a decode step can be captured in a CUDA graph.
- `store`: rotates new keys at `j mod L`, optionally quantises keys and values to int8 (the format
  of dca/kv_quant.py: one float32 scale per (row, head, token)) and writes them into the cache at
  a position read from device memory.

int8 caches are dequantised inside the attention kernels: the key scale multiplies the scores
and the value scale the probabilities, so no dequantised copy of the cache is ever made.

Per-row metadata (row_start, seq_end, the softmax scale with the attention temperature) is
passed as device tensors: nothing here reads a GPU value back to the host.

With TRITON_INTERPRET=1 set before this module is imported, the kernels run on CPU tensors
through Triton's interpreter (slowly): that is how the CPU test suite checks them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether kernels are compiled or interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Queries per row up to which `attention` uses the split-KV decode kernel (with GQA folding the
# rows of one program are group * queries, capped at _DECODE_MAX_ROWS).
DECODE_MAX_QUERIES = 16
_DECODE_MAX_ROWS = 128
_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    Q, K, V, K_SCALE, V_SCALE, O, COS, SIN, ROW_START, SEQ_END, SCALE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_sb, stride_sh, stride_st,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_cos,
    n_heads, group, n_queries, head_dim,
    chunk_len, chunk_size, inter_id,
    BLOCK_D: tl.constexpr, INT8: tl.constexpr, F64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Helpers are inlined by hand: the interpreter pays for every nested jit call.
    acc_t = tl.float64 if F64 else tl.float32
    dot_t = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    hk = h // group
    row_start = tl.load(ROW_START + b)
    n_real = tl.load(SEQ_END) - row_start  # real keys of this row, the queries included
    qk_scale = tl.load(SCALE + b).to(acc_t) * 1.4426950408889634  # scores in log2 units (exp2)

    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query slot
    i = n_real - n_queries + t  # its token index (< 0: a pad)
    row_ok = (t < n_queries) & (i >= 0)
    i_c = tl.maximum(i, 0)
    ci = i_c // chunk_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    half = head_dim // 2
    offs_sw = tl.where(offs_d < half, offs_d + half, offs_d - half)
    sign = tl.where(offs_d < half, -1.0, 1.0).to(acc_t)
    q_rows = Q + b * stride_qb + h * stride_qh + t[:, None] * stride_qt
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0).to(acc_t)
    q_sw = tl.load(q_rows + offs_sw[None, :] * stride_qd, mask=q_mask, other=0.0).to(acc_t) * sign[None, :]
    # The three rotations of spec section 2: x * cos[id] + rotate_half(x) * sin[id].
    cs_d = offs_d[None, :]
    cs_mask = d_ok[None, :]
    ids = (i_c % chunk_len)[:, None] * stride_cos
    q_intra = (q * tl.load(COS + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)
               + q_sw * tl.load(SIN + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)).to(dot_t)
    ids = tl.minimum(chunk_len + i_c % chunk_len, chunk_size)[:, None] * stride_cos
    q_succ = (q * tl.load(COS + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)
              + q_sw * tl.load(SIN + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)).to(dot_t)
    ids = inter_id * stride_cos
    q_inter = (q * tl.load(COS + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)
               + q_sw * tl.load(SIN + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)).to(dot_t)

    # Token range of this block's real queries and their chunks.
    i_first = n_real - n_queries + pid_m * BLOCK_M
    i_last = tl.minimum(i_first + BLOCK_M - 1, n_real - 1)
    ca = tl.maximum(i_first, 0) // chunk_len
    cb = tl.maximum(i_last, 0) // chunk_len
    # Keys before j_far are >= 2 chunks behind every query of the block: inter rotation, visible.
    j_far = (tl.maximum(ca - 1, 0) * chunk_len) // BLOCK_N * BLOCK_N

    m_i = tl.zeros([BLOCK_M], dtype=acc_t) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=acc_t)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_t)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    s_base = b * stride_sb + hk * stride_sh
    offs_n = tl.arange(0, BLOCK_N)

    # Near band: keys [j_far, i_last], causal, rotation chosen per pair.
    for j0 in range(j_far, i_last + 1, BLOCK_N):
        j = j0 + offs_n
        kv_ok = j <= i_last
        slot = (row_start + j).to(tl.int64)
        k = tl.load(k_base + offs_d[:, None] * stride_kd + slot[None, :] * stride_kt,
                    mask=d_ok[:, None] & kv_ok[None, :], other=0).to(dot_t)  # (D, N)
        rel = tl.minimum(tl.maximum(ci[:, None] - (j // chunk_len)[None, :], 0), 2)
        rel_lo = tl.minimum(tl.maximum(ca - tl.minimum(j0 + BLOCK_N - 1, i_last) // chunk_len, 0), 2)
        rel_hi = tl.minimum(tl.maximum(cb - j0 // chunk_len, 0), 2)
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
        if rel_lo == 0:
            s = tl.where(rel == 0, tl.dot(q_intra, k, input_precision=PREC).to(acc_t), s)
        if (rel_lo <= 1) & (rel_hi >= 1):
            s = tl.where(rel == 1, tl.dot(q_succ, k, input_precision=PREC).to(acc_t), s)
        if rel_hi == 2:
            s = tl.where(rel == 2, tl.dot(q_inter, k, input_precision=PREC).to(acc_t), s)
        if INT8:  # dequantise: the key scale multiplies the scores
            s = s * tl.load(K_SCALE + s_base + slot * stride_st, mask=kv_ok, other=0.0).to(acc_t)[None, :]
        visible = row_ok[:, None] & kv_ok[None, :] & (j[None, :] <= i[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if INT8:  # and the value scale the probabilities
            p = p * tl.load(V_SCALE + s_base + slot * stride_st, mask=kv_ok, other=0.0).to(acc_t)[None, :]
        v = tl.load(v_base + slot[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=kv_ok[:, None] & d_ok[None, :], other=0).to(dot_t)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_t), v, input_precision=PREC).to(acc_t)
        m_i = m_new

    # Far keys [0, j_far): one rotation, nothing masked.
    for j0 in range(0, j_far, BLOCK_N):
        slot = (row_start + j0 + offs_n).to(tl.int64)
        k = tl.load(k_base + offs_d[:, None] * stride_kd + slot[None, :] * stride_kt,
                    mask=d_ok[:, None], other=0).to(dot_t)
        s = tl.dot(q_inter, k, input_precision=PREC).to(acc_t)
        if INT8:
            s = s * tl.load(K_SCALE + s_base + slot * stride_st).to(acc_t)[None, :]
        s = s * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if INT8:
            p = p * tl.load(V_SCALE + s_base + slot * stride_st).to(acc_t)[None, :]
        v = tl.load(v_base + slot[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=d_ok[None, :], other=0).to(dot_t)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_t), v, input_precision=PREC).to(acc_t)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = tl.where(row_ok[:, None], out, 0.0)
    o_rows = O + b * stride_ob + h * stride_oh + t[:, None] * stride_ot
    tl.store(o_rows + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=(t < n_queries)[:, None] & d_ok[None, :])


@triton.jit
def _decode_kernel(
    Q, K, V, K_SCALE, V_SCALE, O_PART, LSE_PART, COS, SIN, ROW_START, SEQ_END, SCALE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_sb, stride_sh, stride_st,
    stride_pb, stride_ph, stride_pt, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_lt, stride_ls,
    stride_cos,
    n_kv_heads, group, n_queries, head_dim,
    chunk_len, chunk_size, inter_id,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr, F64: tl.constexpr,
    PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    acc_t = tl.float64 if F64 else tl.float32
    dot_t = Q.dtype.element_ty
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = (pid // n_kv_heads).to(tl.int64)
    hk = (pid % n_kv_heads).to(tl.int64)
    row_start = tl.load(ROW_START + b)
    n_real = tl.load(SEQ_END) - row_start
    qk_scale = tl.load(SCALE + b).to(acc_t) * 1.4426950408889634

    # Rows: the group's query heads x the new tokens (GQA folded: K/V read once per KV head).
    r = tl.arange(0, BLOCK_R)
    h = hk * group + r // n_queries
    t = r % n_queries
    row_valid = r < group * n_queries
    i = n_real - n_queries + t
    row_ok = row_valid & (i >= 0)
    i_c = tl.maximum(i, 0)
    ci = i_c // chunk_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    half = head_dim // 2
    offs_sw = tl.where(offs_d < half, offs_d + half, offs_d - half)
    sign = tl.where(offs_d < half, -1.0, 1.0).to(acc_t)
    q_rows = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0).to(acc_t)
    q_sw = tl.load(q_rows + offs_sw[None, :] * stride_qd, mask=q_mask, other=0.0).to(acc_t) * sign[None, :]
    cs_d = offs_d[None, :]
    cs_mask = d_ok[None, :]
    ids = (i_c % chunk_len)[:, None] * stride_cos
    q_intra = (q * tl.load(COS + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)
               + q_sw * tl.load(SIN + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)).to(dot_t)
    ids = tl.minimum(chunk_len + i_c % chunk_len, chunk_size)[:, None] * stride_cos
    q_succ = (q * tl.load(COS + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)
              + q_sw * tl.load(SIN + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)).to(dot_t)
    ids = inter_id * stride_cos
    q_inter = (q * tl.load(COS + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)
               + q_sw * tl.load(SIN + ids + cs_d, mask=cs_mask, other=0.0).to(acc_t)).to(dot_t)

    ca = tl.maximum(n_real - n_queries, 0) // chunk_len
    cb = tl.maximum(n_real - 1, 0) // chunk_len
    # This program's share of the keys [0, n_real), in whole key blocks.
    per_split = (tl.maximum(n_real, 0) + n_splits - 1) // n_splits
    span = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * span
    hi = tl.minimum(lo + span, n_real)

    m_i = tl.zeros([BLOCK_R], dtype=acc_t) - float("inf")
    l_i = tl.zeros([BLOCK_R], dtype=acc_t)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=acc_t)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    s_base = b * stride_sb + hk * stride_sh
    offs_n = tl.arange(0, BLOCK_N)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + offs_n
        kv_ok = j < hi
        slot = (row_start + j).to(tl.int64)
        k = tl.load(k_base + offs_d[:, None] * stride_kd + slot[None, :] * stride_kt,
                    mask=d_ok[:, None] & kv_ok[None, :], other=0).to(dot_t)
        rel_lo = tl.minimum(tl.maximum(ca - tl.minimum(j0 + BLOCK_N - 1, hi - 1) // chunk_len, 0), 2)
        rel_hi = tl.minimum(tl.maximum(cb - j0 // chunk_len, 0), 2)
        if rel_lo == 2:  # the common case at long context: one rotation for the whole block
            s = tl.dot(q_inter, k, input_precision=PREC).to(acc_t)
        else:
            rel = tl.minimum(tl.maximum(ci[:, None] - (j // chunk_len)[None, :], 0), 2)
            s = tl.zeros([BLOCK_R, BLOCK_N], dtype=acc_t)
            if rel_lo == 0:
                s = tl.where(rel == 0, tl.dot(q_intra, k, input_precision=PREC).to(acc_t), s)
            if (rel_lo <= 1) & (rel_hi >= 1):
                s = tl.where(rel == 1, tl.dot(q_succ, k, input_precision=PREC).to(acc_t), s)
            if rel_hi == 2:
                s = tl.where(rel == 2, tl.dot(q_inter, k, input_precision=PREC).to(acc_t), s)
        if INT8:
            s = s * tl.load(K_SCALE + s_base + slot * stride_st, mask=kv_ok, other=0.0).to(acc_t)[None, :]
        visible = row_ok[:, None] & kv_ok[None, :] & (j[None, :] <= i[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if INT8:
            p = p * tl.load(V_SCALE + s_base + slot * stride_st, mask=kv_ok, other=0.0).to(acc_t)[None, :]
        v = tl.load(v_base + slot[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=kv_ok[:, None] & d_ok[None, :], other=0).to(dot_t)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_t), v, input_precision=PREC).to(acc_t)
        m_i = m_new

    # Partial result of this split: normalised output and log2-sum-exp (-inf when it saw nothing).
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
    p_rows = O_PART + b * stride_pb + h[:, None] * stride_ph + t[:, None] * stride_pt + split * stride_ps
    tl.store(p_rows + offs_d[None, :] * stride_pd, out.to(O_PART.dtype.element_ty),
             mask=row_valid[:, None] & d_ok[None, :])
    tl.store(LSE_PART + b * stride_lb + h * stride_lh + t * stride_lt + split * stride_ls,
             lse.to(LSE_PART.dtype.element_ty), mask=row_valid)


@triton.jit
def _decode_reduce_kernel(
    O_PART, LSE_PART, O,
    stride_pb, stride_ph, stride_pt, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_lt, stride_ls,
    stride_ob, stride_oh, stride_ot, stride_od,
    n_heads, n_queries, n_splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid % n_queries
    h = (pid // n_queries) % n_heads
    b = (pid // n_queries // n_heads).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    s_ok = sp < n_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    lse = tl.load(LSE_PART + b * stride_lb + h * stride_lh + t * stride_lt + sp * stride_ls,
                  mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_use)  # 0 for splits that saw no key
    part = tl.load(O_PART + b * stride_pb + h * stride_ph + t * stride_pt + sp[:, None] * stride_ps
                   + offs_d[None, :] * stride_pd, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    tl.store(O + b * stride_ob + h * stride_oh + t * stride_ot + offs_d * stride_od,
             out.to(O.dtype.element_ty), mask=d_ok)


@triton.jit
def _store_kernel(
    K_NEW, V_NEW, K_BUF, V_BUF, K_SCALE, V_SCALE, COS, SIN, ROW_START, WRITE_START,
    stride_nb, stride_nh, stride_nt, stride_nd,
    stride_mb, stride_mh, stride_mt, stride_md,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_sb, stride_sh, stride_st,
    stride_cos,
    n_kv_heads, n_new, head_dim, chunk_len,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr, F64: tl.constexpr,
):
    # Rows are (KV head, new token) pairs of one batch row: one program per row at decode.
    acc_t = tl.float64 if F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    hk = (g // n_new).to(tl.int64)
    t = g % n_new
    t_ok = g < n_kv_heads * n_new
    col = (tl.load(WRITE_START) + t).to(tl.int64)  # cache slot of each new token
    key_id = tl.maximum(col - tl.load(ROW_START + b), 0) % chunk_len  # j mod L (pads: 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    half = head_dim // 2
    offs_sw = tl.where(offs_d < half, offs_d + half, offs_d - half)
    sign = tl.where(offs_d < half, -1.0, 1.0).to(acc_t)
    mask = t_ok[:, None] & d_ok[None, :]
    k_rows = K_NEW + b * stride_nb + hk[:, None] * stride_nh + t[:, None] * stride_nt
    k = tl.load(k_rows + offs_d[None, :] * stride_nd, mask=mask, other=0.0).to(acc_t)
    k_sw = tl.load(k_rows + offs_sw[None, :] * stride_nd, mask=mask, other=0.0).to(acc_t) * sign[None, :]
    ids = key_id[:, None] * stride_cos + offs_d[None, :]
    c = tl.load(COS + ids, mask=mask, other=0.0).to(acc_t)
    s = tl.load(SIN + ids, mask=mask, other=0.0).to(acc_t)
    # The rotated key in the model dtype: what the torch path stores.
    k = (k * c + k_sw * s).to(K_NEW.dtype.element_ty)
    v = tl.load(V_NEW + b * stride_mb + hk[:, None] * stride_mh + t[:, None] * stride_mt + offs_d[None, :] * stride_md,
                mask=mask, other=0.0)
    k_dst = K_BUF + b * stride_kb + hk[:, None] * stride_kh + col[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_dst = V_BUF + b * stride_vb + hk[:, None] * stride_vh + col[:, None] * stride_vt + offs_d[None, :] * stride_vd
    if INT8:
        # dca/kv_quant.quantize_int8: scale = max|x| / 127 per (row, head, token), round half to even.
        s_off = b * stride_sb + hk * stride_sh + col * stride_st
        x = k.to(tl.float32)
        scale = tl.maximum(tl.max(tl.where(mask, tl.abs(x), 0.0), 1) / 127.0, 1.1754943508222875e-38)
        y = x / scale[:, None]
        r = tl.floor(y + 0.5)
        r = tl.where(((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)
        tl.store(k_dst, tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8), mask=mask)
        tl.store(K_SCALE + s_off, scale, mask=t_ok)
        x = v.to(tl.float32)
        scale = tl.maximum(tl.max(tl.where(mask, tl.abs(x), 0.0), 1) / 127.0, 1.1754943508222875e-38)
        y = x / scale[:, None]
        r = tl.floor(y + 0.5)
        r = tl.where(((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)
        tl.store(v_dst, tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8), mask=mask)
        tl.store(V_SCALE + s_off, scale, mask=t_ok)
    else:
        tl.store(k_dst, k.to(K_BUF.dtype.element_ty), mask=mask)
        tl.store(v_dst, v.to(V_BUF.dtype.element_ty), mask=mask)


# --- host side ---------------------------------------------------------------------------------


def _pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, triton.next_power_of_2(n))


# Tile sizes and key splits on CPU (the interpreter): its cost is per operation and per program,
# not per element, so large tiles and one split are cheapest; the kernel tests shrink the tiles
# to 16 and use several splits to cross more block, chunk and split boundaries.
CPU_TILES = dict(prefill=(32, 32, 1, 1), decode=(64, 1, 1), store=64, splits=1)
# On CUDA: prefill (BLOCK_M, BLOCK_N, warps, stages), decode (BLOCK_N, warps, stages). Moderate
# choices from Triton's fused-attention tutorial, NOT yet tuned on a GPU (benchmarks/gpu_bench.py
# sweeps the prefill tiles and reports the best). A launch that runs out of shared memory or
# registers falls back to the next, smaller entry.
CUDA_TILES = dict(
    prefill=[(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
    prefill_fp32=[(64, 32, 4, 2), (32, 32, 4, 1)],
    decode=[(64, 4, 2), (32, 4, 1)],
    store=32,
)


def _overrides():
    """DCA_TRITON_BLOCKS='BM,BN,warps,stages' (prefill) for tuning runs on a GPU."""
    text = os.environ.get("DCA_TRITON_BLOCKS")
    return tuple(int(x) for x in text.split(",")) if text else None


def _tile_choices(kind: str, device: torch.device, dtype: torch.dtype) -> list:
    if device.type != "cuda":
        return [CPU_TILES[kind]]
    if kind == "prefill":
        override = _overrides()
        if override:
            return [override]
        return CUDA_TILES["prefill_fp32" if dtype in (torch.float32, torch.float64) else "prefill"]
    return CUDA_TILES[kind] if kind == "decode" else [CUDA_TILES[kind]]


def _launch_with_fallback(kind: str, device, dtype, launch):
    """launch(tiles) with the first tile choice that compiles on this GPU (remembered)."""
    from triton.runtime.errors import OutOfResources

    key = (kind, device.type, dtype)
    choices = _tile_choices(kind, device, dtype)
    start = _WORKING.get(key, 0) if len(choices) > 1 else 0
    for index in range(start, len(choices)):
        try:
            result = launch(choices[index])
            _WORKING[key] = index
            return result
        except OutOfResources:
            if index == len(choices) - 1:
                raise


_WORKING: dict = {}


def _flags(q: torch.Tensor) -> dict:
    # float32: full-precision products (tl.dot would use TF32 on tensor cores).
    wide = q.dtype in (torch.float32, torch.float64)
    return dict(F64=q.dtype == torch.float64, PREC="ieee" if wide else "tf32")


def _scale_strides(k_scale: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if k_scale is None else tuple(k_scale.stride())


def _check(q, k, v, cos, config_ids):
    b, hq, tq, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[3] != d or v.shape[:2] != k.shape[:2] or v.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not form one attention")
    if hq % k.shape[1]:
        raise ValueError(f"{hq} query heads are not a multiple of {k.shape[1]} key/value heads")
    if d % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {d}")
    if cos.stride(-1) != 1:
        raise ValueError("the rope table must be contiguous along head_dim")
    if cos.shape[0] <= max(config_ids):
        raise ValueError(f"the rope table has {cos.shape[0]} rows; DCA uses ids up to {max(config_ids)}")


def prefill(q, k, v, row_start, seq_end, scale, cos, sin, config, k_scale=None, v_scale=None):
    """DCA of the queries against the cache, one program per (query block, query head).

    q       (B, Hq, Tq, D)   not rotated, any strides; the last Tq tokens of each row
    k, v    (B, Hkv, C, D)   the cache (C >= seq_end slots), keys rotated at j mod L; model dtype or int8
    row_start (B,) int32     slot of each row's first real token (device)
    seq_end (1,) int32       slots filled, the queries' own included (device)
    scale   (B,) float       softmax scale times the temperature m^2 of each row (device)
    cos, sin (S+1, D)        the model's rotary table at ids 0..S (dca.attention.RopeTable)
    config  DCAConfig        L, S and the inter id
    k_scale, v_scale (B, Hkv, C) float32 for int8 k, v
    Returns (B, Hq, Tq, D) in q's dtype; pad query rows are zeros.
    """
    b, hq, tq, d = q.shape
    _check(q, k, v, cos, (config.chunk_size, config.inter_query_id))
    int8 = k.dtype == torch.int8
    out = torch.empty(b, hq, tq, d, device=q.device, dtype=q.dtype)
    ks = k_scale if int8 else k
    vs = v_scale if int8 else k

    def launch(tiles):
        bm, bn, warps, stages = tiles
        _prefill_kernel[(triton.cdiv(tq, bm), b * hq)](
            q, k, v, ks, vs, out, cos, sin, row_start, seq_end, scale,
            *q.stride(), *k.stride(), *v.stride(), *_scale_strides(k_scale if int8 else None),
            *out.stride(), cos.stride(0),
            hq, hq // k.shape[1], tq, d,
            config.chunk_len, config.chunk_size, config.inter_query_id,
            BLOCK_D=_pow2(d), INT8=int8, **_flags(q), BLOCK_M=bm, BLOCK_N=bn,
            num_warps=warps, num_stages=stages,
        )
        return out

    return _launch_with_fallback("prefill", q.device, q.dtype, launch)


def _num_splits(q: torch.Tensor, batch_heads: int, capacity: int, block_n: int) -> int:
    """Key splits per (row, KV head): enough programs to fill the GPU, from shapes only."""
    blocks = max(1, triton.cdiv(capacity, block_n))
    if q.device.type != "cuda":
        return min(CPU_TILES["splits"], blocks)  # the interpreter: a few, so the merge is exercised
    sms = _sm_count(q.device)
    return max(1, min(blocks, triton.cdiv(2 * sms, batch_heads), 256))


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def decode(q, k, v, row_start, seq_end, scale, cos, sin, config, k_scale=None, v_scale=None, num_splits=None):
    """Split-KV DCA for a few new tokens per row; same arguments and result as `prefill`.

    The query heads sharing a KV head are folded into one program's rows; the keys of each row
    are split over `num_splits` programs (default: from the cache capacity and the GPU's SM
    count, so the grid is the same at every step) and merged by `_decode_reduce_kernel`.
    """
    b, hq, tq, d = q.shape
    _check(q, k, v, cos, (config.chunk_size, config.inter_query_id))
    hkv = k.shape[1]
    group = hq // hkv
    if group * tq > _DECODE_MAX_ROWS:
        raise ValueError(f"decode folds group * queries = {group * tq} rows; at most {_DECODE_MAX_ROWS}")
    int8 = k.dtype == torch.int8
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    ks = k_scale if int8 else k
    vs = v_scale if int8 else k

    def launch(tiles):
        bn, warps, stages = tiles
        splits = num_splits or _num_splits(q, b * hkv, k.shape[2], bn)
        part = torch.empty(b, hq, tq, splits, d, device=q.device, dtype=acc)
        lse = torch.empty(b, hq, tq, splits, device=q.device, dtype=acc)
        _decode_kernel[(b * hkv, splits)](
            q, k, v, ks, vs, part, lse, cos, sin, row_start, seq_end, scale,
            *q.stride(), *k.stride(), *v.stride(), *_scale_strides(k_scale if int8 else None),
            *part.stride(), *lse.stride(), cos.stride(0),
            hkv, group, tq, d,
            config.chunk_len, config.chunk_size, config.inter_query_id,
            BLOCK_R=_pow2(group * tq), BLOCK_D=_pow2(d), INT8=int8, **_flags(q), BLOCK_N=bn,
            num_warps=warps, num_stages=stages,
        )
        return splits, part, lse

    splits, part, lse = _launch_with_fallback("decode", q.device, q.dtype, launch)
    if splits == 1:  # nothing to merge: the one partial result is the output
        return part[:, :, :, 0].to(q.dtype)
    out = torch.empty(b, hq, tq, d, device=q.device, dtype=q.dtype)
    _decode_reduce_kernel[(b * hq * tq,)](
        part, lse, out, *part.stride(), *lse.stride(), *out.stride(),
        hq, tq, splits, d, BLOCK_S=_pow2(splits, 2), BLOCK_D=_pow2(d),
    )
    return out


def attention(q, k, v, row_start, seq_end, scale, cos, sin, config, k_scale=None, v_scale=None):
    """`decode` for a few new tokens per row, `prefill` otherwise (same arguments and result)."""
    group = q.shape[1] // k.shape[1]
    if q.shape[2] <= DECODE_MAX_QUERIES and group * q.shape[2] <= _DECODE_MAX_ROWS:
        return decode(q, k, v, row_start, seq_end, scale, cos, sin, config, k_scale, v_scale)
    return prefill(q, k, v, row_start, seq_end, scale, cos, sin, config, k_scale, v_scale)


def store(key, value, k_buf, v_buf, cos, sin, row_start, write_start, chunk_len, k_scale=None, v_scale=None):
    """Writes new tokens into the cache at slots write_start .. write_start + T - 1.

    key, value (B, Hkv, T, D)  the new tokens, keys NOT rotated (rotated here at j mod L, with
                               j = slot - row_start[b]), in the model dtype
    k_buf, v_buf (B, Hkv, C, D) the cache, model dtype or int8 (then k_scale, v_scale (B, Hkv, C)
                               float32 receive the per-(row, head, token) scales)
    write_start (1,) int32     device position of the first new token
    """
    b, hkv, t, d = key.shape
    int8 = k_buf.dtype == torch.int8
    block_t = _tile_choices("store", key.device, key.dtype)[0]
    ks = k_scale if int8 else k_buf
    vs = v_scale if int8 else k_buf
    _store_kernel[(b, triton.cdiv(hkv * t, block_t))](
        key, value, k_buf, v_buf, ks, vs, cos, sin, row_start, write_start,
        *key.stride(), *value.stride(), *k_buf.stride(), *v_buf.stride(),
        *_scale_strides(k_scale if int8 else None), cos.stride(0),
        hkv, t, d, chunk_len,
        BLOCK_T=block_t, BLOCK_D=_pow2(d), INT8=int8, F64=key.dtype == torch.float64,
    )

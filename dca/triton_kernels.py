"""Triton kernels of Dual Chunk Attention: attention (prefill and split-KV decode), the split merge,
and the cache write, over one batched cache or over packed rows that each have their own cache.

Every kernel computes exactly the DCA of docs/dca.md. A batched cache is laid out as a KV cache
stores it (left padding, one column per position of the batch):

    slot s of row b holds token s - row_start[b] (a pad when that is negative);
    the cache holds slots [0, seq_end); the Tq queries are the last Tq slots.

Packed rows (continuous batching: one sequence holding several requests) have one cache each, in
separate allocations of their own capacity, unpadded: row r's new tokens are the packed columns
q_start[r] .. q_start[r] + q_len[r] - 1, its cache holds past[r] tokens before them. Those kernels
read the rows' caches through a device table of base pointers (`RowCaches`).

Keys are stored already rotated at `j mod L` (spec section 4). The query rotation depends on the
chunks of the query i and the key j (intra `i mod L`, successive `min(L + i mod L, S)`, inter
`min(2L - 1, S)`). For a block of queries, the keys split into three ranges, one per rotation;
each range is one loop with ONE rotated query tile (rotated in registers from the model's cos/sin
table when its loop starts), and only the key blocks that straddle a range boundary (a chunk
boundary, the causal diagonal, the end of the keys) are masked. Keys more than one chunk behind
the block (nearly all of them at long context) are the inter loop: no mask, no per-pair choice.
One online softmax runs across the three loops: no partial outputs, no merge pass.

- Rows of a program: the query heads that share a KV head are folded into one program's rows
  together with a few tokens (heads x tokens <= the tile's rows), so each K/V block is read once
  per KV head (GQA), never copied, and a program's tokens span few positions (short diagonal).
- `prefill`: one program per (row, KV head, head block, token block), heaviest token blocks first,
  the token blocks of one KV head adjacent in the grid (their K/V blocks are shared through L2).
- `decode`: flash-decoding for 1..16 new tokens per row: at most 64 rows per program, the keys
  split over programs (a count from the cache's capacity and the GPU's SM count, never from
  lengths, so a decode step can be captured in a CUDA graph), merged by `_decode_reduce_kernel`.
- `packed_attention`: every packed row of one forward in ONE launch (decode rows and prompt
  blocks mixed); long decode rows are split over programs and the last program of a split group
  merges the group's partial results in the same launch (an atomic counter per group).
- `store` / `packed_store`: rotate new keys at `j mod L`, optionally quantise keys and values to
  int8 (the format and the rounding of dca/kv_quant.py: one float32 scale per (row, head, token),
  exactly rounded division, round half to even), and write them into the cache(s).

int8 caches are dequantised inside the attention kernels: the key scale multiplies the scores
and the value scale the probabilities, so no dequantised copy of the cache is ever made.

Per-row metadata (row starts, lengths, the softmax scale with the attention temperature) is passed
as device tensors: nothing here reads a GPU value back to the host.

Tiles: per architecture (`CUDA_TILES`), chosen from the compile table of dca/compile_check.py
(registers, spills, shared memory for sm_80 and sm_90a). A tile that cannot be used on this GPU
for any reason (shared memory, a ptxas or compiler error, a driver that cannot load the binary) is
skipped for the next entry of its list on first use; when none works the call raises
`KernelUnavailable` with every reason. Registers never fail a launch: ptxas spills instead, which
is what the compile table watches.

With TRITON_INTERPRET=1 set before this module is imported, the kernels run on CPU tensors
through Triton's interpreter (slowly): that is how the CPU test suite checks them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether kernels are compiled or interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Queries per row up to which `attention` uses the split-KV decode path.
DECODE_MAX_QUERIES = 16
# Rows (query heads x tokens) of one decode program at most: more rows cost registers and buy
# nothing at decode, which streams the cache.
DECODE_MAX_ROWS = 64
_INT32_MAX = 2**31 - 1


class KernelUnavailable(RuntimeError):
    """No tile of a kernel could be compiled or loaded on this device; `reasons` says why per tile.

    Raised on the first use of a kernel variant (later calls reuse the tile that worked). The
    caller can fall back to another backend."""

    def __init__(self, kind: str, detail: str, reasons: list[tuple[tuple, str]]):
        self.kind, self.reasons = kind, reasons
        tried = "; ".join(f"tiles {tiles}: {reason}" for tiles, reason in reasons)
        super().__init__(f"DCA Triton {kind} kernel unavailable ({detail}): {tried}")


# Size arguments are not specialised: one binary serves every length, batch and head count
# (Triton would otherwise compile a copy per "divisible by 16" / "equal to 1" pattern).
# Strides read once per program are not specialised either; those of the K/V rows, queries and
# outputs are (a multiple of 16 lets loads and stores use 16-byte vectors).
_SIZES = ["packed", "n_kv_heads", "group", "n_queries", "heads_per_prog", "tokens_per_prog", "n_hblocks",
          "n_tblocks", "chunk_len", "chunk_size", "inter_id"]
_ONCE_STRIDES = ["stride_qb", "stride_kb", "stride_kh", "stride_vb", "stride_vh", "stride_sb", "stride_sh", "stride_ob",
                 "stride_pb", "stride_ph", "stride_pt", "stride_ps", "stride_lb", "stride_lh", "stride_lt", "stride_ls"]


@triton.jit
def _rotated_queries(q_rows, q_mask, offs_d, d_ok, COS, SIN, ids, stride_cos,
                     HALF: tl.constexpr, acc_t: tl.constexpr, dot_t: tl.constexpr):
    """(R, D) queries at q_rows + d, rotated at ids (R,): x * cos[id] + rotate_half(x) * sin[id]."""
    offs_sw = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    sign = tl.where(offs_d < HALF, -1.0, 1.0).to(acc_t)
    q = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0).to(acc_t)
    q_sw = tl.load(q_rows + offs_sw[None, :], mask=q_mask, other=0.0).to(acc_t) * sign[None, :]
    cs = ids[:, None] * stride_cos + offs_d[None, :]
    c = tl.load(COS + cs, mask=d_ok[None, :], other=0.0).to(acc_t)
    s = tl.load(SIN + cs, mask=d_ok[None, :], other=0.0).to(acc_t)
    return (q * c + q_sw * s).to(dot_t)


@triton.jit
def _attend_keys(acc, m_i, l_i, q_rot, k_base, v_base, ks_base, vs_base, stride_kt, stride_vt,
                 offs_d, d_ok, lo, hi, i, ci, row_ok, chunk_len, qk_scale,
                 KIND: tl.constexpr, MASKED: tl.constexpr, INT8: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_N: tl.constexpr, acc_t: tl.constexpr, dot_t: tl.constexpr):
    """Online softmax over keys [lo, hi) seen with one query rotation (KIND 0 intra, 1 successive,
    2 inter).

    MASKED=False: the caller guarantees whole blocks, all of that kind and visible to every row:
    no mask, no bounds. MASKED=True (the few blocks that straddle a chunk boundary, the causal
    diagonal or the end of the keys): keeps the pairs (i, j) with j <= i, j < hi and the chunk
    relation of KIND. Offsets inside a row's cache are int32 (the host checks they fit)."""
    offs_n = tl.arange(0, BLOCK_N)
    # Addresses from j inside the loop: offsets hoisted out of it would stay live in registers
    # (a (D, N) tile of them: 38 spill loads per iteration on sm_90a in the compile table).
    for j0 in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED else None):
        j = j0 + offs_n  # key token index
        if MASKED:
            kv_ok = j < hi
            k = tl.load(k_base + offs_d[:, None] + (j * stride_kt)[None, :], mask=d_ok[:, None] & kv_ok[None, :], other=0)
        else:
            k = tl.load(k_base + offs_d[:, None] + (j * stride_kt)[None, :], mask=d_ok[:, None], other=0)  # (D, N)
        s = tl.dot(q_rot, k.to(dot_t), input_precision=PREC).to(acc_t)  # (R, N)
        if INT8:  # dequantise: the key scale multiplies the scores
            if MASKED:
                s = s * tl.load(ks_base + j, mask=kv_ok, other=0.0).to(acc_t)[None, :]
            else:
                s = s * tl.load(ks_base + j).to(acc_t)[None, :]
        s = s * qk_scale
        if MASKED:
            rel = ci[:, None] - (j // chunk_len)[None, :]
            if KIND == 0:
                kind_ok = rel == 0
            elif KIND == 1:
                kind_ok = rel == 1
            else:
                kind_ok = rel >= 2
            visible = kind_ok & row_ok[:, None] & kv_ok[None, :] & (j[None, :] <= i[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new  # every row sees every key of the block: finite
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if INT8:  # and the value scale the probabilities
            if MASKED:
                p = p * tl.load(vs_base + j, mask=kv_ok, other=0.0).to(acc_t)[None, :]
            else:
                p = p * tl.load(vs_base + j).to(acc_t)[None, :]
        if MASKED:
            v = tl.load(v_base + (j * stride_vt)[:, None] + offs_d[None, :], mask=kv_ok[:, None] & d_ok[None, :], other=0)
        else:
            v = tl.load(v_base + (j * stride_vt)[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0)  # (N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_t), v.to(dot_t), input_precision=PREC).to(acc_t)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, q_rot, k_base, v_base, ks_base, vs_base, stride_kt, stride_vt,
                  offs_d, d_ok, lo, hi, full_hi, i, ci, row_ok, chunk_len, qk_scale,
                  KIND: tl.constexpr, INT8: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                  acc_t: tl.constexpr, dot_t: tl.constexpr):
    """Keys [lo, hi) of one rotation: the whole blocks of [lo, full_hi) (all of that kind, visible
    to every row) unmasked, the rest masked."""
    mid = lo + tl.maximum(tl.minimum(full_hi, hi) - lo, 0) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q_rot, k_base, v_base, ks_base, vs_base, stride_kt, stride_vt,
                                 offs_d, d_ok, lo, mid, i, ci, row_ok, chunk_len, qk_scale,
                                 KIND, False, INT8, PREC, BLOCK_N, acc_t, dot_t)
    acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q_rot, k_base, v_base, ks_base, vs_base, stride_kt, stride_vt,
                                 offs_d, d_ok, mid, hi, i, ci, row_ok, chunk_len, qk_scale,
                                 KIND, True, INT8, PREC, BLOCK_N, acc_t, dot_t)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=_SIZES + _ONCE_STRIDES)
def _attention_kernel(
    Q, K, V, K_SCALE, V_SCALE, O, O_PART, LSE_PART, COS, SIN,
    ROW_START, SEQ_END, SCALE, ROW_META, ROW_PTRS, ITEMS, COUNTERS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_sb, stride_sh,
    stride_ob, stride_oh, stride_ot,
    stride_pb, stride_ph, stride_pt, stride_ps,
    stride_lb, stride_lh, stride_lt, stride_ls,
    stride_cos,
    packed, n_kv_heads, group, n_queries, heads_per_prog, tokens_per_prog, n_hblocks, n_tblocks,
    chunk_len, chunk_size, inter_id,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr, F64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_R rows = heads_per_prog query heads of one KV head x tokens_per_prog
    new tokens of one row, over one split of that row's keys.

    Batched (packed == 0): grid (B * Hkv * n_hblocks * n_tblocks, splits); row b's cache is
    K[b] from slot ROW_START[b]; splits > 1 write partial results (O_PART, LSE_PART: (B, Hq, Tq,
    splits, D) and (B, Hq, Tq, splits)) for `_decode_reduce_kernel`.
    Packed (packed == 1): grid (work items,); ITEMS[w] = (row, kv head, head block, first token,
    split, splits); ROW_META[row] = (q_start, q_len, past); ROW_PTRS[row] = (K, V, K scale,
    V scale base addresses, K, V and scale head strides); a split group's partials go to O_PART
    (W, BLOCK_R, BLOCK_D) and LSE_PART (W, BLOCK_R); its last program merges them into O.
    """
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    dot_t: tl.constexpr = Q.dtype.element_ty
    kv_t: tl.constexpr = K.dtype.element_ty
    pid = tl.program_id(0)
    if packed:
        item = ITEMS + pid * 8
        row = tl.load(item).to(tl.int64)
        hk = tl.load(item + 1)
        hb = tl.load(item + 2)
        t0 = tl.load(item + 3)
        split = tl.load(item + 4)
        n_splits = tl.load(item + 5)
        q_start = tl.load(ROW_META + row * 4)
        n_q = tl.load(ROW_META + row * 4 + 1)
        n_real = tl.load(ROW_META + row * 4 + 2) + n_q
        ptrs = ROW_PTRS + row * 8
        k_base = tl.load(ptrs).to(tl.pointer_type(kv_t)) + hk.to(tl.int64) * tl.load(ptrs + 4)
        v_base = tl.load(ptrs + 1).to(tl.pointer_type(kv_t)) + hk.to(tl.int64) * tl.load(ptrs + 5)
        ks_base = tl.load(ptrs + 2).to(tl.pointer_type(tl.float32)) + hk.to(tl.int64) * tl.load(ptrs + 6)
        vs_base = tl.load(ptrs + 3).to(tl.pointer_type(tl.float32)) + hk.to(tl.int64) * tl.load(ptrs + 6)
        q_base = Q + q_start.to(tl.int64) * stride_qt
        o_base = O + q_start.to(tl.int64) * stride_ot
        qk_scale = tl.load(SCALE + row).to(acc_t) * 1.4426950408889634  # scores in log2 units (exp2)
        b = row * 0  # (one packed sequence)
    else:
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        hb = pid % n_hblocks
        t0 = (n_tblocks - 1 - (pid // n_hblocks) % n_tblocks) * tokens_per_prog  # heaviest first
        rest = pid // (n_hblocks * n_tblocks)
        hk = rest % n_kv_heads
        b = (rest // n_kv_heads).to(tl.int64)
        row_start = tl.load(ROW_START + b)
        n_q = n_queries
        n_real = tl.load(SEQ_END) - row_start
        kv_off = b * stride_kb + hk.to(tl.int64) * stride_kh + row_start.to(tl.int64) * stride_kt
        k_base = K + kv_off
        v_base = V + b * stride_vb + hk.to(tl.int64) * stride_vh + row_start.to(tl.int64) * stride_vt
        s_off = b * stride_sb + hk.to(tl.int64) * stride_sh + row_start.to(tl.int64)
        ks_base = K_SCALE + s_off
        vs_base = V_SCALE + s_off
        q_base = Q + b * stride_qb
        o_base = O + b * stride_ob
        qk_scale = tl.load(SCALE + b).to(acc_t) * 1.4426950408889634

    # Rows: heads_per_prog heads of the group x tokens_per_prog tokens.
    r = tl.arange(0, BLOCK_R)
    hg = hb * heads_per_prog + r // tokens_per_prog  # head within the group
    t = t0 + r % tokens_per_prog  # new-token index
    h = hk * group + hg
    row_slot = (r < heads_per_prog * tokens_per_prog) & (hg < group) & (t < n_q)  # rows with an output
    i = n_real - n_q + t  # token index (< 0: a pad)
    row_ok = row_slot & (i >= 0)
    i_c = tl.maximum(i, 0)
    ci = i_c // chunk_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = q_base + h.to(tl.int64)[:, None] * stride_qh + t.to(tl.int64)[:, None] * stride_qt
    q_mask = row_ok[:, None] & d_ok[None, :]

    # The real tokens of this program's rows, their chunks, and this split's keys.
    i_lo = tl.maximum(n_real - n_q + t0, 0)
    i_hi = tl.minimum(n_real - n_q + t0 + tokens_per_prog - 1, n_real - 1)  # < i_lo: only pads
    ca = i_lo // chunk_len
    cb = tl.maximum(i_hi, 0) // chunk_len
    per_split = (tl.maximum(n_real, 0) + n_splits - 1) // n_splits
    span = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    s_lo = split * span
    s_hi = tl.minimum(s_lo + span, i_hi + 1)
    same_chunk = ca == cb

    m_i = tl.zeros([BLOCK_R], dtype=acc_t) - float("inf")
    l_i = tl.zeros([BLOCK_R], dtype=acc_t)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=acc_t)

    # Inter: keys >= 2 chunks behind a row's query, rotation min(2L - 1, S) for every row. Those
    # before chunk ca - 1 are inter for every row of the program: unmasked.
    lo = s_lo
    hi = tl.minimum(tl.maximum(cb - 1, 0) * chunk_len, s_hi)
    if lo < hi:
        q_rot = _rotated_queries(q_rows, q_mask, offs_d, d_ok, COS, SIN, tl.zeros([BLOCK_R], dtype=tl.int32) + inter_id,
                                 stride_cos, HEAD_DIM // 2, acc_t, dot_t)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q_rot, k_base, v_base, ks_base, vs_base, stride_kt, stride_vt,
                                      offs_d, d_ok, lo, hi, tl.maximum(ca - 1, 0) * chunk_len, i, ci, row_ok,
                                      chunk_len, qk_scale, 2, INT8, PREC, BLOCK_N, acc_t, dot_t)
    # Successive: the chunk before a row's own, rotation min(L + i mod L, S); unmasked when all
    # the rows are in one chunk.
    lo = tl.maximum(tl.maximum(ca - 1, 0) * chunk_len, s_lo)
    hi = tl.minimum(cb * chunk_len, s_hi)
    if lo < hi:
        q_rot = _rotated_queries(q_rows, q_mask, offs_d, d_ok, COS, SIN,
                                 tl.minimum(chunk_len + i_c % chunk_len, chunk_size), stride_cos, HEAD_DIM // 2,
                                 acc_t, dot_t)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q_rot, k_base, v_base, ks_base, vs_base, stride_kt, stride_vt,
                                      offs_d, d_ok, lo, hi, tl.where(same_chunk, hi, lo), i, ci, row_ok,
                                      chunk_len, qk_scale, 1, INT8, PREC, BLOCK_N, acc_t, dot_t)
    # Intra: the row's own chunk up to the query (causal), rotation i mod L; unmasked up to the
    # first row's query when all the rows are in one chunk.
    lo = tl.maximum(ca * chunk_len, s_lo)
    hi = s_hi
    if lo < hi:
        q_rot = _rotated_queries(q_rows, q_mask, offs_d, d_ok, COS, SIN, i_c % chunk_len,
                                 stride_cos, HEAD_DIM // 2, acc_t, dot_t)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q_rot, k_base, v_base, ks_base, vs_base, stride_kt, stride_vt,
                                      offs_d, d_ok, lo, hi, tl.where(same_chunk, i_lo + 1, lo), i, ci, row_ok,
                                      chunk_len, qk_scale, 0, INT8, PREC, BLOCK_N, acc_t, dot_t)

    o_rows = o_base + h.to(tl.int64)[:, None] * stride_oh + t.to(tl.int64)[:, None] * stride_ot + offs_d[None, :]
    o_mask = row_slot[:, None] & d_ok[None, :]
    if n_splits == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_rows, tl.where(row_ok[:, None], out, 0.0).to(O.dtype.element_ty), mask=o_mask)
    else:
        # Partial result of this split: normalised output and log2-sum-exp (-inf when it saw nothing).
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        part = acc / l_safe[:, None]
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
        if packed:
            w_rows = pid.to(tl.int64) * BLOCK_R + r
            tl.store(O_PART + w_rows[:, None] * BLOCK_D + offs_d[None, :], part)
            tl.store(LSE_PART + w_rows, lse)
            first = pid - split  # the group's items are consecutive
            tl.debug_barrier()  # every thread's partial is written before the count is raised
            done = tl.atomic_add(COUNTERS + first, 1, sem="acq_rel", scope="gpu")
            if done == n_splits - 1:  # the last split of the group merges it
                _merge_partials(O_PART, LSE_PART, first, n_splits, o_rows, o_mask, row_ok, offs_d,
                                BLOCK_R, BLOCK_D, acc_t, O.dtype.element_ty)
                tl.atomic_xchg(COUNTERS + first, 0)  # ready for the next layer's launch
        else:
            p_rows = (O_PART + b * stride_pb + h.to(tl.int64)[:, None] * stride_ph + t.to(tl.int64)[:, None] * stride_pt
                      + split * stride_ps + offs_d[None, :])
            tl.store(p_rows, part.to(O_PART.dtype.element_ty), mask=o_mask)
            tl.store(LSE_PART + b * stride_lb + h.to(tl.int64) * stride_lh + t.to(tl.int64) * stride_lt
                     + split * stride_ls, lse.to(LSE_PART.dtype.element_ty), mask=row_slot)


@triton.jit
def _merge_partials(O_PART, LSE_PART, first, n_splits, o_rows, o_mask, row_ok, offs_d,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, acc_t: tl.constexpr, out_t: tl.constexpr):
    """Joins the n_splits partial results of items first.. into one softmax and writes it."""
    r = tl.arange(0, BLOCK_R)
    m = tl.zeros([BLOCK_R], dtype=acc_t) - float("inf")
    total = tl.zeros([BLOCK_R], dtype=acc_t)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=acc_t)
    for s in range(0, n_splits):
        w_rows = (first + s).to(tl.int64) * BLOCK_R + r
        # .cg: read at L2, where the other programs' writes are (L1 is not coherent)
        lse = tl.load(LSE_PART + w_rows, cache_modifier=".cg").to(acc_t)
        part = tl.load(O_PART + w_rows[:, None] * BLOCK_D + offs_d[None, :], cache_modifier=".cg").to(acc_t)
        m_new = tl.maximum(m, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_use)
        w = tl.math.exp2(lse - m_use)  # 0 for splits that saw no key
        total = total * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * part
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(o_rows, tl.where(row_ok[:, None], out, 0.0).to(out_t), mask=o_mask)


@triton.jit(do_not_specialize=["stride_pb", "stride_ph", "stride_pt", "stride_ps", "stride_lb", "stride_lh", "stride_lt",
                               "stride_ls", "stride_ob", "stride_oh", "stride_ot", "n_heads", "n_queries", "n_splits"])
def _decode_reduce_kernel(
    O_PART, LSE_PART, O,
    stride_pb, stride_ph, stride_pt, stride_ps,
    stride_lb, stride_lh, stride_lt, stride_ls,
    stride_ob, stride_oh, stride_ot,
    n_heads, n_queries, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merges the splits of one (row, head, token): grid (B * Hq * Tq,)."""
    pid = tl.program_id(0)
    t = pid % n_queries
    h = (pid // n_queries) % n_heads
    b = (pid // n_queries // n_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    p_base = O_PART + b * stride_pb + h.to(tl.int64) * stride_ph + t.to(tl.int64) * stride_pt
    l_base = LSE_PART + b * stride_lb + h.to(tl.int64) * stride_lh + t.to(tl.int64) * stride_lt
    m = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        s_ok = sp < n_splits
        lse = tl.load(l_base + sp * stride_ls, mask=s_ok, other=float("-inf"))
        part = tl.load(p_base + sp[:, None] * stride_ps + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(lse - m_use)  # 0 for splits that saw no key
        alpha = tl.math.exp2(m - m_use)
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * part, 0)
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(O + b * stride_ob + h.to(tl.int64) * stride_oh + t.to(tl.int64) * stride_ot + offs_d,
             out.to(O.dtype.element_ty), mask=d_ok)


@triton.jit
def _quantise_int8(x, mask):
    """dca/kv_quant.quantize_int8 of rows x (T, D) float32: scale = max|x| / 127 per row, values
    round(x / scale) half to even. Exactly rounded divisions (div_rn; `/` is approximate on GPUs)."""
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.where(mask, tl.abs(x), 0.0), 1), tl.full([1], 127.0, tl.float32)),
                       1.1754943508222875e-38)
    y = tl.math.div_rn(x, scale[:, None])
    # round half to even, as torch.round: adding and removing 1.5 * 2**23 rounds |y| < 2**22 in
    # float32 round-to-nearest-even (floor(y + 0.5) would round 0.49999997 up and ties away).
    r = (y + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8), scale


@triton.jit(do_not_specialize=["stride_nb", "stride_mb", "stride_kb", "stride_vb", "stride_sb", "stride_sh", "packed",
                               "n_kv_heads", "n_new", "chunk_len"])
def _store_kernel(
    K_NEW, V_NEW, K_BUF, V_BUF, K_SCALE, V_SCALE, COS, SIN, ROW_START, WRITE_START, TOKEN_ROW, ROW_META, ROW_PTRS,
    stride_nb, stride_nh, stride_nt,
    stride_mb, stride_mh, stride_mt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_sb, stride_sh,
    stride_cos,
    packed, n_kv_heads, n_new, chunk_len,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr, F64: tl.constexpr,
):
    """Rows are (KV head, new token) pairs. Batched: grid (B, cdiv(Hkv * T, BLOCK_T)), token t of
    row b goes to slot WRITE_START + t. Packed: grid (1, cdiv(Hkv * T, BLOCK_T)) over the packed
    tokens, token t belongs to row TOKEN_ROW[t] and goes to its slot past + t - q_start."""
    acc_t: tl.constexpr = tl.float64 if F64 else tl.float32
    kv_t: tl.constexpr = K_BUF.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    hk = (g // n_new).to(tl.int64)
    t = g % n_new
    t_ok = g < n_kv_heads * n_new
    offs_d = tl.arange(0, BLOCK_D)
    if packed:
        row = tl.load(TOKEN_ROW + t, mask=t_ok, other=-1).to(tl.int64)
        t_ok = t_ok & (row >= 0)  # columns of no row (gaps in the packed sequence) are not written
        row = tl.maximum(row, 0)
        slot = tl.load(ROW_META + row * 4 + 2, mask=t_ok, other=0) + t - tl.load(ROW_META + row * 4, mask=t_ok, other=0)
        key_id = slot % chunk_len
        ptrs = ROW_PTRS + row * 8
        k_dst = (tl.load(ptrs, mask=t_ok, other=0).to(tl.pointer_type(kv_t))
                 + hk * tl.load(ptrs + 4, mask=t_ok, other=0) + slot * HEAD_DIM)
        v_dst = (tl.load(ptrs + 1, mask=t_ok, other=0).to(tl.pointer_type(kv_t))
                 + hk * tl.load(ptrs + 5, mask=t_ok, other=0) + slot * HEAD_DIM)
        s_dst = hk * tl.load(ptrs + 6, mask=t_ok, other=0) + slot
        ks_dst = tl.load(ptrs + 2, mask=t_ok, other=0).to(tl.pointer_type(tl.float32)) + s_dst
        vs_dst = tl.load(ptrs + 3, mask=t_ok, other=0).to(tl.pointer_type(tl.float32)) + s_dst
        t_src = t.to(tl.int64)
    else:
        slot = tl.load(WRITE_START) + t  # cache slot of each new token
        key_id = tl.maximum(slot - tl.load(ROW_START + b), 0) % chunk_len  # j mod L (pads: 0)
        k_dst = K_BUF + b * stride_kb + hk * stride_kh + slot.to(tl.int64) * stride_kt
        v_dst = V_BUF + b * stride_vb + hk * stride_vh + slot.to(tl.int64) * stride_vt
        s_dst = b * stride_sb + hk * stride_sh + slot
        ks_dst = K_SCALE + s_dst
        vs_dst = V_SCALE + s_dst
        t_src = t.to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    d_ok = offs_d < HEAD_DIM
    offs_sw = tl.where(offs_d < half, offs_d + half, offs_d - half)
    sign = tl.where(offs_d < half, -1.0, 1.0).to(acc_t)
    mask = t_ok[:, None] & d_ok[None, :]
    k_rows = K_NEW + b * stride_nb + hk[:, None] * stride_nh + t_src[:, None] * stride_nt
    k = tl.load(k_rows + offs_d[None, :], mask=mask, other=0.0).to(acc_t)
    k_sw = tl.load(k_rows + offs_sw[None, :], mask=mask, other=0.0).to(acc_t) * sign[None, :]
    ids = key_id[:, None] * stride_cos + offs_d[None, :]
    c = tl.load(COS + ids, mask=mask, other=0.0).to(acc_t)
    s = tl.load(SIN + ids, mask=mask, other=0.0).to(acc_t)
    # The rotated key in the model dtype: what the torch path stores.
    k = (k * c + k_sw * s).to(K_NEW.dtype.element_ty)
    v = tl.load(V_NEW + b * stride_mb + hk[:, None] * stride_mh + t_src[:, None] * stride_mt + offs_d[None, :],
                mask=mask, other=0.0)
    if INT8:
        kq, k_scale = _quantise_int8(k.to(tl.float32), mask)
        tl.store(k_dst[:, None] + offs_d[None, :], kq, mask=mask)
        tl.store(ks_dst, k_scale, mask=t_ok)
        vq, v_scale = _quantise_int8(v.to(tl.float32), mask)
        tl.store(v_dst[:, None] + offs_d[None, :], vq, mask=mask)
        tl.store(vs_dst, v_scale, mask=t_ok)
    else:
        tl.store(k_dst[:, None] + offs_d[None, :], k.to(kv_t), mask=mask)
        tl.store(v_dst[:, None] + offs_d[None, :], v.to(kv_t), mask=mask)


# --- tiles ---------------------------------------------------------------------------------------


# The interpreter's cost is per operation and per program, not per element: large tiles and one
# split are cheapest. The kernel tests shrink them (tests/dca/test_triton.py `small_tiles`).
CPU_TILES = dict(prefill=(32, 32, 1, 1), decode=(DECODE_MAX_ROWS, 64, 1, 1), packed=(32, 32, 1, 1), store=64, reduce=16,
                 splits=1)
# Per architecture, each a list tried in order: prefill (rows, BLOCK_N, warps, stages), decode and
# packed rows (most rows, BLOCK_N, warps, stages; programs of 16 rows or fewer run 4 warps), store
# (rows), decode reduce (splits merged per step). Chosen from the compile table
# (benchmarks/results/kernel_compile.json, docs/dca.md): no spill in any key loop on either target,
# at most 64 KB of shared memory (so the sm80 lists also load on 8.6/8.9 GPUs, 99 KB per block),
# never the 4-warp 64-row tiles (40-80 spill loads per iteration at head_dim 128 on both targets),
# nor 128x128 (18-145), nor wide fp32 tiles (fp32 products run on FMA units: 32x32 spills ~150 loads
# per iteration, 32x64 collapses to 32 registers). Each fallback is a binary the list already has
# (the decode tile at 64 rows, the fp32 decode tile at 16 rows), so a fallback costs no extra
# compile. On sm_90a a third stage bought no deeper pipeline (same 64 KB, same code), so the two
# lists are the same today; they are separate so that a GPU's timings can move them apart. NOT yet
# timed on a GPU: benchmarks/gpu_bench.py sweeps the prefill tiles. "sm80": compute capability 8.x,
# "sm90": 9.0+.
CUDA_TILES = {
    "sm80": dict(
        prefill=[(128, 64, 8, 2), (64, 64, 8, 2)],
        prefill_fp32=[(32, 16, 8, 1), (16, 16, 4, 1)],
        decode=[(64, 64, 8, 2)],
        decode_fp32=[(32, 16, 8, 1)],
        store=16,
        reduce=16,
    ),
    "sm90": dict(
        prefill=[(128, 64, 8, 2), (64, 64, 8, 2)],
        prefill_fp32=[(32, 16, 8, 1), (16, 16, 4, 1)],
        decode=[(64, 64, 8, 2)],
        decode_fp32=[(32, 16, 8, 1)],
        store=16,
        reduce=16,
    ),
}


def _overrides():
    """DCA_TRITON_BLOCKS='rows,BN,warps,stages' (prefill) for tuning runs on a GPU."""
    text = os.environ.get("DCA_TRITON_BLOCKS")
    return tuple(int(x) for x in text.split(",")) if text else None


def arch_family(capability: int) -> str:
    """Tile list of a GPU: compute capability (major * 10 + minor) -> "sm80" or "sm90"."""
    return "sm90" if capability >= 90 else "sm80"


def _arch(device: torch.device) -> int | None:
    """Compute capability of a CUDA device (major * 10 + minor), the recorded target's while
    recording, None on CPU (the interpreter)."""
    if _REC.sink is not None:
        return _REC.arch
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        major, minor = torch.cuda.get_device_capability(index)
        _CAPABILITY[index] = major * 10 + minor
    return _CAPABILITY[index]


_CAPABILITY: dict = {}


def _tile_choices(kind: str, device: torch.device, dtype: torch.dtype) -> list:
    arch = _arch(device)
    if arch is None:
        return [CPU_TILES[kind]]  # the interpreter
    tiles = CUDA_TILES[arch_family(arch)]
    wide = dtype in (torch.float32, torch.float64)
    if kind == "prefill":
        override = _overrides()
        if override:
            return [override]
        return tiles["prefill_fp32" if wide else "prefill"]
    if kind in ("decode", "packed"):  # packed rows: decode rows and prompt blocks, decode's tiles
        return tiles["decode_fp32" if wide else "decode"]
    return [tiles[kind]]


# --- launching -------------------------------------------------------------------------------------


@dataclass
class _Recording:
    """dca/compile_check.py: launches are handed to `sink` instead of running."""

    sink: object = None
    arch: int = 0
    sm_count: int = 0
    use: str = ""


_REC = _Recording()
_WORKING: dict = {}


@contextlib.contextmanager
def recording(arch: int, sm_count: int, sink):
    """While active, every kernel launch calls sink(kernel, args, options, use) instead of running,
    every tile of a list is launched (each can run on a GPU where the ones before it fail), and the
    tiles and split counts are those of a GPU of compute capability `arch` with `sm_count` SMs.
    Host functions take `meta` tensors then (shapes and strides, no storage)."""
    saved = (_REC.sink, _REC.arch, _REC.sm_count)
    _REC.sink, _REC.arch, _REC.sm_count = sink, arch, sm_count
    try:
        yield
    finally:
        _REC.sink, _REC.arch, _REC.sm_count = saved


@contextlib.contextmanager
def recording_use(use: str):
    """Labels the launches recorded inside (what launched them)."""
    saved, _REC.use = _REC.use, use
    try:
        yield
    finally:
        _REC.use = saved


def _launch(kernel, grid, args: tuple, options: dict) -> None:
    if _REC.sink is not None:
        _REC.sink(kernel, args, options, _REC.use)
        return
    kernel[grid](*args, **options)


def _with_tiles(kind: str, variant: tuple, device: torch.device, dtype: torch.dtype, launch):
    """launch(tiles) with the first tile of the list that compiles and loads on this device.

    `variant` names what determines the binary besides the tiles; the tile that worked is kept
    for it, and only a first use is guarded (later errors are real errors and propagate)."""
    choices = _tile_choices(kind, device, dtype)
    if _REC.sink is not None:
        result = None
        for tiles in choices:
            result = launch(tiles)
        return result
    key = (kind, device.type, device.index, dtype, variant, tuple(choices))
    if key in _WORKING:
        return launch(choices[_WORKING[key]])
    reasons = []
    for index, tiles in enumerate(choices):
        try:
            result = launch(tiles)
        except Exception as error:  # noqa: BLE001 - any reason a tile cannot run: try the next
            reasons.append((tiles, f"{type(error).__name__}: {str(error).strip()[:500]}"))
            continue
        _WORKING[key] = index
        return result
    raise KernelUnavailable(kind, f"{device}, {dtype}, {variant}", reasons) from None


def _flags(dtype: torch.dtype) -> dict:
    # float32: full-precision products (tl.dot would use TF32 on tensor cores).
    wide = dtype in (torch.float32, torch.float64)
    return dict(F64=dtype == torch.float64, PREC="ieee" if wide else "tf32")


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _warps(block_r: int, warps: int) -> int:
    """Programs of 16 rows or fewer run 4 warps (decode of one token over a group of <= 16 heads)."""
    return min(warps, 4) if block_r <= 16 else warps


def _pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, triton.next_power_of_2(n))


def _fold(group: int, n_queries: int, rows: int, exact_rows: bool) -> tuple[int, int, int, int, int]:
    """Rows of a program: (heads_per_prog, tokens_per_prog, n_hblocks, n_tblocks, BLOCK_R).

    The query heads of a KV head go in one program when they fit; tokens fill the rest. exact_rows:
    BLOCK_R = rows (prefill tiles); else the power of two >= heads x tokens, at most `rows`."""
    heads = min(group, rows)
    tokens = max(1, rows // heads)
    if not exact_rows:
        tokens = min(tokens, n_queries)
    block = rows if exact_rows else min(rows, _pow2(heads * tokens))
    return heads, tokens, triton.cdiv(group, heads), triton.cdiv(n_queries, tokens), block


def _check_offsets(name: str, t: torch.Tensor, token_dim: int = 2) -> None:
    """Offsets inside one (row, head) of a cache are int32 in the kernels' loops."""
    if (t.shape[token_dim] - 1) * abs(t.stride(token_dim)) + t.shape[-1] > _INT32_MAX:
        raise ValueError(f"{name} {tuple(t.shape)} with strides {t.stride()}: offsets inside one row and head "
                         "exceed int32; use smaller cache buffers")


def _check(q, k, v, cos, config_ids, k_scale=None, v_scale=None):
    b, hq, tq, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[3] != d or v.shape[:2] != k.shape[:2] or v.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not form one attention")
    if hq % k.shape[1]:
        raise ValueError(f"{hq} query heads are not a multiple of {k.shape[1]} key/value heads")
    if d % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {d}")
    if k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError(f"the cache must be contiguous along head_dim (strides {k.stride()}, {v.stride()})")
    if cos.stride(-1) != 1:
        raise ValueError("the rope table must be contiguous along head_dim")
    if cos.shape[0] <= max(config_ids):
        raise ValueError(f"the rope table has {cos.shape[0]} rows; DCA uses ids up to {max(config_ids)}")
    if (k.dtype == torch.int8) != (k_scale is not None and v_scale is not None):
        raise ValueError("int8 k/v need k_scale and v_scale (and only int8 ones do)")
    if k_scale is not None and (k_scale.stride(2) != 1 or v_scale.stride(2) != 1
                                or k_scale.stride()[:2] != v_scale.stride()[:2]):
        raise ValueError(f"k_scale/v_scale (B, Hkv, C) must be contiguous along C with equal strides, got "
                         f"{k_scale.stride()}, {v_scale.stride()}")
    _check_offsets("k", k)
    _check_offsets("v", v)


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} contiguous along "
                         f"head_dim, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    return out


def _contiguous_d(q: torch.Tensor) -> torch.Tensor:
    return q if q.stride(-1) == 1 else q.contiguous()


_PLACEHOLDERS = {}


def _dummies(device: torch.device) -> tuple:
    """(int32, int64, float32) placeholders for pointer arguments a launch does not read (the
    packed-only ones in a batched launch, the scales without int8, ...)."""
    if device not in _PLACEHOLDERS:
        _PLACEHOLDERS[device] = tuple(torch.zeros(8, dtype=dt, device=device)
                                      for dt in (torch.int32, torch.int64, torch.float32))
    return _PLACEHOLDERS[device]


def _attention_args(q, k, v, ks, vs, out, part, lse, cos, sin, scale, *, kv_strides, part_strides, fold,
                    n_kv_heads, group, n_queries, config, row_start=None, seq_end=None, meta=None, ptrs=None,
                    items=None, counters=None):
    """The positional arguments of `_attention_kernel` (batched when `ptrs` is None, else packed).

    kv_strides: (b, h, t) strides of K, of V, and (b, h) of the scales; part_strides: (b, h, t,
    split) of the batched partial outputs and of their LSEs."""
    i32, i64, _ = _dummies(q.device)
    heads, tokens, n_hblocks, n_tblocks, _ = fold
    return (
        q, k, v, ks, vs, out, part, lse, cos, sin,
        row_start if row_start is not None else i32, seq_end if seq_end is not None else i32, scale,
        meta if meta is not None else i32, ptrs if ptrs is not None else i64,
        items if items is not None else i32, counters if counters is not None else i32,
        q.stride(0), q.stride(1), q.stride(2),
        *kv_strides,
        out.stride(0), out.stride(1), out.stride(2),
        *part_strides,
        cos.stride(0),
        int(ptrs is not None), n_kv_heads, group, n_queries, heads, tokens, n_hblocks, n_tblocks,
        config.chunk_len, config.chunk_size, config.inter_query_id,
    )


def prefill(q, k, v, row_start, seq_end, scale, cos, sin, config, k_scale=None, v_scale=None, out=None):
    """DCA of the queries against the cache, one pass per block of (query heads x tokens).

    q       (B, Hq, Tq, D)   not rotated, any strides; the last Tq tokens of each row
    k, v    (B, Hkv, C, D)   the cache (C >= seq_end slots), keys rotated at j mod L; model dtype or
                             int8; contiguous along D
    row_start (B,) int32     slot of each row's first real token (device)
    seq_end (1,) int32       slots filled, the queries' own included (device)
    scale   (B,) float       softmax scale times the temperature m^2 of each row (device)
    cos, sin (S+1, D)        the model's rotary table at ids 0..S (dca.attention.RopeTable)
    config  DCAConfig        L, S and the inter id
    k_scale, v_scale (B, Hkv, C) float32 for int8 k, v (contiguous along C)
    out     (B, Hq, Tq, D)   optional, q's dtype, any strides with D contiguous (e.g. a (B, Tq, Hq,
                             D) buffer transposed): written in place and returned
    Returns (B, Hq, Tq, D) in q's dtype; pad query rows are zeros.
    Raises KernelUnavailable when no prefill tile compiles and loads on this device.
    """
    q = _contiguous_d(q)
    b, hq, tq, d = q.shape
    _check(q, k, v, cos, (config.chunk_size, config.inter_query_id), k_scale, v_scale)
    int8 = k.dtype == torch.int8
    out = _output(q, out)
    hkv = k.shape[1]
    group = hq // hkv
    f32 = _dummies(q.device)[2]
    ks, vs = (k_scale, v_scale) if int8 else (f32, f32)
    s_strides = k_scale.stride()[:2] if int8 else (0, 0)

    def launch(tiles):
        rows, bn, warps, stages = tiles
        fold = _fold(group, tq, rows, exact_rows=True)
        no_part = torch.empty(0, device=q.device, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        args = _attention_args(q, k, v, ks, vs, out, no_part, f32, cos, sin, scale,
                               kv_strides=(*k.stride()[:3], *v.stride()[:3], *s_strides), part_strides=(0,) * 8,
                               fold=fold, n_kv_heads=hkv, group=group, n_queries=tq, config=config,
                               row_start=row_start, seq_end=seq_end)
        grid = (b * hkv * fold[2] * fold[3], 1)
        _launch(_attention_kernel, grid, args,
                dict(HEAD_DIM=d, BLOCK_D=_block_d(d), INT8=int8, **_flags(q.dtype), BLOCK_R=fold[4], BLOCK_N=bn,
                     num_warps=warps, num_stages=stages))
        return out

    return _with_tiles("prefill", (k.dtype, d), q.device, q.dtype, launch)


def _num_splits(device: torch.device, programs: int, capacity: int, block_n: int) -> int:
    """Key splits per program: enough programs to fill the GPU, from shapes only."""
    blocks = max(1, triton.cdiv(capacity, block_n))
    if _arch(device) is None:
        return min(CPU_TILES["splits"], blocks)  # the interpreter: a few, so the merge is exercised
    sms = _REC.sm_count if _REC.sink is not None else _sm_count(device)
    return max(1, min(blocks, triton.cdiv(2 * sms, programs), 256))


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def decode(q, k, v, row_start, seq_end, scale, cos, sin, config, k_scale=None, v_scale=None, num_splits=None,
           out=None):
    """Split-KV DCA for a few new tokens per row; same arguments and result as `prefill`.

    The query heads sharing a KV head and the new tokens are folded into the rows of a program (at
    most DECODE_MAX_ROWS = 64; more are spread over programs); the keys of each row are split over
    `num_splits` programs (default: from the cache capacity and the GPU's SM count, so the grid is
    the same at every step) and merged by `_decode_reduce_kernel`.
    """
    q = _contiguous_d(q)
    b, hq, tq, d = q.shape
    _check(q, k, v, cos, (config.chunk_size, config.inter_query_id), k_scale, v_scale)
    hkv = k.shape[1]
    group = hq // hkv
    int8 = k.dtype == torch.int8
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    f32 = _dummies(q.device)[2]
    ks, vs = (k_scale, v_scale) if int8 else (f32, f32)
    s_strides = k_scale.stride()[:2] if int8 else (0, 0)
    out = _output(q, out)

    def launch(tiles):
        max_rows, bn, warps, stages = tiles
        fold = _fold(group, tq, min(max_rows, DECODE_MAX_ROWS), exact_rows=False)
        programs = b * hkv * fold[2] * fold[3]
        splits = num_splits or _num_splits(q.device, programs, k.shape[2], bn)
        if splits == 1:
            part, lse, part_strides = torch.empty(0, device=q.device, dtype=acc), f32, (0,) * 8
        else:
            part = torch.empty(b, hq, tq, splits, d, device=q.device, dtype=acc)
            lse = torch.empty(b, hq, tq, splits, device=q.device, dtype=acc)
            part_strides = (*part.stride()[:4], *lse.stride())
        args = _attention_args(q, k, v, ks, vs, out, part, lse, cos, sin, scale,
                               kv_strides=(*k.stride()[:3], *v.stride()[:3], *s_strides), part_strides=part_strides,
                               fold=fold, n_kv_heads=hkv, group=group, n_queries=tq, config=config,
                               row_start=row_start, seq_end=seq_end)
        _launch(_attention_kernel, (programs, splits), args,
                dict(HEAD_DIM=d, BLOCK_D=_block_d(d), INT8=int8, **_flags(q.dtype), BLOCK_R=fold[4], BLOCK_N=bn,
                     num_warps=_warps(fold[4], warps), num_stages=stages))
        return splits, part, lse

    splits, part, lse = _with_tiles("decode", (k.dtype, d, min(_pow2(group * tq), DECODE_MAX_ROWS)), q.device, q.dtype,
                                    launch)
    if splits > 1:
        _with_tiles("reduce", (q.dtype, d), q.device, q.dtype, lambda block_s: _launch(
            _decode_reduce_kernel, (b * hq * tq,),
            (part, lse, out, *part.stride()[:4], *lse.stride(), *out.stride()[:3], hq, tq, splits),
            dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_S=block_s)))
    return out


def attention(q, k, v, row_start, seq_end, scale, cos, sin, config, k_scale=None, v_scale=None, out=None):
    """`decode` for up to DECODE_MAX_QUERIES new tokens per row, `prefill` otherwise (same
    arguments and result)."""
    if q.shape[2] <= DECODE_MAX_QUERIES:
        return decode(q, k, v, row_start, seq_end, scale, cos, sin, config, k_scale, v_scale, out=out)
    return prefill(q, k, v, row_start, seq_end, scale, cos, sin, config, k_scale, v_scale, out=out)


def store(key, value, k_buf, v_buf, cos, sin, row_start, write_start, chunk_len, k_scale=None, v_scale=None):
    """Writes new tokens into the cache at slots write_start .. write_start + T - 1.

    key, value (B, Hkv, T, D)  the new tokens, keys NOT rotated (rotated here at j mod L, with
                               j = slot - row_start[b]), in the model dtype, D contiguous
    k_buf, v_buf (B, Hkv, C, D) the cache, model dtype or int8 (then k_scale, v_scale (B, Hkv, C)
                               float32 receive the per-(row, head, token) scales); D contiguous
    write_start (1,) int32     device position of the first new token
    int8: dca/kv_quant.quantize_int8's values exactly (exact division, round half to even).
    """
    key, value = _contiguous_d(key), _contiguous_d(value)
    b, hkv, t, d = key.shape
    int8 = k_buf.dtype == torch.int8
    if k_buf.stride(3) != 1 or v_buf.stride(3) != 1:
        raise ValueError("the cache must be contiguous along head_dim")
    if int8 and (k_scale is None or v_scale is None or k_scale.stride(2) != 1 or k_scale.stride()[:2] != v_scale.stride()[:2]):
        raise ValueError("an int8 cache needs k_scale and v_scale (B, Hkv, C), contiguous along C, with equal strides")
    i32, i64, f32 = _dummies(key.device)
    ks, vs = (k_scale, v_scale) if int8 else (f32, f32)
    s_strides = k_scale.stride()[:2] if int8 else (0, 0)

    def launch(block_t):
        _launch(_store_kernel, (b, triton.cdiv(hkv * t, block_t)),
                (key, value, k_buf, v_buf, ks, vs, cos, sin, row_start, write_start, i32, i32, i64,
                 *key.stride()[:3], *value.stride()[:3], *k_buf.stride()[:3], *v_buf.stride()[:3], *s_strides,
                 cos.stride(0), 0, hkv, t, chunk_len),
                dict(HEAD_DIM=d, BLOCK_T=block_t, BLOCK_D=_block_d(d), INT8=int8, F64=key.dtype == torch.float64))

    _with_tiles("store", (k_buf.dtype, d), key.device, key.dtype, launch)


# --- packed rows -----------------------------------------------------------------------------------


@dataclass
class PackedRows:
    """The rows of one packed forward (continuous batching), built once on the host and shared by
    every layer: where each row's new tokens are in the packed sequence and how long its cache is.

    q_start, q_len, past: host ints per row (row r's new tokens are packed columns q_start[r] ..
    q_start[r] + q_len[r] - 1 and follow the past[r] tokens its cache already holds).
    scale: per row, the softmax scale times the temperature m^2.
    Device tables are made on first use and kept: the work list depends on the tile (rows per
    program), so one is built per tile that runs.
    """

    q_start: list
    q_len: list
    past: list
    scale: list
    device: torch.device
    meta: torch.Tensor = None  # (R, 4) int32: q_start, q_len, past, 0
    scales: torch.Tensor = None  # (R,) float32 (float64 for a float64 model)
    token_row: torch.Tensor = None  # (T,) int32: packed column -> row (-1: none)
    _work: dict = field(default_factory=dict)

    @classmethod
    def build(cls, q_start, q_len, past, scale, device, scale_dtype=torch.float32) -> "PackedRows":
        """Host lists (or tuples) of ints per row, scale floats per row; device: where the model runs;
        scale_dtype: float32, or float64 for a float64 model (the kernels accumulate in float64 then).

        Rows may have q_len 0 (nothing to compute); their columns must not overlap."""
        q_start, q_len, past, scale = (list(map(int, q_start)), list(map(int, q_len)), list(map(int, past)),
                                       list(map(float, scale)))
        if not (len(q_start) == len(q_len) == len(past) == len(scale)) or not q_start:
            raise ValueError("q_start, q_len, past and scale need one entry per row (at least one row)")
        if min(q_len) < 0 or min(past) < 0 or min(q_start) < 0:
            raise ValueError(f"negative q_start/q_len/past: {q_start}, {q_len}, {past}")
        spans = sorted((s, s + n) for s, n in zip(q_start, q_len) if n)
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise ValueError(f"rows' columns overlap: {spans}")
        device = torch.device(device)
        width = max((s + n for s, n in zip(q_start, q_len)), default=0)
        token_row = [-1] * width  # -1: a column of no row
        for r, (s, n) in enumerate(zip(q_start, q_len)):
            token_row[s : s + n] = [r] * n
        rows = cls(q_start, q_len, past, scale, device)
        rows.meta = _to_device(torch.tensor([[s, n, p, 0] for s, n, p in zip(q_start, q_len, past)], dtype=torch.int32),
                               device)
        rows.scales = _to_device(torch.tensor(scale, dtype=scale_dtype), device)
        rows.token_row = _to_device(torch.tensor(token_row or [-1], dtype=torch.int32), device)
        return rows

    def work(self, group: int, n_kv_heads: int, rows: int, block_n: int) -> tuple:
        """(items (W, 8) int32 device table, W, counters (W,) int32 zeros) of one launch with `rows`
        rows and `block_n` keys per program, made once per tile and kept for every layer."""
        key = (group, n_kv_heads, rows, block_n)
        if key not in self._work:
            self._work[key] = _packed_work(self, group, n_kv_heads, rows, block_n)
        return self._work[key]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table on the device without a host sync."""
    if device.type == "cuda":  # pinned: the copy does not wait for the queue
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _packed_work(rows: PackedRows, group: int, hkv: int, block_rows: int, block_n: int):
    """Work items of one launch: (row, kv head, head block, first token, split, splits, 0, 0),
    longest first; a decode row's keys are split so the launch fills the GPU."""
    heads, tokens, n_hblocks, _, _ = _fold(group, 1, block_rows, exact_rows=True)
    decode = {r for r, n in enumerate(rows.q_len) if 0 < n <= tokens}  # one token block: split its keys
    if rows.device.type == "cuda" or _REC.sink is not None:
        sms = _REC.sm_count if _REC.sink is not None else _sm_count(rows.device)
    else:
        sms = 0
    decode_programs = max(1, len(decode) * hkv * n_hblocks)
    items = []
    for r, (n, past) in enumerate(zip(rows.q_len, rows.past)):
        if n == 0:
            continue
        keys = past + n
        if r in decode and sms:
            splits = max(1, min(triton.cdiv(keys, 4 * block_n), triton.cdiv(2 * sms, decode_programs), 64))
        else:
            splits = CPU_TILES["splits"] if not sms and r in decode else 1
            splits = max(1, min(splits, triton.cdiv(keys, block_n)))
        for t0 in range(0, n, tokens):
            cost = keys * min(tokens, n - t0)
            for hk in range(hkv):
                for hb in range(n_hblocks):
                    items.append((cost, [[r, hk, hb, t0, s, splits, 0, 0] for s in range(splits)]))
    items.sort(key=lambda x: -x[0])
    flat = [it for _, group_items in items for it in group_items] or [[0, 0, 0, 0, 0, 1, 0, 0]]
    table = _to_device(torch.tensor(flat, dtype=torch.int32), rows.device)
    counters = torch.zeros(len(flat), dtype=torch.int32, device=rows.device)
    return table, len(flat) if items else 0, counters


@dataclass
class RowCaches:
    """One layer's caches of the packed rows: a device table of their base addresses.

    keys[r], values[r]: (1, Hkv, capacity_r, D) tensors (model dtype or int8), contiguous along
    (capacity, D); k_scales[r], v_scales[r]: (1, Hkv, capacity_r[, 1]) float32 for int8, contiguous
    along capacity. Capacities may differ per row. The object keeps references to the tensors; it
    is valid while they are the rows' storage (build it again when a row's storage changes).
    """

    table: torch.Tensor  # (R, 8) int64: K, V, K scale, V scale addresses; K, V, scale head strides; 0
    key_dtype: torch.dtype
    kv_heads: int
    head_dim: int
    tensors: tuple = ()

    @classmethod
    def from_tensors(cls, keys, values, k_scales=None, v_scales=None) -> "RowCaches":
        return cls.for_layers([(keys, values, k_scales, v_scales)])[0]

    @classmethod
    def for_layers(cls, layers) -> list["RowCaches"]:
        """[(keys, values, k_scales, v_scales) per layer] -> one RowCaches per layer, with one host to
        device copy for all of them."""
        rows_of_layers, infos = [], []
        for keys, values, k_scales, v_scales in layers:
            if not keys or len(keys) != len(values):
                raise ValueError("one key and one value tensor per row are needed")
            first = keys[0]
            int8 = first.dtype == torch.int8
            if int8 and (k_scales is None or v_scales is None):
                raise ValueError("int8 row caches need k_scales and v_scales")
            hkv, d = first.shape[1], first.shape[3]
            table = []
            for r, (k, v) in enumerate(zip(keys, values)):
                for name, t in (("keys", k), ("values", v)):
                    if (t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != hkv or t.shape[3] != d or t.dtype != first.dtype
                            or t.device != first.device or t.stride(3) != 1 or t.stride(2) != d):
                        raise ValueError(f"row {r} {name} {tuple(t.shape)} {t.dtype} strides {t.stride()}: every row "
                                         f"needs a (1, {hkv}, capacity, {d}) {first.dtype} tensor on {first.device}, "
                                         "contiguous along (capacity, head_dim)")
                    _check_offsets(f"row {r} {name}", t)
                ks = vs = None
                if int8:
                    ks, vs = k_scales[r], v_scales[r]
                    if ks.shape[:3] != k.shape[:3] or ks.stride(2) != 1 or vs.stride(2) != 1 or ks.stride(1) != vs.stride(1):
                        raise ValueError(f"row {r} scales {tuple(ks.shape)} strides {ks.stride()}: need (1, {hkv}, "
                                         "capacity[, 1]) float32, contiguous along capacity, K and V alike")
                table.append([k.data_ptr(), v.data_ptr(), ks.data_ptr() if int8 else 0, vs.data_ptr() if int8 else 0,
                              k.stride(1), v.stride(1), ks.stride(1) if int8 else 0, 0])
            rows_of_layers.append(table)
            infos.append((first.dtype, hkv, d, tuple(keys) + tuple(values) + tuple(k_scales or ()) + tuple(v_scales or ()),
                          first.device))
        width = len(rows_of_layers[0])
        if any(len(t) != width for t in rows_of_layers):
            raise ValueError("every layer needs the same rows")
        stacked = _to_device(torch.tensor(rows_of_layers, dtype=torch.int64), infos[0][4])  # (layers, R, 8)
        return [cls(stacked[i], dtype, hkv, d, tensors) for i, (dtype, hkv, d, tensors, _) in enumerate(infos)]


def packed_attention(q, rows: PackedRows, caches: RowCaches, cos, sin, config, out=None):
    """DCA of every packed row of one forward in ONE launch, each row against its own cache.

    q      (1, Hq, T, D)  not rotated, D contiguous; row r's queries are columns q_start .. +q_len
    rows   PackedRows     per-forward row layout (shared by the layers)
    caches RowCaches      this layer's row caches, the new tokens already written (`packed_store`)
    cos, sin (S+1, D), config: as `prefill`
    out    (1, Hq, T, D)  optional, written in place (any strides, D contiguous)
    Returns out; columns that belong to no row are left as they were (zeros for a new tensor).
    Decode rows (q_len <= 64 // query heads per KV head) are split over programs when the GPU
    would otherwise idle; the last program of a row's split group merges it in the same launch.
    Raises KernelUnavailable when no tile compiles and loads on this device.
    """
    q = _contiguous_d(q)
    _, hq, t, d = q.shape
    if q.shape[0] != 1 or d != caches.head_dim or hq % caches.kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not match row caches of {caches.kv_heads} KV heads, head_dim "
                         f"{caches.head_dim} (packed queries are (1, Hq, T, D))")
    if cos.stride(-1) != 1 or cos.shape[0] <= max(config.chunk_size, config.inter_query_id):
        raise ValueError("the rope table must be contiguous along head_dim and hold ids 0..S")
    hkv = caches.kv_heads
    group = hq // hkv
    int8 = caches.key_dtype == torch.int8
    out = torch.zeros_like(q) if out is None else _output(q, out)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv_like = torch.empty(0, device=q.device, dtype=caches.key_dtype)
    f32 = _dummies(q.device)[2]

    def launch(tiles):
        rows_per_prog, bn, warps, stages = tiles
        items, n_items, counters = rows.work(group, hkv, rows_per_prog, bn)
        if not n_items:
            return out
        part = torch.empty(n_items, rows_per_prog, _block_d(d), device=q.device, dtype=acc)
        lse = torch.empty(n_items, rows_per_prog, device=q.device, dtype=acc)
        fold = _fold(group, 1, rows_per_prog, exact_rows=True)
        args = _attention_args(q, kv_like, kv_like, f32, f32, out, part, lse, cos, sin, rows.scales,
                               kv_strides=(0, 0, d, 0, 0, d, 0, 0), part_strides=(0,) * 8, fold=fold, n_kv_heads=hkv,
                               group=group, n_queries=0, config=config, meta=rows.meta, ptrs=caches.table,
                               items=items, counters=counters)
        _launch(_attention_kernel, (n_items, 1), args,
                dict(HEAD_DIM=d, BLOCK_D=_block_d(d), INT8=int8, **_flags(q.dtype), BLOCK_R=rows_per_prog,
                     BLOCK_N=bn, num_warps=_warps(rows_per_prog, warps), num_stages=stages))
        return out

    return _with_tiles("packed", (caches.key_dtype, d), q.device, q.dtype, launch)


def packed_store(key, value, rows: PackedRows, caches: RowCaches, cos, sin, chunk_len):
    """Writes every packed row's new tokens into its own cache in ONE launch.

    key, value (1, Hkv, T, D)  the packed new tokens, keys NOT rotated, model dtype, D contiguous;
                               column c belongs to row token_row[c], token past + c - q_start of it
                               (rotated at that index mod L), written to that slot of its cache
    int8 caches: dca/kv_quant.quantize_int8's values and scales exactly.
    """
    key, value = _contiguous_d(key), _contiguous_d(value)
    _, hkv, t, d = key.shape
    if key.shape[0] != 1 or hkv != caches.kv_heads or d != caches.head_dim:
        raise ValueError(f"key {tuple(key.shape)} does not match row caches of {caches.kv_heads} KV heads, "
                         f"head_dim {caches.head_dim}")
    if t > rows.token_row.shape[0] and any(rows.q_len):
        raise ValueError(f"{t} packed columns, the rows cover {rows.token_row.shape[0]}")
    int8 = caches.key_dtype == torch.int8
    kv_like = torch.empty(0, device=key.device, dtype=caches.key_dtype)
    i32, _, f32 = _dummies(key.device)
    n_new = min(t, rows.token_row.shape[0])

    def launch(block_t):
        _launch(_store_kernel, (1, triton.cdiv(hkv * n_new, block_t)),
                (key, value, kv_like, kv_like, f32, f32, cos, sin, i32, i32, rows.token_row, rows.meta, caches.table,
                 *key.stride()[:3], *value.stride()[:3], 0, 0, 0, 0, 0, 0, 0, 0,
                 cos.stride(0), 1, hkv, n_new, chunk_len),
                dict(HEAD_DIM=d, BLOCK_T=block_t, BLOCK_D=_block_d(d), INT8=int8, F64=key.dtype == torch.float64))

    _with_tiles("store", (caches.key_dtype, d, "packed"), key.device, key.dtype, launch)

"""Partial attention kernels that also return the log-sum-exp, the LSE merge, and backend names.

The torch and flash backends (dca/backends.py) compute DCA as up to three of these calls per
chunk; the "triton" backend does not use them (dca/triton_kernels.py computes DCA in one pass).
`resolve_backend` turns a configured name into the name that can run here; dca/backends.py
builds the backend object from it, once per device, dtype and KV dtype.

DCA splits every query row's keys into up to three groups, each seen with a different query
rotation, and joins them with ONE softmax. Each group is an ordinary attention call that returns
its output and log-sum-exp; `merge` combines them exactly (spec section 3).

Contract of every kernel (the flash-attn convention):

    torch_attend(q, k, v, scale, causal) -> (out, lse)      (flash_attend: the same contract)
    q:   (B, Hq, Tq, D)    k, v: (B, Hkv, Tk, D), Hq a multiple of Hkv (head h uses kv head h // (Hq/Hkv))
    out: (B, Hq, Tq, D) float32 (float64 for float64 inputs)
    lse: (B, Hq, Tq)    same dtype, natural log of sum_j exp(scale * q.k_j)
    causal: bottom-right aligned, query t sees keys j <= Tk - Tq + t (needs Tq <= Tk).

Why hand-written: torch's public scaled_dot_product_attention does not return the LSE. The torch
backend therefore calls the aten kernels behind it that do (flash on CPU, memory-efficient on
CUDA), with a blocked pure-math fallback for any other device; none builds a Tq x Tk buffer
larger than a bounded block.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import torch

# Elements of one score block in the math fallback (64 MiB of float32).
_MATH_BLOCK_ELEMENTS = 1 << 24


def flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether dca.triton_kernels runs (or will run, once imported) in Triton's CPU interpreter."""
    module = sys.modules.get("dca.triton_kernels")
    if module is not None:
        return module.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' | 'torch' | 'flash' | 'triton' -> the backend to run on this device and dtype; raises
    RuntimeError if 'flash' or 'triton', asked for by name, cannot. On CUDA the start-up
    self-check may still replace it (dca.selfcheck.select)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "triton":
        missing = []
        if not triton_available():
            missing.append("the triton package is not installed (it ships with CUDA builds of torch)")
        elif device.type == "cpu" and not triton_interpreted():
            missing.append("the model is on CPU: Triton runs there only in its interpreter (set "
                           "TRITON_INTERPRET=1 before dca is imported; slow, meant for tests)")
        elif device.type not in ("cpu", "cuda"):
            missing.append(f"the model is on {device.type}; Triton needs CUDA")
        elif device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16, torch.float32):
            missing.append(f"the model dtype is {dtype}; the compiled kernels take float16, bfloat16 or float32")
        if missing:
            raise RuntimeError("DCA backend 'triton' cannot run: " + "; ".join(missing) + ". Use backend='torch' or 'auto'.")
        return "triton"
    if requested == "flash":
        missing = []
        if importlib.util.find_spec("flash_attn") is None:
            missing.append("the flash-attn package is not installed (pip install 'dca-pipeline[flash]')")
        if device.type != "cuda":
            missing.append(f"the model is on {device.type}, flash-attn needs CUDA")
        if not half:
            missing.append(f"the model dtype is {dtype}, flash-attn needs float16 or bfloat16")
        if missing:
            raise RuntimeError("DCA backend 'flash' cannot run: " + "; ".join(missing) + ". Use backend='torch' or 'auto'.")
        return "flash"
    if requested == "auto":
        if device.type == "cuda" and (half or dtype == torch.float32) and triton_available() and not triton_interpreted():
            return "triton"
        return "flash" if (device.type == "cuda" and half and flash_available()) else "torch"
    if requested == "torch":
        return "torch"
    raise ValueError(f"unknown DCA backend {requested!r}")


def check_installed(requested: str) -> None:
    """Raises `resolve_backend`'s error when a backend asked for by name cannot run on this
    machine whatever the device (its package is missing): apply_dca calls it, before the model
    moves to its device and dtype."""
    if requested == "flash" and not flash_available():
        resolve_backend("flash", torch.device("cpu"), torch.float32)
    if requested == "triton" and not triton_available():
        resolve_backend("triton", torch.device("cuda"), torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial outputs and their merge run in float32 at least (never in bf16/fp16)."""
    return torch.promote_types(dtype, torch.float32)


def torch_attend(q, k, v, scale: float, causal: bool):
    """The contract above on the aten kernels (any device): the torch backend's partial attention."""
    return _torch(q, k, v, scale, causal)


def flash_attend(q, k, v, scale: float, causal: bool):
    """The contract above on flash-attn (CUDA, fp16/bf16): the flash backend's partial attention."""
    return _flash(q, k, v, scale, causal)


def merge(parts):
    """Joins partial attentions over disjoint key sets into one softmax, in float32.

    parts: list of (out (B, H, T, D), lse (B, H, T)) in the accumulation dtype. Returns (out, lse).
    """
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([p[1] for p in parts])  # (P, B, H, T)
    top = lse.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lse - top)  # (P, B, H, T)
    total = weights.sum(dim=0)
    out = sum(w[..., None] * p[0] for w, p in zip(weights, parts))
    return out / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None], top + torch.log(total)


# --- torch backend -----------------------------------------------------------------------------


def _torch(q, k, v, scale, causal):
    tq, tk = q.shape[2], k.shape[2]
    if causal and tq == 1:
        causal = False  # the last query sees every key
    if causal and tq != tk:
        # The aten kernels align a causal mask top-left; bottom-right = a full part over the
        # keys every query sees, plus a square causal part.
        head = _torch_square(q, k[:, :, : tk - tq], v[:, :, : tk - tq], scale, causal=False)
        tail = _torch_square(q, k[:, :, tk - tq :], v[:, :, tk - tq :], scale, causal=True)
        return merge([head, tail])
    return _torch_square(q, k, v, scale, causal)


# torch >= 2.5's CPU flash kernel broadcasts KV heads and reads strided inputs: key slices of the
# cache go in without a copy. Older builds raise, and we fall back to copies once and for all.
_cpu_direct = True


def _torch_square(q, k, v, scale, causal):
    global _cpu_direct
    acc = accumulation_dtype(q.dtype)
    if q.device.type == "cpu" and _cpu_direct:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
            return out.to(acc), lse.to(acc)
        except RuntimeError:
            _cpu_direct = False
    group = q.shape[1] // k.shape[1]
    if group > 1 and not causal:
        # Fold the query heads of a group into rows: no copy of the (long) keys.
        b, hq, t, d = q.shape
        out, lse = _torch_kernel(q.reshape(b, k.shape[1], group * t, d), k, v, scale, False)
        return out.reshape(b, hq, t, d), lse.reshape(b, hq, t)
    if group > 1:
        # Causal parts are at most one chunk long, so expanding their keys stays small.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return _torch_kernel(q, k, v, scale, causal)


def _torch_kernel(q, k, v, scale, causal):
    acc = accumulation_dtype(q.dtype)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, scale=scale
        )
        return out.to(acc), lse.to(acc)
    if q.device.type == "cuda" and q.shape[-1] <= 256:
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), None, True, 0.0, causal, scale=scale
        )
        # The kernel pads the LSE's query dim to a multiple of its block size.
        return out.to(acc), lse[..., : q.shape[2]].to(acc)
    return _math(q, k, v, scale, causal)


def _math(q, k, v, scale, causal):
    """Blocked exact attention for devices without an LSE-returning kernel."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    rows = max(1, _MATH_BLOCK_ELEMENTS // max(1, b * h * tk))
    outs, lses = [], []
    acc = accumulation_dtype(q.dtype)
    kf, vf = k.to(acc), v.to(acc)
    for start in range(0, tq, rows):
        qb = q[:, :, start : start + rows].to(acc)
        s = torch.matmul(qb, kf.transpose(-1, -2)) * scale  # (B, H, rows, Tk)
        if causal:
            qpos = torch.arange(start, start + qb.shape[2], device=q.device)[:, None] + (tk - tq)
            s = s.masked_fill(torch.arange(tk, device=q.device)[None, :] > qpos, -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), vf))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


# --- flash-attn backend ------------------------------------------------------------------------


def _flash(q, k, v, scale, causal):
    from flash_attn import flash_attn_func

    # flash-attn wants (B, T, H, D); its causal mask is bottom-right aligned and it handles GQA.
    out, lse, _ = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        softmax_scale=scale, causal=causal, return_attn_probs=True,
    )
    return out.transpose(1, 2).float(), lse.float()

"""The start-up self-check: a backend's kernels on a small DCA problem, against the torch backend.

Why: the Triton kernels are compiled on the machine that runs them (a compile error, a ptxas
error, a driver that cannot load the cubin, a miscompiled tile or a NaN would otherwise turn
every document of a job into an error). The first time a model runs DCA with a backend other
than torch on a device, dtype, KV dtype and head layout, `select` (below) runs this check
once per process; a failure makes "auto" fall back (dca/backends.py) and an explicit backend raise.

The problem (`CHECK_CONFIG`, `STEPS`): the model's own head layout (query heads, KV heads,
head_dim) and rotary table, two rows, the second left-padded by `PADS` slots, chunk length
L = 37 (chunk boundaries at 37, 74, 111, 148: off every tile grid), through the backend's own
contract (`begin_forward`, `write`, `attend`) on a StaticKVCache in the KV dtype in use:

    a 100-token prefill (three chunks), a 47-token block with the cache (across 111),
    two one-token decode steps (the second across 148), and a 3-token step

with the attention temperature on (alpha = 0.1, a different n per row); then the same rows as
a packed forward of continuous batching (`begin_packed`, `attend_packed`: on Triton one store and
one attention launch for all rows), each row its own StaticKVCache of batch one, unpadded
(`PACKED_STEPS`: a 100-token prefill beside a 47-token one, then a decode step beside 3 tokens).
At each step:

1. every output is finite;
2. the cache write: keys and values as stored (dequantised) against the torch rotation of the
   same inputs, within `write_tolerance` (int8: one quantisation step more);
3. the attention: against `dca.attention.chunked_dca` on the torch kernels, in float32 (float64
   for float64 models), reading the keys and values the backend stored (so a cache-write
   difference is not counted twice), within `ATTENTION_TOLERANCE`.

Errors are relative to the largest reference value. The tolerances are about 8 unit roundoffs
u of the model dtype for half types (the query rotation, the probabilities and the output are
each rounded once in that dtype; scores of this unit-variance problem stay within about +-4),
and 1e-4 / 1e-9 for float32 / float64 (the kernel tests hold 1e-5 / 1e-12). The failures the
check is for (a lost head, a wrong rotation, a chunk off by one, garbage from a bad tile) give
errors of order 1.

Cost: 6-10 s in Triton's interpreter (the packed steps add about 2 s) on one CPU core (shared,
loaded machine) for tiny test models (4-8 query heads, 2 KV heads, head_dim 16-32). On a GPU
(estimated, not yet timed): a few milliseconds of kernels and of the float32 torch reference,
after compiling the kernel variants, most of which the model launches anyway (the 3-token decode
and the reduce over this cache's splits may be extra; the packed variants run only where the
engine batches continuously): seconds the first time on a machine, well under one with Triton's
cache warm.

Where it runs (`required`): on CUDA devices; on CPU only when forced (`FORCE_ON_CPU`, or
DCA_SELFCHECK=always in the environment), which is how the CPU tests drive it through Triton's
interpreter.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from dca import kernels
from dca.attention import RopeTable, chunked_dca, rotate_keys
from dca.backends import (
    FALLBACKS, BackendKey, BackendReport, BackendUnavailable, DCABackend, ForwardInputs, LayerKV, TorchBackend, create,
    dtype_name,
)
from dca.config import DCAConfig

logger = logging.getLogger("dca")

# Run the check on CPU devices too (tests; Triton's interpreter). On CUDA it always runs.
FORCE_ON_CPU = os.environ.get("DCA_SELFCHECK", "") == "always"

# P = 64, S = 45, W = 8: L = 37. alpha > 0 so that per-row softmax scales are exercised.
CHECK_CONFIG = DCAConfig(pretraining_length=64, chunk_size=45, local_window=8, temperature_alpha=0.1)
STEPS = (100, 47, 1, 1, 3)  # tokens per forward: prefill, a block with the cache, decode steps
PADS = 9  # left padding of the second row
# Packed forwards (tokens per row): a prefill beside a block, then a decode step beside 3 tokens.
PACKED_STEPS = ((100, 47), (1, 3))
CAPACITY = 160  # cache slots (152 used)

_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
ATTENTION_TOLERANCE = {torch.bfloat16: 8 * 2.0**-8, torch.float16: 8 * 2.0**-11, torch.float32: 1e-4,
                       torch.float64: 1e-9}


def write_tolerance(dtype: torch.dtype, kv_dtype: str) -> float:
    """Stored keys: one rounding of the rotated key to the model dtype (the rotation itself runs
    in float32 in the kernel and in the reference): 4u. int8 adds half a quantisation step
    (max|x| / 254 per row and head), plus one step where the division rounds the other way."""
    tolerance = 4 * _UNIT_ROUNDOFF[dtype] + 1e-6
    return tolerance + 1.5 / 127 if kv_dtype == "int8" else tolerance


def required(device: torch.device) -> bool:
    """Whether a backend other than torch must pass the check before it runs on `device`."""
    return device.type == "cuda" or FORCE_ON_CPU


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    reason: str | None  # one line: what failed, where, by how much
    seconds: float


_RESULTS: dict = {}
_LOCK = threading.Lock()


def check(backend, geometry: tuple[int, int, int], rope_build) -> tuple[CheckResult, bool]:
    """(result, fresh): the check of `backend` for its key and this head layout, run once per
    process (fresh: it ran in this call)."""
    key = backend.key
    memo = (backend.name, key.device, key.dtype, key.kv_dtype, tuple(geometry))
    with _LOCK:
        if memo in _RESULTS:
            return _RESULTS[memo], False
        result = run(backend, geometry, rope_build)
        _RESULTS[memo] = result
        return result, True


def clear() -> None:
    """Forgets every result (tests)."""
    with _LOCK:
        _RESULTS.clear()


def run(backend, geometry: tuple[int, int, int], rope_build) -> CheckResult:
    """Runs the check (no memo). Errors of the backend under test are caught and reported;
    errors of the reference (the torch backend) propagate: nothing could replace it."""
    from dca.cache import StaticKVCache
    from dca.positions import token_indices_from_mask
    from dca.state import cache_state

    start = time.perf_counter()
    key = backend.key
    device, dtype = key.device, key.dtype
    hq, hkv, head_dim = geometry
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    total = sum(STEPS)
    g = torch.Generator().manual_seed(0)

    def inputs(heads):  # unit-variance values, rounded to the model dtype once
        return torch.randn(2, heads, total, head_dim, generator=g).to(dtype).to(device)

    q, k, v = inputs(hq), inputs(hkv), inputs(hkv)
    mask = torch.ones(2, total, dtype=torch.long)
    mask[1, :PADS] = 0
    mask = mask.to(device)
    prompt = torch.tensor([total, total - PADS])
    rope = RopeTable(CHECK_CONFIG, rope_build)
    # The reference rotates with the same (model-dtype) table, in its own precision.
    ref_rope = RopeTable(CHECK_CONFIG, lambda ids, dt: tuple(t.to(dt) for t in rope_build(ids, dtype)))
    cache = StaticKVCache(max_tokens=CAPACITY, kv_dtype=key.kv_dtype)
    cache_state(cache).prompt_length = prompt
    scaling = head_dim**-0.5
    write_tol = write_tolerance(dtype, key.kv_dtype)
    attn_tol = ATTENTION_TOLERANCE[dtype]

    def fail(reason: str) -> CheckResult:
        return CheckResult(False, reason, time.perf_counter() - start)

    past = 0
    for step, n in enumerate(STEPS):
        where = f"step {step + 1} ({n} new token{'s' if n > 1 else ''} after {past})"
        step_mask = mask[:, : past + n]
        try:
            forward = backend.begin_forward(ForwardInputs(
                cache=cache, padding_mask=step_mask, position_ids=None, bsz=2, q_len=n, past=past, device=device,
                scaling=scaling, rope=rope))
            kv = backend.write(forward, 0, k[:, :, past : past + n], v[:, :, past : past + n])
            # The layer's output layout: (B, T, Hq, D) written through a (B, Hq, T, D) view.
            out = torch.empty(2, n, hq, head_dim, dtype=dtype, device=device).transpose(1, 2)
            got = backend.attend(forward, q[:, :, past : past + n], kv, out)
            stored_k, stored_v = kv.dense(ref_dtype)
            finite = bool(torch.isfinite(got).all()) and bool(torch.isfinite(stored_k).all())
        except Exception as error:  # noqa: BLE001 -- any failure of the backend is a finding
            return fail(f"{where}: {type(error).__name__}: {_one_line(error)}")
        if not finite:
            return fail(f"{where}: non-finite values in the output or the cache")
        if stored_k.shape[2] != past + n:
            return fail(f"{where}: the cache holds {stored_k.shape[2]} tokens, expected {past + n}")

        index = token_indices_from_mask(step_mask)  # (2, past + n)
        want_k = rotate_keys(k[:, :, : past + n].to(ref_dtype), index, ref_rope)
        error = max(_relative_error(stored_k, want_k), _relative_error(stored_v, v[:, :, : past + n]))
        if not error <= write_tol:
            return fail(f"{where}: cache write off by {error:.2e} (relative; tolerance {write_tol:.1e})")
        want = chunked_dca(q[:, :, past : past + n].to(ref_dtype), stored_k, stored_v, index[:, -n:], index, ref_rope,
                           scaling, kernels.torch_attend, prompt.to(device))
        error = _relative_error(got, want)
        if not error <= attn_tol:
            return fail(f"{where}: attention off by {error:.2e} (relative to the torch backend; "
                        f"tolerance {attn_tol:.1e} in {str(dtype).removeprefix('torch.')})")
        past += n

    # The packed forward of continuous batching (`begin_packed` / `attend_packed`; on Triton its
    # own kernels, one store and one attention launch for all rows): each row its own cache of
    # batch one, unpadded, the same inputs as row 0 and row 1 above.
    row_caches = [StaticKVCache(max_tokens=CAPACITY, kv_dtype=key.kv_dtype) for _ in range(2)]
    for r, row_cache in enumerate(row_caches):
        cache_state(row_cache).prompt_length = prompt[r : r + 1]
    pasts = [0, 0]
    for step, lengths in enumerate(PACKED_STEPS):
        news, olds = " and ".join(map(str, lengths)), " and ".join(map(str, pasts))
        where = f"packed step {step + 1} ({news} new tokens after {olds})"
        spans = [(r, pasts[r], pasts[r] + n) for r, n in enumerate(lengths)]
        packed_q, packed_k, packed_v = (torch.cat([t[r : r + 1, :, a:b] for r, a, b in spans], dim=2)
                                        for t in (q, k, v))  # (1, H, T, D) each
        starts = [sum(lengths[:r]) for r in range(len(lengths))]
        segments = [(row_caches[r], at, at + n) for r, (at, n) in enumerate(zip(starts, lengths))]
        t = sum(lengths)
        try:
            packed = backend.begin_packed(ForwardInputs(
                cache=None, padding_mask=None, position_ids=None, bsz=1, q_len=t, past=0, device=device,
                scaling=scaling, rope=rope), segments)
            out = torch.empty(1, t, hq, head_dim, dtype=dtype, device=device).transpose(1, 2)
            got = backend.attend_packed(packed, 0, packed_q, packed_k, packed_v, out)
            finite = bool(torch.isfinite(got).all())
        except Exception as error:  # noqa: BLE001 -- any failure of the backend is a finding
            return fail(f"{where}: {type(error).__name__}: {_one_line(error)}")
        if not finite:
            return fail(f"{where}: non-finite values in the output")
        for (r, a, b), at in zip(spans, starts):
            layer = row_caches[r].layers[0]
            if layer.length != b:
                return fail(f"{where}: row {r}'s cache holds {layer.length} tokens, expected {b}")
            stored_k, stored_v = LayerKV(keys=layer.k, values=layer.v, length=b, key_scale=layer.k_scale,
                                         value_scale=layer.v_scale).dense(ref_dtype)
            if not bool(torch.isfinite(stored_k).all()):
                return fail(f"{where}: non-finite values in row {r}'s cache")
            index = torch.arange(b, device=device)[None]  # (1, b): unpadded
            want_k = rotate_keys(k[r : r + 1, :, :b].to(ref_dtype), index, ref_rope)
            error = max(_relative_error(stored_k, want_k), _relative_error(stored_v, v[r : r + 1, :, :b]))
            if not error <= write_tol:
                return fail(f"{where}: row {r}'s cache write off by {error:.2e} (relative; tolerance {write_tol:.1e})")
            want = chunked_dca(q[r : r + 1, :, a:b].to(ref_dtype), stored_k, stored_v, index[:, a:], index, ref_rope,
                               scaling, kernels.torch_attend, prompt[r : r + 1].to(device))
            error = _relative_error(got[:, :, at : at + b - a], want)
            if not error <= attn_tol:
                return fail(f"{where}: row {r}'s attention off by {error:.2e} (relative to the torch backend; "
                            f"tolerance {attn_tol:.1e} in {str(dtype).removeprefix('torch.')})")
        pasts = [b for _, _, b in spans]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return CheckResult(True, None, time.perf_counter() - start)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.to(torch.float64), want.to(torch.float64)
    scale = float(want.abs().max())
    return float((got - want).abs().max()) / max(scale, 1e-30)


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split()) or repr(error)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plain_rope(head_dim: int, base: float = 10000.0):
    """A RopeTable builder of the standard rotary embedding (rotate-half layout), for checks run
    without a model (`run_for`)."""

    def build(ids: torch.Tensor, dtype: torch.dtype):
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64, device=ids.device) / head_dim)
        angles = ids.to(torch.float64)[:, None] * inv_freq[None, :]  # (ids, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (ids, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    return build


def run_for(name: str, device: torch.device | str, dtype: torch.dtype, kv_dtype: str = "auto",
            geometry: tuple[int, int, int] = (32, 4, 128), rope_build=None) -> CheckResult:
    """The check of backend `name` ("triton", "flash") for one device, dtype, KV dtype and head
    layout (default: a Llama-2-70B rank at tp 2), with `plain_rope` unless a model's builder is
    given; no memo, nothing chosen. For scripts that check a machine (a GPU check)."""

    backend = create(name, BackendKey(torch.device(device), dtype, kv_dtype))
    return run(backend, geometry, rope_build or plain_rope(geometry[2]))


def select(requested: str, key: BackendKey, geometry: tuple[int, int, int], rope_build) -> tuple[DCABackend, BackendReport]:
    """The backend that runs for `key`, and its report.

    requested   DCAConfig.backend
    geometry    (query heads, KV heads, head_dim) of this process's layers (the kernel variants)
    rope_build  the model's rotary table builder (dca.attention.RopeTable.build)

    `kernels.resolve_backend` picks a name (raising if one asked for cannot run); a backend other
    than torch then runs the self-check where it is required (CUDA; `required`).
    If it fails, a backend asked for by name raises BackendUnavailable with the reason; "auto"
    falls back to the next backend that can run, logs one line, and the report says why.
    """
    try:
        chosen = kernels.resolve_backend(requested, key.device, key.dtype)
    except RuntimeError as error:
        raise BackendUnavailable(str(error)) from error
    backend = create(chosen, key)
    reasons, checked, seconds, fresh_failure = [], False, None, False
    while not isinstance(backend, TorchBackend) and required(key.device):
        result, fresh = check(backend, geometry, rope_build)
        checked = True
        if fresh:
            seconds = (seconds or 0.0) + result.seconds
        if result.passed:
            break
        if requested != "auto":
            raise BackendUnavailable(
                f"DCA backend {backend.name!r} failed its start-up self-check on {key.device} "
                f"({dtype_name(key.dtype)}, KV {key.kv_dtype}): {result.reason}. "
                "Use backend='auto' to fall back, or 'torch'."
            )
        reasons.append(f"{backend.name}: {result.reason}")
        fresh_failure = fresh_failure or fresh
        backend = next(cls(key) for cls in FALLBACKS[type(backend)] if cls.available(key))
    fallback_reason = "; ".join(reasons) or None
    if fresh_failure:  # once per process and key: later models reuse the check's result
        logger.warning("DCA backend %r failed its start-up self-check on %s (%s, KV %s), running %r instead: %s",
                       chosen, key.device, dtype_name(key.dtype), key.kv_dtype, backend.name, fallback_reason)
    report = BackendReport(requested=requested, chosen=chosen, ran=backend.name, fallback_reason=fallback_reason,
                           checked=checked, device=str(key.device), dtype=dtype_name(key.dtype),
                           kv_dtype=key.kv_dtype, check_seconds=seconds)
    return backend, report

"""Rank test hooks (pipeline.engine.worker.RANK_TEST_HOOK_ENV): make a CPU rank choose DCA's
backend as a GPU rank does, and inject a failure into the Triton kernels it then self-checks.

Each function runs in a rank worker process at the start of `RankWorker.setup`, before the model
is loaded. It sets the process up as dca's own tests do (tests/dca/test_backends.py, the
`gpu_like` fixture): Triton's interpreter on (before dca.triton_kernels is imported), the
start-up self-check forced on CPU (dca.selfcheck.FORCE_ON_CPU), and "auto" resolving to Triton,
as it does on CUDA. The failures are injected at dca.triton_kernels' public functions only (what
the Triton backend calls), so they hold whatever the kernels' internals become. Everything after
that is the production path: dca.prepare_backend -> dca.selfcheck.select -> dca.selfcheck.check ->
the backend's contract -> the kernels; the fallback; the record.

    DCA_PIPELINE_RANK_TEST_HOOK=tests.pipeline.backend_faults:nan
"""

from __future__ import annotations

import dataclasses
import os


def _gpu_like():
    """The CPU chooses as a GPU does; returns dca.triton_kernels (interpreted)."""
    os.environ["TRITON_INTERPRET"] = "1"  # read when dca.triton_kernels is imported: before it
    import tests.dca.conftest  # noqa: F401 -- its interpreter shortcuts (speed only, not results)
    from dca import kernels, selfcheck

    selfcheck.FORCE_ON_CPU = True
    resolve = kernels.resolve_backend

    def as_on_cuda(requested, device, dtype):
        return resolve("triton" if requested == "auto" else requested, device, dtype)

    kernels.resolve_backend = as_on_cuda
    from dca import triton_kernels

    return triton_kernels


def healthy() -> None:
    """No failure: the self-check passes and the Triton kernels run every request."""
    _gpu_like()


def compile_error() -> None:
    """The first launch fails as a compile (ptxas, cubin load) error does: Triton compiles there."""
    triton_kernels = _gpu_like()
    from triton.compiler.errors import CompilationError

    def attention(*args, **kwargs):
        raise CompilationError(None, None, "ptxas fatal : Unsupported .version 9.0; current version is '8.7'")

    triton_kernels.attention = attention


def wrong_result() -> None:
    """Decode launches (a few queries per row) with a chunk off by one: compiles, runs, is wrong."""
    triton_kernels = _gpu_like()
    attention = triton_kernels.attention

    def wrong(q, k, v, row_start, seq_end, scale, cos, sin, config, *rest, **kwargs):
        if q.shape[2] <= triton_kernels.DECODE_MAX_QUERIES:
            config = dataclasses.replace(config, local_window=config.local_window + 1)
        return attention(q, k, v, row_start, seq_end, scale, cos, sin, config, *rest, **kwargs)

    triton_kernels.attention = wrong


def nan() -> None:
    """Every attention launch leaves a NaN in its output."""
    triton_kernels = _gpu_like()
    attention = triton_kernels.attention

    def with_nan(*args, **kwargs):
        out = attention(*args, **kwargs)
        out = kwargs.get("out", out)
        out[0, 0, -1, 0] = float("nan")
        return out

    triton_kernels.attention = with_nan

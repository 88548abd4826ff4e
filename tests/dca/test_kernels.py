"""Every LSE kernel against naive attention, and the exact LSE merge."""

import pytest
import torch
from torch.testing import assert_close

from dca import kernels


def naive(q, k, v, scale, causal):
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1).double()
    v = v.repeat_interleave(group, 1).double()
    s = q.double() @ k.transpose(-1, -2) * scale
    tq, tk = q.shape[2], k.shape[2]
    if causal:  # bottom-right aligned
        allowed = torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq)
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


CASES = [(6, 2, 7, 7, True), (6, 2, 5, 13, True), (4, 4, 9, 30, False), (3, 1, 1, 17, True), (3, 1, 1, 17, False)]


@pytest.mark.parametrize("hq, hkv, tq, tk, causal", CASES)
@pytest.mark.parametrize("impl", ["torch", "torch-copies", "math"])
def test_kernel_matches_naive(hq, hkv, tq, tk, causal, impl, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, tq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, tk, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, hkv, tk, 16, generator=g, dtype=torch.float64)
    if impl == "math":
        group = hq // hkv
        out, lse = kernels._math(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), 0.25, causal)
    else:
        if impl == "torch-copies":  # the path for torch builds whose CPU kernel needs equal heads
            monkeypatch.setattr(kernels, "_cpu_direct", False)
        out, lse = kernels.torch_attend(q, k, v, 0.25, causal)
    ref_out, ref_lse = naive(q, k, v, 0.25, causal)
    assert out.dtype == torch.float64
    assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_merge_of_disjoint_key_sets_is_one_softmax():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 4, 8, generator=g)
    k = torch.randn(1, 2, 20, 8, generator=g)
    v = torch.randn(1, 2, 20, 8, generator=g)
    parts = [kernels.torch_attend(q, k[:, :, a:b], v[:, :, a:b], 0.3, False) for a, b in [(0, 3), (3, 11), (11, 20)]]
    out, lse = kernels.merge(parts)
    ref_out, ref_lse = naive(q, k, v, 0.3, False)
    assert out.dtype == torch.float32
    assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_merge_in_float32():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 4, 8, generator=g).bfloat16()
    k = torch.randn(1, 2, 20, 8, generator=g).bfloat16()
    v = torch.randn(1, 2, 20, 8, generator=g).bfloat16()
    out, lse = kernels.merge([kernels.torch_attend(q, k[:, :, :9], v[:, :, :9], 0.3, False),
                              kernels.torch_attend(q, k[:, :, 9:], v[:, :, 9:], 0.3, False)])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    ref_out, _ = naive(q, k, v, 0.3, False)
    assert_close(out.double(), ref_out, rtol=2e-2, atol=2e-2)


def test_rope_rotate_range_equals_gathered_ids():
    from dca import DCAConfig
    from dca.attention import RopeTable

    config = DCAConfig(32, chunk_size=24, local_window=4)
    angles = torch.arange(25, dtype=torch.float64)[:, None] * torch.linspace(0.1, 1.0, 8, dtype=torch.float64)
    rope = RopeTable(config, lambda ids, dtype: (angles[ids].cos().to(dtype), angles[ids].sin().to(dtype)))
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    for start in (0, 5, 13, 20, 30):
        ids = torch.arange(start, start + 12).clamp(max=24).expand(2, -1)
        assert_close(rope.rotate_range(x, start, start + 12), rope.rotate(x, ids), rtol=0, atol=0)

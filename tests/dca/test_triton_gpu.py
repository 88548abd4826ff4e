"""The compiled Triton kernels on CUDA (skipped without a GPU, and when the interpreter is on).

Accuracy rules: float32 within 1e-5 (relative to the largest output) of the float64 reference;
bf16 within twice the error of the torch backend in bf16 (flash-attention's test rule), both
against a float32 run.
"""

import copy
import importlib.util

import pytest
import torch
from torch.testing import assert_close

from dca import DCAConfig, apply_dca, kernels
from dca.cache import StaticKVCache
from dca.prefill import chunked_prefill
from tests.dca.conftest import left_pad, tiny_model
from tests.dca.reference import reference_cache_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(kernels.triton_interpreted(), reason="TRITON_INTERPRET=1: kernels are not compiled"),
]

TRITON = DCAConfig(32, chunk_size=24, local_window=4, backend="triton")
TORCH = DCAConfig(32, chunk_size=24, local_window=4, backend="torch")


def rope_table(config, dim):
    angles = torch.arange(config.chunk_size + 1, dtype=torch.float64)[:, None] * torch.linspace(0.01, 1.0, dim // 2,
                                                                                               dtype=torch.float64).repeat(2)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("tq", [1, 4, 16, 300, 2048])
@pytest.mark.parametrize("int8", [False, True])
def test_float32_kernels_match_the_float64_reference(tq, int8):
    from dca import triton_kernels

    config = DCAConfig(1024)  # L = 640: 2048 tokens span 4 chunks
    g = torch.Generator().manual_seed(tq)
    b, hq, hkv, d, slots, seq_end = 2, 8, 2, 128, 2100, 2048
    row_start = torch.tensor([0, 700], dtype=torch.int32)
    q = torch.randn(b, hq, tq, d, generator=g)
    if int8:
        k = torch.randint(-127, 128, (b, hkv, slots, d), generator=g, dtype=torch.int8)
        v = torch.randint(-127, 128, (b, hkv, slots, d), generator=g, dtype=torch.int8)
        ks, vs = torch.rand(b, hkv, slots, generator=g) / 100, torch.rand(b, hkv, slots, generator=g) / 100
    else:
        k, v = torch.randn(b, hkv, slots, d, generator=g), torch.randn(b, hkv, slots, d, generator=g)
        ks = vs = None
    scale = torch.tensor([d**-0.5, 1.2 * d**-0.5])
    cos, sin = rope_table(config, d)
    ref = reference_cache_attention(q, k, v, row_start, seq_end, scale, cos, sin, config, ks, vs)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    out = triton_kernels.attention(
        q.cuda(), k.cuda(), v.cuda(), row_start.cuda(), torch.tensor([seq_end], dtype=torch.int32, device="cuda"),
        scale.cuda(), cos.float().cuda(), sin.float().cuda(), config, cuda(ks), cuda(vs),
    ).cpu().double()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_the_torch_backend_error(dtype):
    x = torch.randint(1, 101, (1, 90), device="cuda")
    ref = apply_dca(tiny_model(dtype=torch.float32).cuda(), TORCH)(x).logits
    torch_lp = apply_dca(tiny_model(dtype=dtype).cuda(), TORCH)(x).logits.float()
    triton_lp = apply_dca(tiny_model(dtype=dtype).cuda(), TRITON)(x).logits.float()
    assert (triton_lp - ref).abs().max() <= 2 * (torch_lp - ref).abs().max() + 1e-3


def test_bf16_attention_at_llama70b_rank_geometry_within_twice_the_torch_backend_error():
    """32 query heads over 4 KV heads, head_dim 128, 8k tokens in 4 chunks (P = 4096)."""
    from dca.attention import RopeTable, dca_attention, rotate_keys

    config = DCAConfig(4096)
    n = 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, n, 128, device="cuda", generator=g)
    k = torch.randn(1, 4, n, 128, device="cuda", generator=g)
    v = torch.randn(1, 4, n, 128, device="cuda", generator=g)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))

    def build(ids, dtype):
        f = ids.float()[:, None] * inv
        e = torch.cat([f, f], -1)
        return e.cos().to(dtype), e.sin().to(dtype)

    rope = RopeTable(config, build)
    idx = torch.arange(n, device="cuda")[None]

    def run(dtype, backend):
        kr = rotate_keys(k.to(dtype), idx, rope)
        return dca_attention(q.to(dtype), kr, v.to(dtype), idx, idx, rope, 128**-0.5, backend=backend).float()

    def run_triton(dtype):
        from dca import triton_kernels

        kr = rotate_keys(k.to(dtype), idx, rope)
        cos, sin = rope.tables(q.device, dtype)
        one = torch.zeros(1, dtype=torch.int32, device="cuda")
        return triton_kernels.attention(q.to(dtype), kr, v.to(dtype), one, one + n,
                                        torch.full((1,), 128**-0.5, device="cuda"), cos, sin, config).float()

    ref = run(torch.float32, "torch")
    assert (run_triton(torch.float32) - ref).abs().max() <= 1e-5 * ref.abs().max()
    err_torch = (run(torch.bfloat16, "torch") - ref).abs().max()
    err_triton = (run_triton(torch.bfloat16) - ref).abs().max()
    assert err_triton <= 2 * err_torch


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_left_padded_generate_on_a_static_cache_matches_the_torch_backend(kv_dtype):
    rows = [torch.randint(1, 101, (1, n)) for n in (70, 33)]
    batch, mask = left_pad(rows)
    batch, mask = batch.cuda(), mask.cuda()
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    model = tiny_model(dtype=torch.float32).cuda()
    if kv_dtype == "int8":
        from dca.kv_quant import Int8KVCache

        ref_cache, cache = Int8KVCache(), StaticKVCache(max_tokens=90, kv_dtype="int8")
    else:
        from transformers import DynamicCache

        ref_cache, cache = DynamicCache(), StaticKVCache(max_tokens=90)
    expected = apply_dca(copy.deepcopy(model), TORCH).generate(batch, attention_mask=mask, cache=ref_cache, **kw)
    got = apply_dca(copy.deepcopy(model), TRITON).generate(batch, attention_mask=mask, cache=cache, **kw)
    assert torch.equal(got, expected)


def test_decode_step_has_no_host_sync_and_replays_from_a_cuda_graph():
    from dca.graphs import CapturedDecodeStep

    model = apply_dca(tiny_model(dtype=torch.bfloat16).cuda(), TRITON)
    rows = [torch.randint(1, 101, (1, n)) for n in (70, 33)]
    batch, mask = left_pad(rows)
    batch, mask = batch.cuda(), mask.cuda()
    eager_cache, cache = StaticKVCache(max_tokens=100), StaticKVCache(max_tokens=100)
    for c in (eager_cache, cache):
        chunked_prefill(model, batch, c, block_size=20, attention_mask=mask)
    nxt = torch.randint(1, 101, (2, 8), device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any GPU->host sync in a decode step raises
    try:
        eager = [model(nxt[:, t : t + 1], cache=eager_cache, use_cache=True).logits[:, -1].clone() for t in range(8)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    step = CapturedDecodeStep(model, cache)
    for t in range(8):
        assert_close(step(nxt[:, t : t + 1]).float(), eager[t].float(), rtol=0, atol=0)
    assert cache.get_seq_length() == 78


def test_chunked_prefill_at_64k_stays_linear_in_memory():
    model = apply_dca(tiny_model(dtype=torch.bfloat16, heads=8, kv_heads=2, head_dim=64).cuda(), DCAConfig(4096))
    ids = torch.randint(1, 101, (1, 65536), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cache = StaticKVCache(max_tokens=65536)
    chunked_prefill(model, ids, cache)
    kv = cache.nbytes()
    extra = torch.cuda.max_memory_allocated() - base - kv
    assert extra < 256 * 2**20, extra  # activations of one block, not of 64k tokens


def test_packed_rows_in_one_launch_match_the_float64_reference_on_the_gpu():
    """Decode rows split over many programs and merged by the last one (an atomic counter per
    split group: only a GPU runs programs concurrently), prompt blocks, an empty row, int8."""
    from dca import triton_kernels

    config = DCAConfig(64, chunk_size=48, local_window=8)  # L = 40
    g = torch.Generator().manual_seed(0)
    hq, hkv, d = 8, 1, 128
    q_len, past = [1, 1, 0, 300, 3, 16], [5000, 333, 12, 45, 90, 700]
    q_start = [sum(q_len[:r]) for r in range(len(q_len))]
    cos, sin = rope_table(config, d)
    for int8 in (False, True):
        caps = [p + n + 5 for p, n in zip(past, q_len)]
        if int8:
            keys = [torch.randint(-127, 128, (1, hkv, c, d), generator=g, dtype=torch.int8) for c in caps]
            values = [torch.randint(-127, 128, (1, hkv, c, d), generator=g, dtype=torch.int8) for c in caps]
            ks = [torch.rand(1, hkv, c, 1, generator=g) / 50 for c in caps]
            vs = [torch.rand(1, hkv, c, 1, generator=g) / 50 for c in caps]
        else:
            keys = [torch.randn(1, hkv, c, d, generator=g) for c in caps]
            values = [torch.randn(1, hkv, c, d, generator=g) for c in caps]
            ks = vs = None
        q = torch.randn(1, hq, sum(q_len), d, generator=g)
        scale = [d**-0.5 * (1 + 0.1 * r) for r in range(len(q_len))]
        rows = triton_kernels.PackedRows.build(q_start, q_len, past, scale, "cuda")
        caches = triton_kernels.RowCaches.from_tensors([t.cuda() for t in keys], [t.cuda() for t in values],
                                                       [t.cuda() for t in ks] if int8 else None,
                                                       [t.cuda() for t in vs] if int8 else None)
        for _ in range(2):  # the counters reset themselves: a second launch (the next layer) is right too
            out = triton_kernels.packed_attention(q.cuda(), rows, caches, cos.float().cuda(), sin.float().cuda(), config)
            out = out.cpu().double()
            for r, (s0, n, p) in enumerate(zip(q_start, q_len, past)):
                if n:
                    ref = reference_cache_attention(q[:, :, s0 : s0 + n], keys[r], values[r],
                                                    torch.zeros(1, dtype=torch.int32), p + n, torch.tensor([scale[r]]),
                                                    cos, sin, config, ks[r][..., 0] if int8 else None,
                                                    vs[r][..., 0] if int8 else None)
                    assert (out[:, :, s0 : s0 + n] - ref).abs().max() <= 1e-5 * ref.abs().max()
        tiles = triton_kernels._tile_choices("packed", torch.device("cuda"), torch.float32)[0]
        items = rows.work(hq // hkv, hkv, tiles[0], tiles[1])[0]
        assert int(items[:, 5].max()) > 1  # decode rows were split


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_store_equals_kv_quant_bit_for_bit_on_the_gpu(dtype):
    """Exactly rounded division in the compiled store (the approximate `/` is off by an ulp,
    which moves values at rounding ties by one int8 step)."""
    from dca import triton_kernels
    from dca.kv_quant import quantize_int8

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 300, 128, generator=g) * 3
    x[:, :, :20, 0] = 127.0  # scale exactly 1: the next columns are ties and near-ties
    x[:, :, :20, 1:9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 126.5, -3.5])
    x = x.to(dtype)
    cos = torch.ones(25, 128, dtype=dtype, device="cuda")
    sin = torch.zeros(25, 128, dtype=dtype, device="cuda")
    kq = torch.zeros(2, 4, 320, 128, dtype=torch.int8, device="cuda")
    vq, ks, vs = torch.zeros_like(kq), torch.zeros(2, 4, 320, device="cuda"), torch.zeros(2, 4, 320, device="cuda")
    zero = torch.zeros(1, dtype=torch.int32, device="cuda")
    triton_kernels.store(x.cuda(), x.cuda(), kq, vq, cos, sin, torch.zeros(2, dtype=torch.int32, device="cuda"), zero,
                         20, ks, vs)
    ref, ref_scale = quantize_int8(x)
    assert torch.equal(vq[:, :, :300].cpu(), ref) and torch.equal(kq[:, :, :300].cpu(), ref)
    assert torch.equal(vs[:, :, :300].cpu(), ref_scale[..., 0])


def test_output_in_place_and_every_tile_loads():
    """out= a token-major buffer; and every tile of this GPU's lists compiles and loads (the
    compile table says they do for sm_80 and sm_90a; this GPU's driver has the last word)."""
    from dca import triton_kernels

    config = DCAConfig(1024)
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 2, 700, 128, generator=g).cuda().to(torch.bfloat16)
    args = (torch.tensor([0, 30], dtype=torch.int32, device="cuda"), torch.tensor([700], dtype=torch.int32, device="cuda"),
            torch.full((2,), 128**-0.5, device="cuda"), *(t.to(torch.bfloat16).cuda() for t in rope_table(config, 128)),
            config)
    major, minor = torch.cuda.get_device_capability()
    lists = triton_kernels.CUDA_TILES[triton_kernels.arch_family(major * 10 + minor)]
    for tq in (3, 200):
        q = torch.randn(2, tq, 8, 128, generator=g).cuda().to(torch.bfloat16).transpose(1, 2)
        want = triton_kernels.attention(q, k, k, *args)
        buffer = torch.empty(2, tq, 8, 128, dtype=torch.bfloat16, device="cuda")
        triton_kernels.attention(q, k, k, *args, out=buffer.transpose(1, 2))
        assert torch.equal(buffer.transpose(1, 2), want)
        kind = "decode" if tq <= triton_kernels.DECODE_MAX_QUERIES else "prefill"
        saved = list(lists[kind])
        try:
            for tiles in saved:
                lists[kind] = [tiles]
                got = triton_kernels.attention(q, k, k, *args)  # raises KernelUnavailable if it cannot load
                assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
        finally:
            lists[kind] = saved

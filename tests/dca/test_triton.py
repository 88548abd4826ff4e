"""The Triton kernels (dca/triton_kernels.py) and the static KV cache (dca/cache.py) on CPU.

Without CUDA the kernels run in Triton's interpreter (tests/dca/conftest.py sets
TRITON_INTERPRET=1): slow, so sizes are small. The semantics suites (test_semantics,
test_chunked_prefill, test_tensor_parallel, and the generate / int8 tests of test_apply and
test_kv_quant) also run on these kernels through the `dca_backend` fixture.
"""

import copy

import pytest
import torch
from torch.testing import assert_close
from transformers import DynamicCache

from dca import DCAConfig, apply_dca, kernels
from dca.cache import StaticKVCache, StaticKVLayer
from dca.kv_quant import Int8KVCache, quantize_int8
from dca.prefill import chunked_prefill
from tests.dca.conftest import HAS_TRITON, TINY_DCA, left_pad, tiny_model
from tests.dca.reference import reference_cache_attention, reference_logits

pytestmark = [
    pytest.mark.skipif(not (HAS_TRITON and kernels.triton_interpreted()), reason="needs triton and its interpreter (CPU)"),
    pytest.mark.usefixtures("one_torch_thread"),
]
TRITON = DCAConfig(32, chunk_size=24, local_window=4, backend="triton")  # L = 20


def ids(length, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 101, (batch, length), generator=g)


def relative_error(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max())


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles and 3 key splits: more block, chunk and split boundaries at small sizes."""
    from dca import triton_kernels

    monkeypatch.setattr(triton_kernels, "CPU_TILES",
                        dict(prefill=(16, 16, 1, 1), decode=(16, 16, 1, 1), packed=(16, 16, 1, 1), store=16, reduce=16,
                             splits=3))
    return triton_kernels


def rope_table(config, dim, dtype):
    angles = torch.arange(config.chunk_size + 1, dtype=torch.float64)[:, None] * torch.linspace(0.05, 1.0, dim // 2,
                                                                                               dtype=torch.float64).repeat(2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# (config, q heads, kv heads, queries, dtype, int8): 87 tokens in 5 chunks; left-padded rows of 87,
# 57 and 7 real tokens; 96 slots of capacity (9 never filled). The second config has L = 5 < W.
CASES = [
    (TRITON, 4, 2, 87, torch.float64, False),  # one-shot prefill
    (TRITON, 4, 2, 40, torch.float32, False),  # a block of new queries with a cache, across chunks
    (TRITON, 4, 2, 20, torch.float32, True),  # int8 cache
    (DCAConfig(16, chunk_size=16, local_window=11), 6, 1, 33, torch.float64, False),
    (TRITON, 4, 2, 1, torch.float64, False),  # decode
    (TRITON, 4, 2, 3, torch.float32, False),  # a few new tokens
    (TRITON, 4, 2, 2, torch.float64, True),
    (DCAConfig(16, chunk_size=16, local_window=11), 6, 1, 2, torch.float32, False),
    (DCAConfig(48, chunk_size=40, local_window=8), 4, 2, 50, torch.float64, False),  # L = 32: on the 16-key grid
    (TRITON, 6, 1, 16, torch.float64, True),  # decode: 6 heads x 16 tokens = 96 rows over 8 programs of 16
]


@pytest.mark.parametrize("config, hq, hkv, tq, dtype, int8", CASES)
def test_kernels_match_the_pairwise_reference(small_tiles, config, hq, hkv, tq, dtype, int8):
    g = torch.Generator().manual_seed(tq)
    b, d, slots, seq_end = 3, 16, 96, 87
    row_start = torch.tensor([0, 30, 80], dtype=torch.int32)
    q = torch.randn(b, hq, tq, d, generator=g, dtype=dtype)
    if int8:
        k = torch.randint(-127, 128, (b, hkv, slots, d), generator=g, dtype=torch.int8)
        v = torch.randint(-127, 128, (b, hkv, slots, d), generator=g, dtype=torch.int8)
        k_scale, v_scale = torch.rand(b, hkv, slots, generator=g) / 50, torch.rand(b, hkv, slots, generator=g) / 50
    else:
        k = torch.randn(b, hkv, slots, d, generator=g, dtype=dtype)
        v = torch.randn(b, hkv, slots, d, generator=g, dtype=dtype)
        k_scale = v_scale = None
    scale = torch.tensor([0.25, 0.3, 0.2], dtype=dtype)  # per row: temperatures differ
    cos, sin = rope_table(config, d, dtype)
    seq = torch.tensor([seq_end], dtype=torch.int32)
    ref = reference_cache_attention(q, k, v, row_start, seq_end, scale, cos, sin, config, k_scale, v_scale)
    kernel = small_tiles.decode if tq <= small_tiles.DECODE_MAX_QUERIES else small_tiles.prefill
    out = kernel(q, k, v, row_start, seq, scale, cos, sin, config, k_scale, v_scale)
    assert out.dtype == dtype and out.shape == q.shape
    # the 7-token row: its first queries are pads (zeros)
    if tq > 7:
        assert not out[2, :, : tq - 7].any()
    if dtype == torch.float64:
        assert_close(out.double(), ref, rtol=1e-12, atol=1e-12)
    else:
        assert relative_error(out, ref) < 1e-5


def test_prefill_kernel_also_runs_a_few_queries(small_tiles):
    # attention() sends <= 16 queries to the split-KV kernel; the prefill kernel handles them too.
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 3, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 50, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 50, 16, generator=g, dtype=torch.float64)
    args = (torch.tensor([0, 11], dtype=torch.int32), torch.tensor([50], dtype=torch.int32),
            torch.tensor([0.3, 0.3], dtype=torch.float64), *rope_table(TRITON, 16, torch.float64), TRITON)
    assert_close(small_tiles.prefill(q, k, v, *args), small_tiles.decode(q, k, v, *args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_store_rotates_and_quantises_like_the_torch_path(small_tiles, dtype):
    from dca.attention import RopeTable, rotate_keys

    g = torch.Generator().manual_seed(0)
    cos, sin = rope_table(TRITON, 16, dtype)
    rope = RopeTable(TRITON, lambda i, dt: (cos[i].to(dt), sin[i].to(dt)))
    key = torch.randn(2, 2, 23, 16, generator=g, dtype=dtype) * 3
    value = torch.randn(2, 2, 23, 16, generator=g, dtype=dtype)
    row_start = torch.tensor([0, 9], dtype=torch.int32)
    at = 30  # slots 30..52: tokens 30.. and 21.. of the two rows
    tokens = torch.arange(at, at + 23)[None, :] - row_start[:, None].long()
    rotated = rotate_keys(key, tokens, rope)
    k = torch.zeros(2, 2, 64, 16, dtype=dtype)
    v = torch.zeros_like(k)
    small_tiles.store(key, value, k, v, cos, sin, row_start, torch.tensor([at], dtype=torch.int32), TRITON.chunk_len)
    assert_close(k[:, :, at : at + 23], rotated, rtol=1e-6, atol=1e-6)
    assert torch.equal(v[:, :, at : at + 23], value) and not k[:, :, :at].any() and not k[:, :, at + 23 :].any()
    # int8: the format and the rounding of dca.kv_quant.quantize_int8
    kq, vq = torch.zeros(2, 2, 64, 16, dtype=torch.int8), torch.zeros(2, 2, 64, 16, dtype=torch.int8)
    ks, vs = torch.zeros(2, 2, 64), torch.zeros(2, 2, 64)
    small_tiles.store(key, value, kq, vq, cos, sin, row_start, torch.tensor([at], dtype=torch.int32),
                      TRITON.chunk_len, ks, vs)
    (ref_k, ref_ks), (ref_v, ref_vs) = quantize_int8(k[:, :, at : at + 23]), quantize_int8(value)
    assert_close(ks[:, :, at : at + 23], ref_ks[..., 0], rtol=1e-6, atol=0)
    assert torch.equal(vs[:, :, at : at + 23], ref_vs[..., 0]) and torch.equal(vq[:, :, at : at + 23], ref_v)
    assert torch.equal(kq[:, :, at : at + 23], ref_k)


def test_float32_model_within_1e5_of_the_float64_reference():
    model = tiny_model(dtype=torch.float32)
    x = ids(87)
    ref = reference_logits(model, TRITON, x)
    dca = apply_dca(copy.deepcopy(model), TRITON)
    out = dca(x[:, :60], use_cache=True)
    assert relative_error(out.logits, ref[:, :60]) < 1e-5
    for t in range(60, 64):  # decode steps across the chunk boundary at 60
        step = dca(x[:, t : t + 1], cache=out.past_key_values, use_cache=True).logits
        assert relative_error(step, ref[:, t : t + 1]) < 1e-5


def test_static_cache_with_fixed_capacity_generates_like_the_torch_path():
    model = tiny_model()
    x = ids(45)
    kw = dict(max_new_tokens=17, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = apply_dca(copy.deepcopy(model), DCAConfig(32, 24, 4, backend="torch")).generate(x, **kw)
    triton_model = apply_dca(copy.deepcopy(model), TRITON)
    cache = StaticKVCache(max_tokens=62)
    got = triton_model.generate(x, cache=cache, **kw)
    assert torch.equal(got, expected)
    layer = cache.layers[0]
    assert isinstance(layer, StaticKVLayer) and layer.capacity == 62 and layer.length == 61
    with pytest.raises(ValueError, match="max_tokens=62"):
        triton_model(ids(3), cache=cache, use_cache=True)


def test_static_cache_on_the_torch_backend_returns_views():
    model = apply_dca(tiny_model(), DCAConfig(32, 24, 4, backend="torch"))
    x = ids(50)
    ref = model(x, use_cache=True)
    cache = StaticKVCache(max_tokens=64)
    last = chunked_prefill(model, x, cache, block_size=20)
    assert_close(last, ref.logits[:, -1], rtol=1e-9, atol=1e-9)
    keys, _ = cache.layers[1].filled()
    assert keys.data_ptr() == cache.layers[1].k.data_ptr() and keys.shape[2] == 50
    assert_close(keys, ref.past_key_values.layers[1].keys, rtol=0, atol=0)


def test_left_padded_prefill_then_maskless_decode_keeps_each_row():
    # The cache records each row's start: decode steps (and a CUDA graph of one) need no mask.
    model = apply_dca(tiny_model(), TRITON)
    rows = [ids(n, seed=n) for n in (45, 18)]
    batch, mask = left_pad(rows)
    cache = StaticKVCache(max_tokens=52)
    logits = chunked_prefill(model, batch, cache, block_size=20, attention_mask=mask)
    alone = [model(row, use_cache=True) for row in rows]
    for r in range(2):
        assert_close(logits[r], alone[r].logits[0, -1], rtol=1e-9, atol=1e-9)
    nxt = ids(6, batch=2, seed=7)
    for t in range(6):
        step = model(nxt[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1]
        for r in range(2):
            want = model(nxt[r : r + 1, t : t + 1], cache=alone[r].past_key_values, use_cache=True).logits[0, -1]
            assert_close(step[r], want, rtol=1e-9, atol=1e-9)


def test_int8_static_cache_matches_the_int8kvcache_torch_path():
    # Same stored int8 values (the store kernel quantises as kv_quant does), dequantised inside the
    # kernels instead of for the whole layer.
    model = tiny_model()
    x = ids(70)
    torch_model = apply_dca(copy.deepcopy(model), DCAConfig(32, 24, 4, backend="torch"))
    ref_cache = Int8KVCache()
    ref = torch_model(x[:, :60], cache=ref_cache, use_cache=True).logits
    ref_steps = [torch_model(x[:, t : t + 1], cache=ref_cache, use_cache=True).logits for t in range(60, 70)]
    triton_model = apply_dca(copy.deepcopy(model), TRITON)
    cache = StaticKVCache(max_tokens=70, kv_dtype="int8")
    got = triton_model(x[:, :60], cache=cache, use_cache=True).logits
    assert_close(got, ref, rtol=1e-9, atol=1e-9)
    for t, want in zip(range(60, 70), ref_steps):
        assert_close(triton_model(x[:, t : t + 1], cache=cache, use_cache=True).logits, want, rtol=1e-9, atol=1e-9)
    stored, expected = cache.layers[1], ref_cache.layers[1]
    assert stored.k.dtype == torch.int8 and torch.equal(stored._values[0], expected._values[0])
    assert (stored._keys[0].int() - expected._keys[0].int()).abs().max() <= 1


def test_an_empty_dynamic_cache_is_adopted_and_grows_in_steps(monkeypatch):
    import dca.cache as static_cache

    monkeypatch.setattr(static_cache, "_ALIGN", 16)  # small steps: several reallocations below
    model = apply_dca(tiny_model(), TRITON)
    x = ids(95)
    cache = DynamicCache()
    chunked_prefill(model, x[:, :40], cache, block_size=20)  # the hint: 40 tokens
    layer = cache.layers[0]
    assert isinstance(layer, StaticKVLayer) and layer.capacity == 64
    for t in range(40, 95, 11):
        model(x[:, t : t + 11], cache=cache, use_cache=True)
    assert layer.length == 95 and layer.capacity >= 95
    full = model(x, use_cache=True).past_key_values  # one shot, also adopted
    assert_close(layer.filled()[0], full.layers[0].filled()[0], rtol=1e-9, atol=1e-9)
    # a cache already filled by another path is used through its own update
    filled = DynamicCache()
    apply_dca(tiny_model(), DCAConfig(32, 24, 4, backend="torch"))(x[:, :30], cache=filled, use_cache=True)
    model(x[:, 30:31], cache=filled, use_cache=True)
    assert type(filled.layers[0]).__name__ == "DynamicLayer" and filled.get_seq_length() == 31


class _Counter:
    """Wraps a kernel: counts launches; with `stub`, launches nothing."""

    def __init__(self, kernel, stub=False):
        self.kernel, self.stub, self.launches = kernel, stub, 0

    def __getitem__(self, grid):
        self.launches += 1
        return (lambda *a, **k: None) if self.stub else self.kernel[grid]


def count_launches(monkeypatch, module, stub=False):
    names = ("_attention_kernel", "_decode_reduce_kernel", "_store_kernel")
    counters = {n: _Counter(getattr(module, n), stub) for n in names}
    for name, counter in counters.items():
        monkeypatch.setattr(module, name, counter)
    return counters


@pytest.mark.parametrize("length", [21, 95])  # 2 DCA chunks, 5 chunks
def test_launches_per_layer_do_not_depend_on_the_number_of_chunks(monkeypatch, small_tiles, length):
    counters = count_launches(monkeypatch, small_tiles, stub=True)
    model = apply_dca(tiny_model(), TRITON)
    cache = StaticKVCache(max_tokens=100)
    model(ids(length), cache=cache, use_cache=True)
    assert {n: c.launches for n, c in counters.items()} == {
        "_attention_kernel": 2, "_decode_reduce_kernel": 0, "_store_kernel": 2}
    model(ids(1), cache=cache, use_cache=True)  # decode: split-KV + merge, per layer
    assert {n: c.launches for n, c in counters.items()} == {
        "_attention_kernel": 4, "_decode_reduce_kernel": 2, "_store_kernel": 4}


def test_the_layer_path_reads_nothing_back_from_the_device(monkeypatch, small_tiles):
    """No .item(), .tolist(), bool(tensor), nonzero, .cpu() in the per-layer host code (kernels
    stubbed: the interpreter itself copies tensors to the host)."""
    count_launches(monkeypatch, small_tiles, stub=True)
    model = apply_dca(tiny_model(), DCAConfig(32, 24, 4, temperature_alpha=0.3, backend="triton"))
    state = model.model.layers[0].self_attn.dca_state
    cache = StaticKVCache(max_tokens=64)
    from dca import set_prompt_length

    set_prompt_length(cache, torch.tensor([40, 40]))  # a host value: computed on the host once
    for layer in model.model.layers:  # warm: lazy imports and the rope table
        layer.self_attn(torch.randn(2, 30, 64, dtype=torch.float64), cache=cache)

    def trap(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} in the DCA layer path")

        return fail

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    monkeypatch.setattr(torch, "nonzero", trap("torch.nonzero"))
    mask = torch.ones(2, 40, dtype=torch.long)  # on CUDA; CPU masks get a left-padding check
    monkeypatch.setattr("dca.hf._check_left_padded", lambda mask: None)
    state.padding_mask = mask
    for layer in model.model.layers:  # a prefill block with a mask, through both layers
        layer.self_attn(torch.randn(2, 10, 64, dtype=torch.float64), cache=cache)
    state.padding_mask = None
    for _ in range(3):  # decode steps: no mask, the cache's row starts
        for layer in model.model.layers:
            layer.self_attn(torch.randn(2, 1, 64, dtype=torch.float64), cache=cache)
    assert cache.get_seq_length() == 43 and cache.layers[1].length == 43


def test_backend_resolution(monkeypatch):
    assert kernels.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    assert kernels.resolve_backend("triton", torch.device("cpu"), torch.float32) == "triton"  # interpreter
    monkeypatch.setattr(kernels, "triton_interpreted", lambda: False)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert kernels.resolve_backend("auto", torch.device("cuda"), dtype) == "triton"
    assert kernels.resolve_backend("auto", torch.device("cuda"), torch.float64) == "torch"
    assert kernels.resolve_backend("torch", torch.device("cuda"), torch.bfloat16) == "torch"
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        kernels.resolve_backend("triton", torch.device("cuda"), torch.float64)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.resolve_backend("triton", torch.device("cpu"), torch.float32)
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert kernels.resolve_backend("auto", torch.device("cuda"), torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="triton package is not installed"):
        apply_dca(tiny_model(), DCAConfig(32, backend="triton"))


def test_static_cache_arguments_are_checked():
    with pytest.raises(ValueError, match="max_tokens"):
        StaticKVCache(max_tokens=0)
    with pytest.raises(ValueError, match="kv_dtype"):
        StaticKVCache(kv_dtype="fp8")
    assert StaticKVCache().get_seq_length() == 0 and TINY_DCA.backend == "auto"


def test_tensor_level_dca_attention_on_triton_matches_torch():
    """dca.attention.dca_attention(backend="triton"): left-padded rows, per-row temperature."""
    from dca.attention import RopeTable, dca_attention, rotate_keys
    from dca.positions import token_indices_from_mask

    config = DCAConfig(32, chunk_size=24, local_window=4, temperature_alpha=0.4)
    cos, sin = rope_table(config, 16, torch.float64)
    rope = RopeTable(config, lambda i, dt: (cos[i].to(dt), sin[i].to(dt)))
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :25] = 0
    index = token_indices_from_mask(mask)
    q = torch.randn(2, 4, 70, 16, generator=g, dtype=torch.float64)
    k = rotate_keys(torch.randn(2, 2, 70, 16, generator=g, dtype=torch.float64), index, rope)
    v = torch.randn(2, 2, 70, 16, generator=g, dtype=torch.float64)
    prompt = torch.tensor([70, 45])
    want = dca_attention(q, k, v, index, index, rope, 0.25, backend="torch", prompt_length=prompt)
    got = dca_attention(q, k, v, index, index, rope, 0.25, backend="triton", prompt_length=prompt)
    assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tq", [2, 40])
def test_float16_kernels_through_the_interpreter(small_tiles, tq):
    """Low precision on CPU. float16 only: the interpreter's tl.dot multiplies bfloat16's raw bits
    (it stores bf16 as uint16), so bf16 is checked on a GPU only (test_triton_gpu.py)."""
    g = torch.Generator().manual_seed(tq)
    b, hq, hkv, d = 2, 8, 2, 32
    row_start = torch.tensor([0, 30], dtype=torch.int32)
    q = torch.randn(b, hq, tq, d, generator=g).half()
    k, v = torch.randn(b, hkv, 96, d, generator=g).half(), torch.randn(b, hkv, 96, d, generator=g).half()
    cos, sin = rope_table(TRITON, d, torch.float16)
    scale = torch.full((b,), d**-0.5)
    seq = torch.tensor([87], dtype=torch.int32)
    ref = reference_cache_attention(q, k, v, row_start, 87, scale, cos, sin, TRITON)
    out = small_tiles.attention(q, k, v, row_start, seq, scale, cos, sin, TRITON)
    assert out.dtype == torch.float16
    assert relative_error(out, ref) < 2e-3  # fp16 rounding of q, p and the output


def test_packed_rows_on_the_triton_backend_match_the_torch_backend():
    """Continuous batching's packed forward (a cache with `packed_rows`, dca/hf.py): each row
    attends to its own cache; on the Triton backend through dca_attention(backend="triton")."""

    class Packed:
        def __init__(self, rows):
            self.packed_rows = rows

    def run(backend):
        model = apply_dca(tiny_model(), DCAConfig(32, 24, 4, temperature_alpha=0.3, backend=backend))
        attn = model.model.layers[0].self_attn
        attn.dca_state.padding_mask = None
        g = torch.Generator().manual_seed(4)
        prefix = torch.randn(1, 47, 64, generator=g, dtype=torch.float64)
        step = torch.randn(1, 1 + 20, 64, generator=g, dtype=torch.float64)  # row A: 1 token, row B: 20
        a, b = DynamicCache(), DynamicCache()
        attn(prefix, cache=a)  # row A already holds 47 tokens (3 chunks)
        for cache, n in ((a, 47), (b, 20)):
            cache.dca_prompt_length = torch.tensor([n])
        return attn(step, cache=Packed([(a, 0, 1), (b, 1, 21)]))[0]

    assert_close(run("triton"), run("torch"), rtol=1e-9, atol=1e-9)


# --- issue 18: the kernels' review fixes and the packed-rows kernels ----------------------------


def test_int8_store_rounds_ties_and_near_ties_exactly_like_quantize_int8(small_tiles):
    """Values whose x / scale is a rounding tie (k + 0.5: half to even, as torch.round) or a
    float32 ulp from one: the stored int8 values and scales equal kv_quant's bit for bit. (The
    interpreter divides exactly; that the compiled kernel does too, div.rn rather than the
    approximate `/`, is checked on its PTX by tests/dca/test_kernel_compile.py.)"""
    d = 16
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997, 3.5, 126.5, -126.5,
                        0.0, 4.5, 5.5, -3.5])  # max |x| = 127: scale exactly 1
    value = torch.stack([row, row * 0.25, row.flip(0)])[None, None].expand(1, 2, 3, d).contiguous()  # (1, 2, 3, 16)
    cos = torch.ones(TRITON.chunk_size + 1, d)  # rotation by the identity: stored keys are the inputs
    sin = torch.zeros(TRITON.chunk_size + 1, d)
    kq, vq = torch.zeros(1, 2, 8, d, dtype=torch.int8), torch.zeros(1, 2, 8, d, dtype=torch.int8)
    ks, vs = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)
    small_tiles.store(value, value, kq, vq, cos, sin, torch.zeros(1, dtype=torch.int32), torch.tensor([2], dtype=torch.int32),
                      TRITON.chunk_len, ks, vs)
    ref, ref_scale = quantize_int8(value)
    assert torch.equal(vq[:, :, 2:5], ref) and torch.equal(kq[:, :, 2:5], ref)
    assert torch.equal(vs[:, :, 2:5], ref_scale[..., 0]) and torch.equal(ks[:, :, 2:5], ref_scale[..., 0])
    assert ref[0, 0, 0, 1] == 0 and ref[0, 0, 0, 3] == 2 and ref[0, 0, 0, 7] == 0  # the cases are hit


def test_output_written_in_place_into_a_token_major_buffer(small_tiles):
    """out= a (B, T, Hq, D) buffer viewed as (B, Hq, T, D): the caller's reshape needs no copy."""
    g = torch.Generator().manual_seed(9)
    args = (torch.tensor([0, 11], dtype=torch.int32), torch.tensor([50], dtype=torch.int32),
            torch.tensor([0.3, 0.3], dtype=torch.float64), *rope_table(TRITON, 16, torch.float64), TRITON)
    k = torch.randn(2, 2, 50, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 50, 16, generator=g, dtype=torch.float64)
    for tq in (3, 30):  # decode and prefill
        q = torch.randn(2, tq, 4, 16, generator=g, dtype=torch.float64).transpose(1, 2)  # (B, Hq, T, D) view
        want = small_tiles.attention(q, k, v, *args)
        buffer = torch.full((2, tq, 4, 16), float("nan"), dtype=torch.float64)
        got = small_tiles.attention(q, k, v, *args, out=buffer.transpose(1, 2))
        assert got.data_ptr() == buffer.data_ptr()
        assert torch.equal(buffer, want.transpose(1, 2))
    with pytest.raises(ValueError, match="out must be"):
        small_tiles.attention(q, k, v, *args, out=torch.empty(2, 4, 30, 16))  # wrong dtype


def test_rows_with_no_real_tokens_give_zeros(small_tiles):
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 2, 40, 16, generator=g, dtype=torch.float64)
    row_start = torch.tensor([0, 40], dtype=torch.int32)  # row 1: only pads
    args = (row_start, torch.tensor([40], dtype=torch.int32), torch.tensor([0.3, 0.3], dtype=torch.float64),
            *rope_table(TRITON, 16, torch.float64), TRITON)
    for tq in (1, 5, 30):
        q = torch.randn(2, 4, tq, 16, generator=g, dtype=torch.float64)
        out = small_tiles.attention(q, k, k, *args)
        ref = reference_cache_attention(q, k, k, row_start, 40, args[2], args[3], args[4], TRITON)
        assert torch.isfinite(out).all() and not out[1].any()
        assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_a_tile_that_fails_for_any_reason_is_skipped_and_all_failing_raise_kernel_unavailable(small_tiles, monkeypatch):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 20, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 20, 16, generator=g, dtype=torch.float64)
    args = (torch.zeros(1, dtype=torch.int32), torch.tensor([20], dtype=torch.int32), torch.tensor([0.3], dtype=torch.float64),
            *rope_table(TRITON, 16, torch.float64), TRITON)
    want = small_tiles.prefill(q, k, k, *args)
    tiles = [(16, 64, 1, 1), (16, 16, 1, 1)]
    monkeypatch.setattr(small_tiles, "_tile_choices", lambda kind, device, dtype: tiles)
    launch, tried = small_tiles._launch, []

    def failing_first(kernel, grid, args, options):
        tried.append(options["BLOCK_N"])
        if options["BLOCK_N"] == 64:
            raise RuntimeError("ptxas fatal: stand-in for a compile or driver error")
        return launch(kernel, grid, args, options)

    monkeypatch.setattr(small_tiles, "_launch", failing_first)
    small_tiles._WORKING.clear()
    assert_close(small_tiles.prefill(q, k, k, *args), want, rtol=0, atol=0)
    small_tiles.prefill(q, k, k, *args)
    assert tried == [64, 16, 16]  # the working tile is remembered

    def failing(kernel, grid, args, options):
        raise ValueError(f"stand-in failure of BLOCK_N={options['BLOCK_N']}")

    monkeypatch.setattr(small_tiles, "_launch", failing)
    small_tiles._WORKING.clear()
    with pytest.raises(small_tiles.KernelUnavailable, match="prefill kernel unavailable") as error:
        small_tiles.prefill(q, k, k, *args)
    assert [t for t, _ in error.value.reasons] == tiles and "BLOCK_N=16" in error.value.reasons[1][1]
    small_tiles._WORKING.clear()


def _packed_case(seed, dtype, int8, q_len, past, hq=4, hkv=2, d=16, config=TRITON):
    """Rows with caches of their own capacities (the engine's RowKV layout), their new tokens
    packed into one (1, Hq, T, D) sequence."""
    g = torch.Generator().manual_seed(seed)
    caps = [p + n + 3 * r for r, (p, n) in enumerate(zip(past, q_len))]
    q = torch.randn(1, hq, sum(q_len), d, generator=g, dtype=dtype)
    if int8:
        keys = [torch.randint(-127, 128, (1, hkv, c, d), generator=g, dtype=torch.int8) for c in caps]
        values = [torch.randint(-127, 128, (1, hkv, c, d), generator=g, dtype=torch.int8) for c in caps]
        ks = [torch.rand(1, hkv, c, 1, generator=g) / 50 for c in caps]
        vs = [torch.rand(1, hkv, c, 1, generator=g) / 50 for c in caps]
    else:
        keys = [torch.randn(1, hkv, c, d, generator=g, dtype=dtype) for c in caps]
        values = [torch.randn(1, hkv, c, d, generator=g, dtype=dtype) for c in caps]
        ks = vs = None
    scale = [0.25 + 0.05 * r for r in range(len(q_len))]
    return q, keys, values, ks, vs, scale, caps


@pytest.mark.parametrize("dtype, int8", [(torch.float64, False), (torch.float32, True)])
def test_packed_rows_in_one_launch_match_each_row_alone(small_tiles, monkeypatch, dtype, int8):
    """Decode rows (1 token), prompt blocks (several chunks, L = 20 off the 16-key grid), a row with
    nothing new, GQA, per-row temperature: one attention launch for all rows; decode rows' keys
    split over 3 programs whose last merges in the same launch."""
    q_len, past = [1, 37, 0, 1, 5], [86, 30, 12, 3, 50]
    q, keys, values, ks, vs, scale, caps = _packed_case(7, dtype, int8, q_len, past)
    cos, sin = rope_table(TRITON, 16, dtype)
    q_start = [sum(q_len[:r]) for r in range(len(q_len))]
    rows = small_tiles.PackedRows.build(q_start, q_len, past, scale, "cpu")
    caches = small_tiles.RowCaches.from_tensors(keys, values, ks, vs)
    counters = count_launches(monkeypatch, small_tiles)
    out = small_tiles.packed_attention(q, rows, caches, cos, sin, TRITON)
    assert {n: c.launches for n, c in counters.items()} == {
        "_attention_kernel": 1, "_decode_reduce_kernel": 0, "_store_kernel": 0}
    assert torch.isfinite(out).all()
    for r, (s, n, p) in enumerate(zip(q_start, q_len, past)):
        if not n:
            continue
        ref = reference_cache_attention(
            q[:, :, s : s + n], keys[r], values[r], torch.zeros(1, dtype=torch.int32), p + n,
            torch.tensor([scale[r]]), cos, sin, TRITON,
            None if ks is None else ks[r][..., 0], None if vs is None else vs[r][..., 0])
        if dtype == torch.float64:
            assert_close(out[:, :, s : s + n].double(), ref, rtol=1e-12, atol=1e-12)
        else:
            assert relative_error(out[:, :, s : s + n], ref) < 1e-5
    items = rows.work(2, 2, 16, 16)[0]
    assert int(items[:, 5].max()) == 3  # decode rows were split (and merged in the launch)


@pytest.mark.parametrize("int8", [False, True])
def test_packed_store_writes_each_row_like_the_torch_path(small_tiles, monkeypatch, int8):
    from dca.attention import RopeTable, rotate_keys

    q_len, past = [1, 23, 0, 2], [41, 0, 7, 19]
    dtype = torch.float32
    g = torch.Generator().manual_seed(3)
    cos, sin = rope_table(TRITON, 16, dtype)
    rope = RopeTable(TRITON, lambda i, dt: (cos[i].to(dt), sin[i].to(dt)))
    key = torch.randn(1, 2, sum(q_len) + 3, 16, generator=g, dtype=dtype) * 3  # 3 columns of no row (a gap)
    value = torch.randn(1, 2, sum(q_len) + 3, 16, generator=g, dtype=dtype)
    caps = [p + n + 5 for p, n in zip(past, q_len)]
    store = torch.int8 if int8 else dtype
    keys = [torch.zeros(1, 2, c, 16, dtype=store) for c in caps]
    values = [torch.zeros(1, 2, c, 16, dtype=store) for c in caps]
    ks = [torch.zeros(1, 2, c, 1) for c in caps] if int8 else None
    vs = [torch.zeros(1, 2, c, 1) for c in caps] if int8 else None
    q_start = [3 + sum(q_len[:r]) for r in range(len(q_len))]  # columns 0-2 belong to no row
    rows = small_tiles.PackedRows.build(q_start, q_len, past, [1.0] * 4, "cpu")
    counters = count_launches(monkeypatch, small_tiles)
    small_tiles.packed_store(key, value, rows, small_tiles.RowCaches.from_tensors(keys, values, ks, vs), cos, sin,
                             TRITON.chunk_len)
    assert counters["_store_kernel"].launches == 1
    for r, (s, n, p) in enumerate(zip(q_start, q_len, past)):
        rotated = rotate_keys(key[:, :, s : s + n], torch.arange(p, p + n)[None], rope)
        untouched = torch.ones(caps[r], dtype=torch.bool)
        untouched[p : p + n] = False
        assert not keys[r][:, :, untouched].any() and not values[r][:, :, untouched].any()
        if int8:
            (rk, rks), (rv, rvs) = quantize_int8(rotated), quantize_int8(value[:, :, s : s + n])
            assert torch.equal(keys[r][:, :, p : p + n], rk) and torch.equal(values[r][:, :, p : p + n], rv)
            assert torch.equal(ks[r][:, :, p : p + n], rks) and torch.equal(vs[r][:, :, p : p + n], rvs)
        else:
            assert_close(keys[r][:, :, p : p + n], rotated, rtol=1e-6, atol=1e-6)
            assert torch.equal(values[r][:, :, p : p + n], value[:, :, s : s + n])


def test_packed_arguments_are_checked(small_tiles):
    with pytest.raises(ValueError, match="overlap"):
        small_tiles.PackedRows.build([0, 2], [3, 3], [0, 0], [1.0, 1.0], "cpu")
    k = torch.zeros(1, 2, 10, 16)
    with pytest.raises(ValueError, match="row 1 keys"):
        small_tiles.RowCaches.from_tensors([k, torch.zeros(1, 2, 16, 10).transpose(2, 3)], [k, k])
    with pytest.raises(ValueError, match="int8 row caches need"):
        small_tiles.RowCaches.from_tensors([k.to(torch.int8)], [k.to(torch.int8)])

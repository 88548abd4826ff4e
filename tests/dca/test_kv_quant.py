"""The int8 KV cache (dca/kv_quant.py): storage, equality of prefill paths, and its cost in logits."""

import pytest
import torch
from torch.testing import assert_close
from transformers import DynamicCache

from dca import apply_dca
from dca.kv_quant import Int8KVCache, dequantize_int8, int8_bytes_per_element, quantize_int8
from dca.prefill import chunked_prefill
from tests.dca.conftest import TINY_DCA, tiny_model


def ids(length, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 101, (batch, length), generator=g)


def test_round_trip_error_is_at_most_half_a_step_per_token_and_head():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 16, generator=g, dtype=torch.float64) * torch.rand(2, 3, 50, 1, generator=g) * 10
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 50, 1) and scale.dtype == torch.float32
    err = (dequantize_int8(q, scale, torch.float64) - x).abs()
    assert bool((err <= scale.double() * 0.5 + 1e-6).all())
    # each (token, head) uses its full int8 range
    assert bool((q.abs().amax(-1) == 127).all())


def test_zero_vectors_survive():
    q, scale = quantize_int8(torch.zeros(1, 1, 4, 8))
    assert torch.equal(dequantize_int8(q, scale, torch.float32), torch.zeros(1, 1, 4, 8))


def test_stores_int8_and_reports_its_size():
    model = apply_dca(tiny_model(dtype=torch.float32), TINY_DCA)
    cache = Int8KVCache()
    model(ids(40), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 40
    layer = cache.layers[0]
    assert layer._keys[0].dtype == torch.int8 and layer._keys[0].shape == (1, 2, 40, 16)
    # 2 layers x (K, V) x 2 kv heads x 40 tokens x (16 int8 + 4-byte scale)
    assert cache.nbytes() == 2 * 2 * 2 * 40 * (16 + 4)
    assert int8_bytes_per_element(16) == 1.25 and int8_bytes_per_element(128) == 1.03125


@pytest.mark.usefixtures("dca_backend")
def test_chunked_prefill_gives_the_same_cache_and_logits_as_one_shot():
    model = apply_dca(tiny_model(), TINY_DCA)
    x = ids(95)
    one = Int8KVCache()
    one_shot = model(x, cache=one, use_cache=True).logits[:, -1]
    blocks = Int8KVCache()
    chunked = chunked_prefill(model, x, blocks, block_size=20)
    assert_close(chunked, one_shot, rtol=1e-9, atol=1e-9)
    for a, b in zip(one.layers, blocks.layers):
        assert torch.equal(a._keys[0], b._keys[0]) and torch.equal(a._values[1], b._values[1])


@pytest.mark.usefixtures("dca_backend")
def test_logit_difference_against_full_precision_cache_is_small():
    # float32 tiny model: int8 KV moves logits by a small fraction of their spread.
    model = apply_dca(tiny_model(dtype=torch.float32, layers=4), TINY_DCA)
    x = ids(95)
    ref = model(x, cache=DynamicCache(), use_cache=True).logits
    got = model(x, cache=Int8KVCache(), use_cache=True).logits
    rel = (got - ref).abs().max() / ref.std()
    assert rel < 0.05, float(rel)
    assert torch.equal(got.argmax(-1), ref.argmax(-1)) or (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


@pytest.mark.usefixtures("dca_backend")
def test_generate_with_int8_cache_matches_decode_steps():
    model = apply_dca(tiny_model(dtype=torch.float32), TINY_DCA)
    x = ids(50)
    out = model.generate(x, cache=Int8KVCache(), max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    cache = Int8KVCache()
    logits = model(x, cache=cache, use_cache=True).logits[:, -1]
    tokens = []
    for _ in range(10):
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = model(nxt, cache=cache, use_cache=True).logits[:, -1]
    assert torch.equal(out[:, 50:], torch.cat(tokens, dim=1))


@pytest.mark.usefixtures("dca_backend")
def test_batch_select_and_reorder_keep_rows():
    model = apply_dca(tiny_model(dtype=torch.float32), TINY_DCA)
    cache = Int8KVCache()
    model(ids(30, batch=3), cache=cache, use_cache=True)
    k0 = cache.layers[0]._keys[0].clone()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.layers[0]._keys[0], k0[[2, 0, 1]])
    cache.crop(-10)
    assert cache.get_seq_length() == 20 and cache.layers[1]._values[0].shape[2] == 20

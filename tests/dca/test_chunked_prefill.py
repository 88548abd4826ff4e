"""Chunked prefill (dca/prefill.py) against one-shot prefill and the multi-token-with-cache path."""

import copy

import pytest
import torch
from torch.testing import assert_close
from transformers import DynamicCache

from dca import DCAConfig, apply_dca
from dca.prefill import chunked_prefill, prefill_blocks
from tests.dca.conftest import TINY_DCA, left_pad, tiny_model

TOL = dict(rtol=1e-9, atol=1e-9)
pytestmark = pytest.mark.usefixtures("dca_backend")  # torch backend and Triton kernels


def ids(length, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 101, (batch, length), generator=g)


def dca_model(config=TINY_DCA, **kw):
    return apply_dca(tiny_model(**kw), config)


def test_blocks_are_aligned_to_absolute_multiples():
    assert prefill_blocks(0, 45, 20) == [(0, 20), (20, 40), (40, 45)]
    assert prefill_blocks(13, 30, 20) == [(13, 20), (20, 40), (40, 43)]
    assert prefill_blocks(0, 5, 20) == [(0, 5)]
    with pytest.raises(ValueError):
        prefill_blocks(0, 5, 0)


@pytest.mark.parametrize("block_size", [1, 7, 20, 33, None, 200])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_equals_one_shot_prefill(block_size, alpha, dca_backend):
    if dca_backend == "triton" and block_size == 1:
        pytest.skip("one-token blocks are decode steps: test_semantics' decode tests cover them on Triton")
    config = DCAConfig(pretraining_length=32, chunk_size=24, local_window=4, temperature_alpha=alpha)
    model = dca_model(config)
    x = ids(95)
    one_shot = model(x, use_cache=True)
    cache = DynamicCache()
    last = chunked_prefill(model, x, cache, block_size=block_size)
    assert_close(last, one_shot.logits[:, -1], **TOL)
    assert cache.get_seq_length() == 95
    for layer in range(2):
        assert_close(cache.layers[layer].keys, one_shot.cache.layers[layer].keys, **TOL)
        assert_close(cache.layers[layer].values, one_shot.cache.layers[layer].values, **TOL)


def test_all_block_logits_equal_one_shot_forward():
    model = dca_model()
    x = ids(87)
    full = model(x).logits
    got = torch.zeros_like(full)

    def keep(start, logits):
        got[:, start : start + logits.shape[1]] = logits

    chunked_prefill(model, x, DynamicCache(), block_size=20, on_block_logits=keep)
    assert_close(got, full, **TOL)


def test_temperature_uses_the_whole_prompt_not_the_first_block():
    # With alpha > 0 a first block of 20 tokens alone would give m = 1 (20 < P); the prompt is 95.
    config = DCAConfig(pretraining_length=32, chunk_size=24, local_window=4, temperature_alpha=0.5)
    model = dca_model(config)
    x = ids(95)
    one_shot = model(x).logits[:, -1]
    chunked = chunked_prefill(model, x, DynamicCache(), block_size=20)
    assert_close(chunked, one_shot, **TOL)


def test_continues_a_cached_prefix_and_decodes_like_one_shot():
    model = dca_model(DCAConfig(pretraining_length=32, chunk_size=24, local_window=4, temperature_alpha=0.5))
    x = ids(95)
    cache = DynamicCache()
    chunked_prefill(model, x[:, :30], cache, block_size=20, prompt_length=90)
    last = chunked_prefill(model, x[:, 30:90], cache, block_size=20)
    # Same temperature n = 90 in the reference: a one-shot prefill of 90 tokens, then decode steps.
    ref_cache = DynamicCache()
    ref = model(x[:, :90], cache=ref_cache, use_cache=True).logits[:, -1]
    assert_close(last, ref, **TOL)
    for t in range(90, 95):
        step = model(x[:, t : t + 1], cache=cache, use_cache=True).logits
        ref_step = model(x[:, t : t + 1], cache=ref_cache, use_cache=True).logits
        assert_close(step, ref_step, **TOL)


def test_left_padded_batch_equals_each_row_alone():
    model = dca_model()
    lengths = [87, 50, 23]
    rows = [ids(n, seed=n) for n in lengths]
    batch, mask = left_pad(rows)
    last = chunked_prefill(model, batch, DynamicCache(), block_size=20, attention_mask=mask)
    for r, row in enumerate(rows):
        assert_close(last[r], model(row).logits[0, -1], **TOL)


def test_generate_continues_from_a_chunked_prefill():
    model = dca_model()
    x = ids(70)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = model.generate(x, **kw)
    cache = DynamicCache()
    # Prefill all but the last prompt token; generate feeds that one and decodes.
    chunked_prefill(model, x[:, :-1], cache, block_size=20, prompt_length=70)
    got = model.generate(x, cache=cache, **kw)
    assert torch.equal(got, expected)


def test_rejects_a_mask_that_does_not_cover_the_cache():
    model = dca_model()
    cache = DynamicCache()
    chunked_prefill(model, ids(10), cache)
    with pytest.raises(ValueError, match="attention_mask covers"):
        chunked_prefill(model, ids(5), cache, attention_mask=torch.ones(1, 5, dtype=torch.long))


def test_float32_chunked_prefill_within_float_tolerance():
    model = apply_dca(tiny_model(dtype=torch.float32), TINY_DCA)
    x = ids(95)
    one_shot = model(x).logits[:, -1]
    chunked = chunked_prefill(model, x, DynamicCache(), block_size=16)
    assert_close(chunked, one_shot, rtol=1e-5, atol=1e-5)

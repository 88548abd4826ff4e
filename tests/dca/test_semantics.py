"""DCA against the naive float64 reference of tests/dca/reference.py (spec sections 2-5)."""

import copy

import pytest
import torch
from torch.testing import assert_close

from dca import DCAConfig, apply_dca
from tests.dca.conftest import TINY_DCA, left_pad, tiny_model
from tests.dca.reference import reference_logits

TOL = dict(rtol=1e-9, atol=1e-9)
# Every test here runs on the torch backend and on the Triton kernels (float64 through the
# interpreter on CPU): the same spec, the same tolerance.
pytestmark = pytest.mark.usefixtures("dca_backend")


def patched(model, config=TINY_DCA):
    return apply_dca(copy.deepcopy(model), config)


def ids(length, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 101, (batch, length), generator=g)


@pytest.mark.parametrize("length", [1, 7, 20, 24, 25])
def test_equals_plain_model_up_to_chunk_size_plus_one(length):
    model = tiny_model()
    x = ids(length)
    assert_close(patched(model)(x).logits, model(x).logits, **TOL)


def test_first_differing_row_is_chunk_size_plus_one():
    model = tiny_model()
    x = ids(40)
    diff = (patched(model)(x).logits - model(x).logits).abs().amax(-1)[0]
    S = TINY_DCA.chunk_size
    assert diff[: S + 1].max() < 1e-9
    assert diff[S + 1] > 1e-6


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_matches_reference_beyond_four_chunks(model_type, alpha):
    # 87 tokens, L = 20: chunks 0-3 full, chunk 4 partial; 4 query heads over 2 KV heads (GQA).
    config = DCAConfig(32, chunk_size=24, local_window=4, temperature_alpha=alpha)
    model = tiny_model(model_type)
    x = ids(87)
    assert_close(patched(model, config)(x).logits, reference_logits(model, config, x), **TOL)


def test_matches_reference_with_many_kv_groups_and_short_chunks():
    # L = 5 < W: successive ids cap at S for a > W rows, inter id = 2L - 1 < S.
    config = DCAConfig(16, chunk_size=16, local_window=11)
    model = tiny_model(heads=6, kv_heads=1)
    x = ids(33)
    assert_close(patched(model, config)(x).logits, reference_logits(model, config, x), **TOL)


def test_linear_rope_scaling_is_honoured():
    model = tiny_model(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    x = ids(70)
    assert_close(patched(model)(x).logits, reference_logits(model, TINY_DCA, x), **TOL)
    # and the scaling matters: the unscaled reference differs
    plain = tiny_model()
    assert not torch.allclose(reference_logits(plain, TINY_DCA, x), reference_logits(model, TINY_DCA, x))


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_decode_steps_equal_full_recompute(alpha):
    config = DCAConfig(32, chunk_size=24, local_window=4, temperature_alpha=alpha)
    model = tiny_model()
    dca = patched(model, config)
    prompt, steps = 37, 48  # decoding crosses chunk boundaries at 40, 60, 80
    x = ids(prompt + steps)
    out = dca(x[:, :prompt], use_cache=True)
    cache = out.past_key_values
    # The temperature's n stays the prompt length for every decode step (spec section 5).
    full = reference_logits(model, config, x, prompt_length=prompt)
    assert_close(out.logits[:, -1], full[:, prompt - 1], **TOL)
    for t in range(prompt, prompt + steps):
        step = dca(x[:, t : t + 1], cache=cache, use_cache=True)
        assert_close(step.logits[:, -1], full[:, t], **TOL)


def test_several_new_tokens_with_cache_each_in_its_own_chunk():
    model = tiny_model()
    dca = patched(model)
    x = ids(95)
    full = reference_logits(model, TINY_DCA, x)
    out = dca(x[:, :13], use_cache=True)
    cache = out.past_key_values
    # blocks that straddle chunk boundaries (20, 40, 60, 80) and one that spans 3 chunks
    for start, stop in [(13, 27), (27, 45), (45, 88), (88, 95)]:
        block = dca(x[:, start:stop], cache=cache, use_cache=True)
        assert_close(block.logits, full[:, start:stop], **TOL)


def test_left_padded_batch_equals_each_row_alone():
    model = tiny_model()
    dca = patched(model)
    lengths = [87, 50, 23]
    rows = [ids(n, seed=n) for n in lengths]
    width = max(lengths)
    batch, mask = left_pad(rows)
    logits = dca(batch, attention_mask=mask).logits
    for r, (row, n) in enumerate(zip(rows, lengths)):
        assert_close(logits[r, width - n :], dca(row).logits[0], **TOL)


def test_left_padded_generate_equals_each_row_alone(dca_backend):
    # 16 new tokens on the Triton kernels (interpreter time): both rows still decode across a
    # chunk boundary (45 -> 61 crosses 60, 18 -> 34 crosses 20).
    left_padded_generate_equals_each_row_alone(16 if dca_backend == "triton" else 30)


def left_padded_generate_equals_each_row_alone(new_tokens):
    model = tiny_model()
    dca = patched(model)
    lengths = [45, 18]
    rows = [ids(n, seed=n) for n in lengths]
    batch, mask = left_pad(rows)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
              return_dict_in_generate=True)
    together = dca.generate(batch, attention_mask=mask, **kw)
    for r, row in enumerate(rows):
        alone = dca.generate(row, **kw)
        assert torch.equal(together.sequences[r, 45:], alone.sequences[0, row.shape[1]:])
        for s_together, s_alone in zip(together.scores, alone.scores):
            assert_close(s_together[r], s_alone[0], rtol=1e-7, atol=1e-7)


def test_padded_decode_row_by_row_path(monkeypatch, dca_backend):
    # Padded decode steps over a budget go row by row: force that path on a small input.
    import dca.attention as attention

    if dca_backend == "triton":
        pytest.skip("a branch of the torch backend")
    monkeypatch.setattr(attention, "_DENSE_PAD_ELEMENTS", 0)
    left_padded_generate_equals_each_row_alone(30)


def test_packed_rows_decoding_beside_a_prefill_each_equal_their_reference(dca_backend):
    """Packed forwards as continuous batching runs them (dca/hf.py's `packed_rows`): four rows
    add one token each to caches ending in chunks 0, 1, 2 and 3 (L = 20), the decode steps batched
    over rows, beside a fresh row prefilling 9 tokens; then a second step where all five decode
    (each row's temperature now read from what its cache kept). Every row equals the reference
    alone, with its own prompt length as the temperature's n.
    The new tokens sit early in their chunks (index mod L < S - L), where the successive query
    id (L + index mod L) differs from the inter one (S): each key range needs its own rotation."""
    import inspect

    from transformers import DynamicCache

    class Packed:
        def __init__(self, rows):
            self.packed_rows = rows

        def get_seq_length(self, layer_idx=0):
            return 0

    config = DCAConfig(32, chunk_size=24, local_window=4, temperature_alpha=0.3)
    model = tiny_model()
    dca = patched(model, config)
    name = "cache" if "cache" in inspect.signature(type(dca).forward).parameters else "past_key_values"
    lengths = [13, 21, 43, 62]  # the last two past P = 32: temperatures of their own
    rows = [ids(n + 2, seed=n) for n in lengths]
    caches = []
    for row, n in zip(rows, lengths):
        cache = DynamicCache()
        dca(row[:, :n], use_cache=True, **{name: cache})
        caches.append(cache)
    fresh, fresh_cache = ids(10, seed=99), DynamicCache()
    fresh_cache.dca_prompt_length = torch.tensor([9])
    references = [reference_logits(model, config, row, prompt_length=n)[0] for row, n in zip(rows, lengths)]
    fresh_reference = reference_logits(model, config, fresh, prompt_length=9)[0]

    tokens = torch.cat([row[:, n : n + 1] for row, n in zip(rows, lengths)] + [fresh[:, :9]], dim=1)
    position_ids = torch.tensor([lengths + list(range(9))])
    k = len(lengths)
    packed = Packed([(cache, i, i + 1) for i, cache in enumerate(caches)] + [(fresh_cache, k, k + 9)])
    logits = dca(tokens, position_ids=position_ids, use_cache=True, **{name: packed}).logits[0]
    for i, n in enumerate(lengths):
        assert_close(logits[i], references[i][n], **TOL)
    assert_close(logits[k:], fresh_reference[:9], **TOL)

    tokens = torch.cat([row[:, n + 1 : n + 2] for row, n in zip(rows, lengths)] + [fresh[:, 9:]], dim=1)
    position_ids = torch.tensor([[n + 1 for n in lengths] + [9]])
    packed = Packed([(cache, i, i + 1) for i, cache in enumerate([*caches, fresh_cache])])
    logits = dca(tokens, position_ids=position_ids, use_cache=True, **{name: packed}).logits[0]
    for i, n in enumerate(lengths):
        assert_close(logits[i], references[i][n + 1], **TOL)
    assert_close(logits[k], fresh_reference[9], **TOL)

"""apply_dca patches one instance only, reuses its weights, and refuses what it cannot run."""

import copy
import inspect

import pytest
import torch
from torch.testing import assert_close

from dca import DCAConfig, apply_dca, dca_config_of
from dca.hf import DCAAttention
from tests.dca.conftest import TINY_DCA, tiny_model


def _class_snapshot(*classes):
    return {cls: dict(vars(cls)) for cls in classes}


def test_patches_this_instance_only_and_reuses_weights():
    import transformers.models.llama.modeling_llama as ml

    model = tiny_model()
    other = copy.deepcopy(model)
    x = torch.randint(1, 101, (1, 60))
    other_before = other(x).logits
    # Snapshot after building and running models: transformers caches a flag on the class then.
    classes = (ml.LlamaAttention, ml.LlamaModel, ml.LlamaForCausalLM, ml.LlamaRotaryEmbedding, ml.LlamaDecoderLayer)
    before = _class_snapshot(*classes)
    attn_fn_before = ml.apply_rotary_pos_emb
    weight_ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    n_params = sum(p.numel() for p in model.parameters())

    assert apply_dca(model, TINY_DCA) is model
    assert all(isinstance(layer.self_attn, DCAAttention) for layer in model.model.layers)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == weight_ptrs
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert _class_snapshot(*classes) == before and ml.apply_rotary_pos_emb is attn_fn_before
    # the second model in the process is untouched
    assert_close(other(x).logits, other_before, rtol=0, atol=0)
    assert other.config._attn_implementation == "sdpa"
    assert not torch.allclose(model(x).logits, other_before)
    assert dca_config_of(model) == TINY_DCA and dca_config_of(other) is None


def test_two_models_sharing_a_config_object():
    model = tiny_model()
    twin = copy.deepcopy(model)
    twin.config = model.config  # same config object, as two models built from one config would have
    for module in twin.modules():
        if hasattr(module, "config"):
            module.config = model.config
    x = torch.randint(1, 101, (1, 60))
    twin_before = twin(x).logits
    apply_dca(model, TINY_DCA)
    assert_close(twin(x).logits, twin_before, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flex_attention"])
@pytest.mark.usefixtures("dca_backend")
def test_any_attn_implementation_gives_the_same_dca(impl):
    reference = apply_dca(tiny_model(attn_implementation="sdpa"), TINY_DCA)
    model = apply_dca(tiny_model(attn_implementation=impl), TINY_DCA)
    x = torch.randint(1, 101, (2, 70))
    assert_close(model(x).logits, reference(x).logits, rtol=1e-9, atol=1e-9)


def test_generate_after_patching_float32():
    # torch backend only: on the Triton kernels through the interpreter this is 30 s of CI, and
    # float32 generation there is covered by test_triton.py and test_kv_quant.py.
    model = apply_dca(tiny_model(dtype=torch.float32), TINY_DCA)
    x = torch.randint(1, 101, (1, 50))
    out = model.generate(x, max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (1, 90)
    # greedy decoding with the cache agrees with greedy recompute-without-cache
    seq = x
    for _ in range(40):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_one_token_prompt_batch_of_two_generates(dca_backend):
    # The official code crashes here (spec section 6). Triton (interpreter time): 21 new tokens,
    # still across the first chunk boundary (L = 20).
    new = 21 if dca_backend == "triton" else 30
    model = apply_dca(tiny_model(dtype=torch.float32), TINY_DCA)
    out = model.generate(torch.tensor([[5], [7]]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 1 + new)


@pytest.mark.usefixtures("dca_backend")
def test_reapplying_replaces_the_settings():
    model = tiny_model()
    x = torch.randint(1, 101, (1, 70))
    other = DCAConfig(32, chunk_size=16, local_window=4)
    expected = apply_dca(tiny_model(), other)(x).logits
    apply_dca(model, TINY_DCA)
    apply_dca(model, other)
    assert_close(model(x).logits, expected, rtol=0, atol=0)
    assert dca_config_of(model) == other


def test_unsupported_architectures_are_refused_before_anything_runs():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64))
    with pytest.raises(ValueError, match="absolute position embeddings"):
        apply_dca(gpt2, TINY_DCA)
    mistral = MistralForCausalLM(
        MistralConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=50, sliding_window=16)
    )
    with pytest.raises(ValueError, match="sliding-window"):
        apply_dca(mistral, TINY_DCA)
    dynamic = tiny_model(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="dynamic"):
        apply_dca(dynamic, TINY_DCA)
    with pytest.raises(TypeError):
        apply_dca(tiny_model(), {"pretraining_length": 32})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_flash_backend_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="flash"):
        apply_dca(tiny_model(), DCAConfig(32, backend="flash"))


def test_auto_backend_runs_torch_on_cpu():
    from dca.kernels import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "torch"
    assert resolve_backend("torch", torch.device("cpu"), torch.float32) == "torch"


def test_padding_mask_must_be_2d():
    model = apply_dca(tiny_model(), TINY_DCA)
    x = torch.randint(1, 101, (1, 10))
    mask4d = torch.ones(1, 1, 10, 10, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2D"):
        model(x, attention_mask=mask4d)


def test_dca_module_signature_accepts_what_decoder_layers_pass():
    params = inspect.signature(DCAAttention.forward).parameters
    for name in ("hidden_states", "position_embeddings", "attention_mask", "cache", "position_ids"):
        assert name in params

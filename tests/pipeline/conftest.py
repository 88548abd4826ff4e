"""Fixtures for the engine tests: a tiny random Llama with its own tiny tokenizer, saved to disk.

9 query heads and 3 KV heads of head_dim 8 (hidden 72): over two tensor-parallel ranks AutoTP
splits them unevenly, which is the case the DCA attention must survive.
"""

from __future__ import annotations

import os

import pytest

# Before anything imports ray (its auth mode is read at import): one explicit auth setting for
# every cluster and client of the tests, whatever the machine carries (tests/ray_auth.py).
import tests.ray_auth  # noqa: E402,F401
# A cluster named by the developer's shell (RAY_ADDRESS, e.g. the dashboard tunnel of a real
# cluster) must never receive test work: code under test that reads it sees none.
os.environ.pop("RAY_ADDRESS", None)

VOCAB = 128
DCA = {"pretraining_length": 64, "chunk_size": 48, "local_window": 8}


def build_tiny_model(directory: str, seed: int = 0) -> str:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=64,
        # Wide weights: peaked logits, so fp32 reduction-order noise between 1 and 2 ranks
        # cannot flip a greedy choice.
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    )
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def ray_cluster():
    """A private local Ray cluster for one test module (4 logical CPUs on a 2-core machine is fine).

    address="local" starts a new cluster even when another one runs on this machine (a `ray start`
    of the developer's, another test run): without it ray.init attaches to the latest such
    cluster, and with num_cpus given refuses to, so the tests fail or run on a stranger's Ray.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()

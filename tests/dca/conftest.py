import pytest
import torch

from dca import DCAConfig


def tiny_config(model_type="llama", heads=4, kv_heads=2, head_dim=16, layers=2, **extra):
    from transformers import AutoConfig

    values = dict(
        vocab_size=101, hidden_size=heads * head_dim, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=32, rope_theta=10000.0, pad_token_id=0, tie_word_embeddings=False,
    )
    if model_type in ("mistral",):
        values["sliding_window"] = None
    values.update(extra)
    return AutoConfig.for_model(model_type, **values)


def tiny_model(model_type="llama", dtype=torch.float64, attn_implementation="sdpa", seed=0, **config_kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype).eval()


def left_pad(rows, pad_id=0):
    """(1, n_i) id tensors -> (B, max n) ids and 0/1 mask, each row right-aligned (left padding)."""
    width = max(row.shape[1] for row in rows)
    batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        batch[r, width - row.shape[1] :] = row[0]
        mask[r, width - row.shape[1] :] = 1
    return batch, mask


# P=32, S=24, W=4 -> L=20: a 87-token input spans 5 chunks, the last one partial.
TINY_DCA = DCAConfig(pretraining_length=32, chunk_size=24, local_window=4)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

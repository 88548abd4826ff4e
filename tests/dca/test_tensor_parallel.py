"""DCA attention on tensor-parallel shards: head counts come from tensor shapes (spec section 7)."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from dca import apply_dca
from tests.dca.conftest import TINY_DCA, tiny_model

pytestmark = pytest.mark.usefixtures("dca_backend")  # torch backend and Triton kernels


def shard(attn, q_heads, kv_heads):
    """A copy of a DCAAttention holding only some heads, as DeepSpeed AutoTP leaves it:
    q/k/v split by output rows, o_proj by input columns, config untouched."""
    d = attn.head_dim
    part = copy.deepcopy(attn)
    part.set_state(attn.dca_state)

    def rows(linear, heads):
        idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
        new = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None).to(linear.weight.dtype)
        new.weight.data = linear.weight.data[idx].clone()
        if linear.bias is not None:
            new.bias.data = linear.bias.data[idx].clone()
        return new

    part.q_proj = rows(attn.q_proj, q_heads)
    part.k_proj = rows(attn.k_proj, kv_heads)
    part.v_proj = rows(attn.v_proj, kv_heads)
    idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in q_heads])
    o = nn.Linear(len(idx), attn.o_proj.out_features, bias=False).to(attn.o_proj.weight.dtype)
    o.weight.data = attn.o_proj.weight.data[:, idx].clone()
    part.o_proj = o
    return part


@pytest.mark.parametrize(
    "split",
    [
        [(range(0, 6), range(0, 2)), (range(6, 9), range(2, 3))],  # uneven: 6 + 3 heads
        [(range(0, 3), range(0, 1)), (range(3, 6), range(1, 2)), (range(6, 9), range(2, 3))],
    ],
)
def test_sharded_heads_sum_to_the_full_attention(split):
    model = apply_dca(tiny_model(heads=9, kv_heads=3, head_dim=8), TINY_DCA)
    attn = model.model.layers[0].self_attn
    assert model.config.num_attention_heads == 9  # the config keeps full counts, like AutoTP
    hidden = torch.randn(1, 70, 72, dtype=torch.float64)
    # no padding: the base model's pre-hook has no mask to pass
    attn.dca_state.padding_mask = None
    full, _ = attn(hidden)
    parts = [shard(attn, list(q), list(kv))(hidden)[0] for q, kv in split]
    assert_close(sum(parts), full, rtol=1e-10, atol=1e-10)


def test_sharded_decode_with_cache():
    from transformers import DynamicCache

    model = apply_dca(tiny_model(heads=9, kv_heads=3, head_dim=8), TINY_DCA)
    attn = model.model.layers[0].self_attn
    attn.dca_state.padding_mask = None
    hidden = torch.randn(1, 66, 72, dtype=torch.float64)
    full, _ = attn(hidden)
    shards = [shard(attn, list(range(0, 6)), [0, 1]), shard(attn, [6, 7, 8], [2])]
    caches = [DynamicCache(), DynamicCache()]
    for s, c in zip(shards, caches):
        s(hidden[:, :41], cache=c)
    for t in range(41, 66):
        step = sum(s(hidden[:, t : t + 1], cache=c)[0] for s, c in zip(shards, caches))
        assert_close(step[:, 0], full[:, t], rtol=1e-10, atol=1e-10)

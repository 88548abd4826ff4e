"""Chunked prefill: feed a prompt into a KV cache block by block.

A one-shot forward over n prompt tokens holds activations for all n at once (the MLP's three
(n, intermediate) tensors, DCA's float32 output rows, logits). Fed in blocks of b tokens, each
block attends to the cache written by the blocks before it (the DCA core's multi-token-with-cache
path, spec section 4: every query uses its own chunk), so activation memory depends on b, not
on n; the KV cache is the only thing that grows with the prompt. The default block is one DCA
chunk (L = chunk_size - local_window tokens).

Only the last block computes logits, and only for its last position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dca.hf import dca_config_of, set_prompt_length
from dca.state import cache_state


def prefill_blocks(past_tokens: int, new_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] absolute token ranges of the blocks, aligned to multiples of block_size.

    Aligning to absolute multiples (not to `past_tokens`) keeps blocks inside DCA chunks when
    block_size divides the chunk length, whatever is already cached.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive number of tokens, got {block_size}")
    blocks, start, stop = [], past_tokens, past_tokens + new_tokens
    while start < stop:
        end = min(stop, (start // block_size + 1) * block_size)
        blocks.append((start, end))
        start = end
    return blocks


def default_block_size(model) -> int | None:
    """One DCA chunk (chunk_len) for a DCA model, None (one shot) otherwise."""
    config = dca_config_of(model)
    return config.chunk_len if config is not None else None


@torch.no_grad()
def chunked_prefill(
    model,
    input_ids: torch.Tensor,
    cache,
    *,
    block_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
    prompt_length: int | torch.Tensor | None = None,
    on_block_logits: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Writes `input_ids` into `cache` block by block; returns the last position's logits (B, V).

    model          a transformers causal LM (DCA applied or not) that accepts `logits_to_keep`
    input_ids      (B, T) the tokens to add (the whole prompt for an empty cache)
    cache          a transformers Cache (DynamicCache, dca.kv_quant.Int8KVCache, ...), filled in place;
                   it may already hold a prefix (T tokens are appended after it)
    block_size     tokens per forward; None = the model's DCA chunk_len (one shot for a non-DCA model)
    attention_mask (B, past + T) left-padding mask of the WHOLE sequence (cached part included)
    prompt_length  n of DCA's attention temperature (spec section 5), set on an empty cache before
                   the first block; default: the real tokens of each row (the whole prompt, not one
                   block, which is what a one-shot prefill would use)
    on_block_logits  if given, every block computes logits for all its positions and the
                   callback receives (start, logits (B, stop - start, V)); for evaluation

    Equal to one forward over the whole input within float tolerance (the blocks differ only
    in summation order).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}")
    past = cache.get_seq_length()
    total = past + input_ids.shape[1]
    if attention_mask is not None and attention_mask.shape[-1] != total:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} tokens but the cache plus input hold {total}; "
            "pass the mask of the whole sequence"
        )
    if block_size is None:
        block_size = default_block_size(model) or input_ids.shape[1]
    if past == 0:
        if prompt_length is None:
            prompt_length = attention_mask.sum(-1) if attention_mask is not None else total
        set_prompt_length(cache, prompt_length)
        # A growable dca.cache.StaticKVCache (or an adopted DynamicCache) allocates the whole
        # prompt at the first block instead of growing block by block.
        cache_state(cache).capacity_hint = total

    blocks = prefill_blocks(past, input_ids.shape[1], block_size)
    logits = None
    for start, stop in blocks:
        last = stop == total
        keep = 0 if on_block_logits is not None else 1
        out = model(
            input_ids=input_ids[:, start - past : stop - past],
            attention_mask=attention_mask[:, :stop] if attention_mask is not None else None,
            cache=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        if on_block_logits is not None:
            on_block_logits(start, out.logits)
        if last:
            logits = out.logits[:, -1]
        del out
    return logits

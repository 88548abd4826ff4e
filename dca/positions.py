"""Position ids of Dual Chunk Attention (spec section 2), as pure tensor functions.

Token indices count from the first real (non-padding) token of a sequence, 0-based; -1 marks a pad.
"""

from __future__ import annotations

import math

import torch

from dca.config import DCAConfig


def key_ids(token_index: torch.Tensor, config: DCAConfig) -> torch.Tensor:
    """pk[j] = j mod L. Pads (-1) map to 0; they are masked elsewhere."""
    return token_index.clamp(min=0) % config.chunk_len


def intra_query_ids(token_index: torch.Tensor, config: DCAConfig) -> torch.Tensor:
    """pq_intra[i] = i mod L, used against keys of the query's own chunk."""
    return token_index.clamp(min=0) % config.chunk_len


def successive_query_ids(token_index: torch.Tensor, config: DCAConfig) -> torch.Tensor:
    """pq_succ[i] = min(L + (i mod L), S), used against keys of the previous chunk."""
    return (config.chunk_len + token_index.clamp(min=0) % config.chunk_len).clamp(max=config.chunk_size)


def chunk_index(token_index: torch.Tensor, config: DCAConfig) -> torch.Tensor:
    return token_index.clamp(min=0) // config.chunk_len


def relation(query_index: torch.Tensor, key_index: torch.Tensor, config: DCAConfig) -> torch.Tensor:
    """Which query id a (query, key) pair uses: 0 intra, 1 successive, 2 inter, -1 masked.

    query_index (..., Tq) and key_index (..., Tk) broadcast to (..., Tq, Tk). Masked means the key
    is a pad, the query is a pad, or the key comes after the query.
    """
    qi = query_index[..., :, None]
    kj = key_index[..., None, :]
    gap = chunk_index(qi, config) - chunk_index(kj, config)
    rel = gap.clamp(max=2)
    visible = (kj >= 0) & (qi >= 0) & (kj <= qi)
    return torch.where(visible, rel, torch.full_like(rel, -1))


def temperature_factor(prompt_length: int, config: DCAConfig) -> float:
    """m^2 of spec section 5: the logit multiplier for a request whose prompt has n tokens."""
    if config.temperature_alpha == 0.0 or prompt_length <= config.pretraining_length:
        return 1.0
    m = 1.0 + config.temperature_alpha * math.log(prompt_length / config.pretraining_length)
    return m * m


def temperature_factors(prompt_lengths: torch.Tensor, config: DCAConfig) -> torch.Tensor:
    """`temperature_factor` of each element of a tensor of prompt lengths, computed where the tensor
    lives (float64): no value is read back from a GPU."""
    n = prompt_lengths.to(torch.float64)
    if config.temperature_alpha == 0.0:
        return torch.ones_like(n)
    m = 1.0 + config.temperature_alpha * torch.log(n / config.pretraining_length)
    return torch.where(n > config.pretraining_length, m * m, torch.ones_like(m))


def token_indices_from_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, K) 0/1 padding mask -> (B, K) token index of every slot, -1 for pads."""
    mask = padding_mask.to(torch.long)
    return torch.where(mask.bool(), mask.cumsum(-1) - 1, torch.full_like(mask, -1))

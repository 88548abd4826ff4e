"""A DCA decode step captured in a CUDA graph (one graph per batch size), as gpt-fast does.

    cache = StaticKVCache(max_tokens=prompt + new_tokens)
    logits = chunked_prefill(model, ids, cache, attention_mask=mask)      # eager, records row starts
    step = CapturedDecodeStep(model, cache)                               # warm-up + capture
    for _ in range(new_tokens):
        logits = step(next_ids)                                           # (B, V), one graph replay

Why it can be captured: on the Triton backend a decode step reads only device state that keeps
its address (the cache's buffers, its device-side length counter, per-row starts and softmax
scales recorded at the prefill) and launches kernels whose grids depend on shapes only; no value
is read back to the host. The host-side lengths (`get_seq_length`) are advanced here after each
replay. Captured steps take no attention mask: each row keeps the start recorded at its prefill.

Needs CUDA, the "triton" backend and a StaticKVCache with a fixed `max_tokens`.
"""

from __future__ import annotations

import torch

from dca.cache import StaticKVCache
from dca.state import cache_state


def set_cache_length(cache: StaticKVCache, length: int) -> None:
    """Moves a StaticKVCache's host and device lengths to `length` (tokens past it are ignored)."""
    for layer in cache.layers:
        layer.length = length
    state = cache_state(cache)
    state.length_host = length
    if state.length is not None:
        state.length.fill_(length)


class CapturedDecodeStep:
    """model(ids (B, 1), cache) -> last-position logits (B, V), replayed from a CUDA graph.

    The cache must already hold the prompt (so each row's start is recorded) and have room for
    `warmup` more tokens: the warm-up steps write there and are then forgotten (the lengths are
    rewound; later steps overwrite those slots).
    """

    def __init__(self, model, cache: StaticKVCache, warmup: int = 2):
        if not isinstance(cache, StaticKVCache) or cache.max_tokens is None:
            raise ValueError("CapturedDecodeStep needs a StaticKVCache with a fixed max_tokens")
        length = cache.get_seq_length()
        if length == 0:
            raise ValueError("prefill the cache first: the captured step continues it")
        if length + warmup + 1 > cache.max_tokens:
            raise ValueError(f"the cache holds {length} of {cache.max_tokens} tokens; the warm-up needs {warmup + 1} more")
        device = cache.layers[0].k.device
        batch = cache.layers[0].k.shape[0]
        self.model, self.cache = model, cache
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # Warm-up on a side stream (Triton compiles and autotunes here, outside the capture).
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup):
                self._forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        set_cache_length(cache, length)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = self._forward()
        # Capturing ran the host code (host lengths moved) but no kernel (device counter did not).
        set_cache_length(cache, length)

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Feeds ids (B, 1) and returns the logits (B, V): a static buffer, overwritten by the next call."""
        if self.cache.get_seq_length() + 1 > self.cache.max_tokens:
            raise ValueError(f"the cache is full ({self.cache.max_tokens} tokens)")
        self.ids.copy_(ids)
        self.graph.replay()
        for layer in self.cache.layers:
            layer.length += 1
        cache_state(self.cache).length_host += 1
        return self.logits

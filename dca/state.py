"""DCA's own bookkeeping for the KV caches it is given, in typed objects owned by `dca`.

Why not attributes on the cache objects: the caches are transformers' (DynamicCache) or the
caller's (the engine's duck-typed row caches); attributes set on them from outside are untyped,
invisible to their owners and easy to collide with. Instead each cache object maps, by identity
and weakly (the entry goes when the cache does), to one `CacheState`.

Two things stay readable on a cache because their owners put them there on purpose:
- `dca_prompt_length`: a caller may set it on its own cache class (the engine's row cache does)
  instead of calling `dca.set_prompt_length`; `prompt_length_of` reads both;
- a cache class of `dca` (StaticKVCache) holds its `CacheState` as a declared field,
  `dca_cache_state`, so that `copy.deepcopy` of the cache copies it (recorded row starts
  included). Other caches lose their DCA state when copied: set the prompt length of a copy
  again (the engine does) and pass the attention mask with its next forward.

Imports torch only.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class CacheState:
    """What the DCA layers keep about one cache object between forwards."""

    # n of the attention temperature (spec section 5), from `dca.set_prompt_length`: (1,) or (B,).
    prompt_length: torch.Tensor | None = None
    # The same n taken from the first forward that filled the cache, when none was set.
    auto_prompt_length: torch.Tensor | None = None
    # The length a growable in-place cache is expected to reach (the prompt, from chunked_prefill).
    capacity_hint: int | None = None
    # Triton path: an empty DynamicCache / Int8KVCache taken over with in-place layers
    # (None: not decided yet; decided at the cache's first DCA forward).
    adopted: bool | None = None
    # Triton path: (B,) int32 on the device, slot of each row's first real token, recorded when a
    # mask came, so that maskless decode steps (and a CUDA graph of one) keep each row's padding.
    row_start: torch.Tensor | None = None
    # Triton path: (1,) int32 on the device, slots filled (the next write position), and the host
    # length it was last set from (a crop or reset on the host is followed).
    length: torch.Tensor | None = None
    length_host: int = 0
    # (key, prompt tensor, (B,) softmax scales x m^2): the scales of the Triton path, per request.
    scale_memo: tuple | None = None
    # (prompt tensor, m^2): the temperature of packed decode rows, read from the host once.
    decode_temperature_memo: tuple | None = None


class _IdentityWeakMap:
    """object -> value by identity, dropping an entry when its object is collected.

    Why not weakref.WeakKeyDictionary: it keys by hash and equality, which a cache class may
    define by value (two empty caches would then share a state)."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, obj):
        entry = self._entries.get(id(obj))
        return entry[1] if entry is not None and entry[0]() is obj else None

    def set(self, obj, value) -> None:
        key = id(obj)
        entries = self._entries

        def drop(ref, key=key):
            current = entries.get(key)
            if current is not None and current[0] is ref:
                del entries[key]

        entries[key] = (weakref.ref(obj, drop), value)

    def __len__(self) -> int:
        return len(self._entries)


_STATES = _IdentityWeakMap()


def cache_state(cache) -> CacheState:
    """The `CacheState` of a cache object, created at first use."""
    own = getattr(cache, "dca_cache_state", None)
    if isinstance(own, CacheState):
        return own
    state = _STATES.get(cache)
    if state is None:
        state = CacheState()
        _STATES.set(cache, state)
    return state


def prompt_length_of(cache, state: CacheState | None = None) -> torch.Tensor | None:
    """n of the temperature for a cache: `set_prompt_length`, else the cache's own
    `dca_prompt_length` (its owner's), else what its first forward recorded; None if none yet."""
    state = state if state is not None else cache_state(cache)
    if state.prompt_length is not None:
        return state.prompt_length
    own = getattr(cache, "dca_prompt_length", None)
    if own is not None:
        return own
    return state.auto_prompt_length

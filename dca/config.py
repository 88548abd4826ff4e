"""DCA configuration: the three lengths of the spec (P, S, W), the temperature and the kernel backend."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

BACKENDS = ("auto", "torch", "flash", "triton")


@dataclass(frozen=True)
class DCAConfig:
    """Dual Chunk Attention settings (docs/dca.md, "The definition").

    `None` for `chunk_size` / `local_window` means the spec's defaults, resolved at construction:
    S = 3P/4 and W = P/8 (integer division), so `chunk_len` L = S - W = 5P/8.
    """

    # P: the context length the model was trained on (Llama-2: 4096). Every relative distance
    # DCA uses stays below it.
    pretraining_length: int
    # S: cap on query position ids and the largest relative distance ever used. 0 < S <= P.
    chunk_size: int | None = None
    # W: the first W+1 rows of a chunk see exact distances into the previous chunk. 0 < W < S.
    local_window: int | None = None
    # alpha of spec section 5: logits are scaled by m^2, m = 1 + alpha * ln(n / P) for prompt
    # length n > P. 0 turns it off.
    temperature_alpha: float = 0.0
    # "auto" | "torch" | "flash" | "triton". "auto" picks the Triton kernels on CUDA (fp16, bf16,
    # fp32) when triton is importable, else flash-attn on CUDA in fp16/bf16 when importable, else
    # "torch", which runs everywhere (and is what CPUs use). On CUDA a backend other than torch
    # first passes a start-up self-check (dca/selfcheck.py): "auto" falls back when it fails, a
    # named backend raises dca.BackendUnavailable. `dca.backend_report(model)` says what ran.
    # "triton" on CPU needs the interpreter (TRITON_INTERPRET=1 before dca.triton_kernels is
    # imported): slow, for tests.
    backend: str = "auto"

    def __post_init__(self) -> None:
        p = self.pretraining_length
        if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
            raise ValueError(f"pretraining_length must be a positive int, got {p!r}")
        s = self.chunk_size if self.chunk_size is not None else (3 * p) // 4
        w = self.local_window if self.local_window is not None else p // 8
        for name, value in (("chunk_size", s), ("local_window", w)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int or None, got {value!r}")
        if not 0 < s <= p:
            raise ValueError(
                f"chunk_size must satisfy 0 < chunk_size <= pretraining_length ({p}), got {s}: "
                "the largest distance DCA uses is chunk_size, and it must be one the model was trained on"
            )
        if not 0 < w < s:
            raise ValueError(f"local_window must satisfy 0 < local_window < chunk_size ({s}), got {w}")
        alpha = self.temperature_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"temperature_alpha must be a number >= 0 (0 = off), got {alpha!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        object.__setattr__(self, "chunk_size", s)
        object.__setattr__(self, "local_window", w)
        object.__setattr__(self, "temperature_alpha", float(alpha))

    @property
    def chunk_len(self) -> int:
        """L = S - W: keys repeat their position ids with this period."""
        return self.chunk_size - self.local_window

    @property
    def inter_query_id(self) -> int:
        """The constant query id used against keys two or more chunks back: min(2L - 1, S)."""
        return min(2 * self.chunk_len - 1, self.chunk_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DCAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DCAConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> DCAConfig:
        """Loads a JSON file holding the fields above (a `dca` key may wrap them)."""
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        return cls.from_dict(values.get("dca", values))

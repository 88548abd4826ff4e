"""What an evaluation runs: the variants (plain model, DCA settings) and the task grid.

`EvalConfig.quick()` and `EvalConfig.full()` are the two presets; `EvalConfig.from_file` loads JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

from pipeline.config.files import reject_unknown_fields
from pipeline.config.model import ModelSpec

TASKS = ("perplexity", "passkey")
FILLERS = ("book", "repeat")


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One model setting under evaluation: the plain model (dca=None) or DCA with given fields."""

    # Short label used in results and plots ("plain", "dca", "dca_alpha0.1").
    name: str
    # DCAConfig fields; None = plain model. pretraining_length defaults to the model's
    # max_position_embeddings.
    dca: dict | None = None
    # Evaluate this variant only at lengths <= max_length (None: all lengths).
    max_length: int | None = None
    # Evaluate this variant only at lengths <= the model's max_position_embeddings (the ablation
    # of a small pretraining_length is about lengths the model handles natively).
    native_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise ValueError(f"variant name must be letters, digits, '_', '.', '-', got {self.name!r}")
        if self.dca is not None and not isinstance(self.dca, dict):
            raise ValueError(f"variant {self.name}: dca must be None (plain) or a dict of DCAConfig fields")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length <= 0):
            raise ValueError(f"variant {self.name}: max_length must be a positive int or None")

    @classmethod
    def from_dict(cls, values: dict) -> Variant:
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What to evaluate. `quick()` and `full()` are the two presets; `from_file` loads JSON."""

    # The model to load (its `dca` field is ignored: variants say which DCA settings to use).
    model: ModelSpec = field(default_factory=lambda: ModelSpec(dca=None))
    # Model settings to compare, all on the same weights.
    variants: tuple[Variant, ...] = (Variant(name="plain"), Variant(name="dca", dca={}))
    # Sequence lengths in tokens (prompt length for passkey, window length for perplexity).
    lengths: tuple[int, ...] = (4096, 8192, 16384)
    # Tasks to run, in this order within each length.
    tasks: tuple[str, ...] = TASKS
    # Passkey: depth of the key as a fraction of the filler (0 = right after the instruction).
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    # Passkey: one random key (and book offset) per seed.
    seeds: tuple[int, ...] = (0, 1)
    # Passkey filler kinds: "book" (real text) and/or "repeat" (the classic repeated sentences).
    fillers: tuple[str, ...] = ("repeat", "book")
    # Passkey: new tokens generated greedily for the answer.
    answer_tokens: int = 12
    # Perplexity: windows per length; window w is taken from book w % len(books).
    windows: int = 2
    # Books (file names under data/texts/, or absolute paths) for perplexity windows and passkey
    # book filler.
    books: tuple[str, ...] = ("plrabn12.txt", "lcet10.txt", "alice29.txt")
    # Perplexity: tokens per slice of the lm_head + cross-entropy computation.
    loss_slice: int = 1024
    # Perplexity: mean loss is also recorded per bucket of this many positions (0: off).
    position_bucket: int = 1024
    # Reuse the plain (or an equal DCA) result where DCA provably gives the same numbers.
    skip_identical: bool = True
    # Perplexity in this process: the tokens where the plain model and every DCA variant compute
    # alike (DCA's first chunk_len tokens) run once, in the plain model's forward; the DCA
    # variants continue from its KV cache (evaluation.runners.shared_prefix_nll).
    share_prefix: bool = True
    # torch intra-op threads (None: torch's default).
    threads: int | None = None
    # "cpu", "cuda", or None (cuda if available).
    device: str | None = None

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("at least one variant is needed")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if not self.lengths or any(not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ValueError(f"lengths must be ints >= 64, got {self.lengths}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")
        bad = [f for f in self.fillers if f not in FILLERS]
        if bad:
            raise ValueError(f"fillers must be a subset of {FILLERS}, got {self.fillers}")
        if self.answer_tokens < 1 or self.windows < 0 or self.loss_slice < 1 or self.position_bucket < 0:
            raise ValueError("answer_tokens and loss_slice must be >= 1, windows and position_bucket >= 0")
        if not self.books:
            raise ValueError("at least one book is needed")

    @classmethod
    def quick(cls, **overrides) -> EvalConfig:
        """Under 10 minutes on 2 CPU cores with SmolLM2-135M: one sample per cell, 4k and 12k."""
        values = dict(lengths=(4096, 12288), depths=(0.5,), seeds=(0,), fillers=("repeat",), windows=1)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def full(cls, **overrides) -> EvalConfig:
        """Half to twice SmolLM2's training length, two alphas, and the pretraining_length ablation."""
        values = dict(
            variants=(
                Variant(name="plain"),
                Variant(name="dca", dca={"temperature_alpha": 0.0}),
                Variant(name="dca_alpha0.1", dca={"temperature_alpha": 0.1}),
                Variant(name="dca_p2048", dca={"pretraining_length": 2048}, native_only=True),
            ),
            lengths=(4096, 8192, 16384),
        )
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> EvalConfig:
        values = dict(values)
        reject_unknown_fields(cls, values)
        if "model" in values and isinstance(values["model"], dict):
            values["model"] = ModelSpec.from_dict(values["model"])
        if "variants" in values:
            values["variants"] = tuple(v if isinstance(v, Variant) else Variant.from_dict(v) for v in values["variants"])
        for key in ("lengths", "tasks", "depths", "seeds", "fillers", "books"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> EvalConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

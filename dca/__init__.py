"""Dual Chunk Attention (arXiv 2402.17463) for transformers Llama-layout models.

    from dca import DCAConfig, apply_dca
    apply_dca(model, DCAConfig(pretraining_length=4096))
"""

from dca.config import DCAConfig
from dca.hf import SUPPORTED_MODEL_TYPES, apply_dca, dca_config_of, set_prompt_length

__all__ = ["DCAConfig", "apply_dca", "dca_config_of", "set_prompt_length", "SUPPORTED_MODEL_TYPES"]

"""Dual Chunk Attention (arXiv 2402.17463) for transformers Llama-layout models.

    from dca import DCAConfig, apply_dca
    apply_dca(model, DCAConfig(pretraining_length=4096))

`DCAConfig` is plain Python; the rest (torch, the transformers glue) loads on first use, so a
driver that only validates settings never imports torch.
"""

from dca.config import DCAConfig

_LAZY = {"apply_dca": "dca.hf", "dca_config_of": "dca.hf", "set_prompt_length": "dca.hf",
         "SUPPORTED_MODEL_TYPES": "dca.hf", "backend_report": "dca.hf", "backend_reports": "dca.hf",
         "prepare_backend": "dca.hf", "BackendReport": "dca.backends", "BackendUnavailable": "dca.backends"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dca' has no attribute {name!r}")


__all__ = ["DCAConfig", "apply_dca", "dca_config_of", "set_prompt_length", "SUPPORTED_MODEL_TYPES", "backend_report",
           "backend_reports", "prepare_backend", "BackendReport", "BackendUnavailable"]

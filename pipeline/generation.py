"""Moved to `pipeline.engine.generation` (the engine's rank-side generation); kept importable here."""

from pipeline.engine.generation import (
    CPU_MEMORY_KIND,
    CUDA_MEMORY_KIND,
    RankContext,
    RankOutOfMemory,
    generate_batch,
)

__all__ = ["CPU_MEMORY_KIND", "CUDA_MEMORY_KIND", "RankContext", "RankOutOfMemory", "generate_batch"]

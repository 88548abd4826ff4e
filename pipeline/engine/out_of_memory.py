"""Out of memory, one rule: how a rank recognises it and frees what it held, and the one answer a
request gets when it ran alone and still did not fit (an `out_of_memory` result per suffix).

The answer is built here for every place that gives it: the static path on a rank of tp_size 1
(pipeline.engine.generation), the continuous batch in process (pipeline.engine.continuous) and the
pool for a replica (pipeline.engine.pool). torch is imported inside the functions that need it, so
the driver imports this module without it.
"""

from __future__ import annotations

import gc

from pipeline.engine.requests import OUT_OF_MEMORY, GenerationRequest, GenerationResult

# What a user can do about a request that does not fit even alone.
OUT_OF_MEMORY_ADVICE = "lower max_input_tokens or max_new_tokens, or use more tensor-parallel ranks"


def is_out_of_memory(error: BaseException) -> bool:
    """torch's (or the allocator's, or the OS's) out-of-memory error, on any device."""
    import torch

    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def describe_out_of_memory(error: BaseException) -> str:
    """`Type: first line of the message` of an out-of-memory error (the allocator's own words)."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def free_memory(device) -> None:
    """Frees what the failed forward left behind on `device` (a torch.device)."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def out_of_memory_message(request: GenerationRequest, where: str, cause: str) -> str:
    """The error message of a request that ran alone and ran out of memory: its prompt length,
    where it ran, what the allocator said (`cause`, with its own punctuation), and the advice."""
    return f"out of memory for a {request.prompt_tokens}-token prompt on {where}{cause}; {OUT_OF_MEMORY_ADVICE}"


def out_of_memory_results(request: GenerationRequest, where: str, cause: str) -> list[GenerationResult]:
    """The out_of_memory answer of a request that ran alone: one error result per suffix."""
    return GenerationResult.errors_for(request, OUT_OF_MEMORY, out_of_memory_message(request, where, cause))

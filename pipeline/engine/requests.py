"""What the data plane sends to the engine and what comes back, and the error types a result can
carry. Plain data, no heavy imports (the sampling settings are `pipeline.config.task.SamplingParams`).

The driver tokenizes and renders prompts (it owns templates and truncation); the engine receives
token ids. A request is one document: a shared prefix (instructions + document) and one or more
suffixes (one per question; a single empty suffix for summarisation). The engine prefills the
prefix once and reuses its KV cache for every suffix, and returns one result per suffix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.task import SamplingParams

# error_type values a result can carry.
PROMPT_TOO_LONG = "prompt_too_long"
OUT_OF_MEMORY = "out_of_memory"
WONT_FIT = "wont_fit"  # the memory planner predicts it cannot fit (never started)
REPLICA_FAILED = "replica_failed"  # retries on other replicas ran out
INVALID_INPUT = "invalid_input"
INTERNAL = "internal_error"


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    request_id: str
    prefix_ids: list[int]
    # One entry per output row; [[]] means "generate right after the prefix".
    suffix_ids: list[list[int]] = field(default_factory=lambda: [[]])
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the longest prompt of this request (prefix + longest suffix)."""
        return len(self.prefix_ids) + max((len(s) for s in self.suffix_ids), default=0)


@dataclass(kw_only=True)
class GenerationResult:
    request_id: str
    suffix_index: int = 0
    status: str = "ok"  # "ok" | "error"
    output: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    # This row's own times on rank 0: from the request's start on the replica (admission into
    # the running batch) to this row's first token, and from there to its last token.
    prefill_s: float | None = None
    decode_s: float | None = None
    # Device time attributed to this row (pipeline.engine.metering: each forward's busy time
    # split between its rows by tokens), max over ranks: CUDA events on GPU; None on CPU (never a
    # CPU figure labelled GPU: device_time_s has it there).
    gpu_time_s: float | None = None
    # The same figure on any device, and how it was measured: "cuda_event" or "cpu_wall".
    device_time_s: float | None = None
    device_time_kind: str | None = None
    # Wall clock of the request on rank 0: prefill_s + decode_s.
    wall_time_s: float | None = None
    # Max over ranks; what it measures is in memory_kind.
    peak_memory_bytes: int | None = None
    # "cuda_max_allocated" (allocator peak during this row's forwards) or "cpu_peak_rss"
    # (process RSS during them): the rank's memory, shared with the other rows of those forwards.
    memory_kind: str | None = None
    peak_memory_per_rank: list[int] = field(default_factory=list)
    # Device time attributed to this row summed over ranks (GPU-seconds on CUDA, CPU wall-seconds
    # on CPU): summed over all rows, it is the engine's busy time over all ranks.
    device_seconds_all_ranks: float | None = None
    replica: str | None = None
    attempts: int = 1
    # The generated token ids (eos excluded; tokens after a stop string included).
    output_ids: list[int] = field(default_factory=list)
    # Sum of their log-probabilities under the model's own distribution (before the repetition
    # guard and sampling settings), as vLLM's cumulative_logprob; None when nothing reported it.
    cumulative_logprob: float | None = None
    # Requests with several suffixes: seconds from the request's start to the end of the one
    # prefix prefill they all share. None for single-suffix requests.
    prefix_prefill_s: float | None = None
    # Seconds between submission to the engine and the start on a replica (last attempt).
    queued_s: float | None = None
    # Times this request was taken out of a running batch to run again (out of memory).
    preemptions: int = 0
    # The attention backend of the replica that answered (pipeline.engine.attention_record: what
    # its ranks chose at start-up, with the reason for a fallback); None when no replica did.
    attention_backend: str | None = None
    attention_backend_fallback: str | None = None

    @property
    def mean_logprob(self) -> float | None:
        """The model's confidence in the output: mean log-probability per output token (None
        without output tokens or a reported sum)."""
        if self.cumulative_logprob is None or not self.output_ids:
            return None
        return self.cumulative_logprob / len(self.output_ids)

    @classmethod
    def error(cls, request_id: str, suffix_index: int, error_type: str, message: str, **kw) -> GenerationResult:
        return cls(
            request_id=request_id, suffix_index=suffix_index, status="error",
            error_type=error_type, error_message=message, **kw,
        )

    @classmethod
    def errors_for(cls, request, error_type: str, message: str, **kw) -> list[GenerationResult]:
        """The same error for every suffix of `request`, each with its own prompt_tokens (prefix +
        suffix). `request` may be anything submitted in place of a GenerationRequest: its id is
        then "?" and it has one row."""
        suffixes = getattr(request, "suffix_ids", None) or [[]]
        prefix = len(getattr(request, "prefix_ids", []) or [])
        return [cls.error(getattr(request, "request_id", "?"), i, error_type, message, prompt_tokens=prefix + len(s),
                          **kw) for i, s in enumerate(suffixes)]

"""What ranks and the driver send each other (picklable, pure Python: no torch on the driver).

A continuous-batching call (`RankWorker.step`) takes the requests to admit and the ones to drop,
runs steps of the running batch, and answers with a `StepResult`: the rows that finished, and
the rank's `MeterReport` (busy time and per-row attributions since the previous call).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.engine.metering import MeterReport
from pipeline.engine.requests import GenerationResult


@dataclass(frozen=True)
class OutOfMemoryAnswer:
    """A rank's answer to a batch or step that ran out of memory on it (memory freed, nothing
    retried: with tp_size > 1 its peers may be waiting in a collective; the pool decides).
    `report`: what the rank measured in that call before (continuous batching), or None."""

    rank: int
    message: str
    report: MeterReport | None = None


@dataclass
class FinishedRow:
    """One output row that ended in a call (rank 0's view carries the tokens and text)."""

    seq: int
    suffix_index: int
    request_id: str
    prompt_tokens: int
    output_ids: list[int] = field(default_factory=list)
    output: str | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    wall_time_s: float = 0.0
    prefix_prefill_s: float | None = None
    cumulative_logprob: float | None = None


@dataclass
class StepResult:
    """One rank's answer to `RankWorker.step`."""

    rank: int
    finished: list[FinishedRow]
    report: MeterReport
    # Rows in the running batch after the call, and steps (packed forwards) the call ran.
    rows: int = 0
    steps: int = 0


def result_of(row: FinishedRow) -> GenerationResult:
    """The GenerationResult of a finished row, without device metrics (the ledger adds them)."""
    return GenerationResult(
        request_id=row.request_id, suffix_index=row.suffix_index, output=row.output,
        output_ids=list(row.output_ids), cumulative_logprob=row.cumulative_logprob,
        prompt_tokens=row.prompt_tokens, output_tokens=len(row.output_ids),
        prefill_s=row.prefill_s, decode_s=row.decode_s, wall_time_s=row.wall_time_s,
        prefix_prefill_s=row.prefix_prefill_s,
    )

"""What a job's dataflow works with, set up by pipeline.job before any model work."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config.job import JobConfig
from pipeline.data.input import Document, InputPlan
from pipeline.data.long_documents import LongDocumentPrompts
from pipeline.data.prompts import PromptBuilder
from pipeline.data.writer import OutputWriter
from pipeline.metrics.job import JobMetrics
from pipeline.runtime.stops import StopSignals


@dataclass
class JobRun:
    """One run of a job: its settings, its checked input, its prompt builder, its output (opened:
    resumed or fresh), its metrics, the columns every row shares (`base`), the documents to leave
    out (`skip`, nightly: already summarised), its stop signals and, under the hierarchical
    policy, the prompts of documents answered in sections."""

    config: JobConfig
    plan: InputPlan
    builder: PromptBuilder
    writer: OutputWriter
    metrics: JobMetrics
    base: dict
    skip: Callable[[Document], bool] | None
    stopper: StopSignals
    # The section and combine prompts of the hierarchical policy (truncation="hierarchical"), else None.
    long_prompts: LongDocumentPrompts | None = None

"""The jobs' default dataflow (`--dataflow driver`): this process reads every document, builds its
prompt, sends the requests through one ReplicaPool and commits every part.

Scheduling: documents are read as a stream; each window of `schedule_window` prompts is sent
longest first (long documents do not trail at the end of the job), and at most `max_in_flight`
requests are inside the engine at any time (backpressure: the reader waits for the engine). The
engine batches short prompts together inside a replica.

Documents over the budget under the hierarchical policy (pipeline.data.long_documents) are several
calls: their sections go into the window like any request, and the calls their results make
possible (combinations) are sent before the next documents' requests; the document's rows are
committed when its last call is answered.

Exactly once: a document's rows are committed together by the output writer; a rerun skips
committed documents. The engine retries requests of a failed replica on another one and returns
one result list per request; a second answer for the same request is dropped (InFlight).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator

from pipeline.config.job import JobConfig
from pipeline.data.input import Document, iter_documents
from pipeline.data.long_documents import requests_with_follow_ups
from pipeline.data.rows import InFlight, PendingDocument, prepare_document, result_rows, split_rows
from pipeline.dataflows.budget import FailureBudget
from pipeline.dataflows.context import JobRun
from pipeline.engine.requests import GenerationRequest, GenerationResult
from pipeline.metrics.live import LiveMetrics
from pipeline.runtime.pool import start_pool
from pipeline.runtime.progress import progress_bar

log = logging.getLogger("pipeline.job")


class DriverDataflow:
    """One run of a job through the driver dataflow: start() the engine, run() the documents, then
    engine_stats() and shutdown(). `pool_factory(config)`: a stand-in for the engine (tests,
    benchmarks); then the job needs no Ray."""

    def __init__(self, job: JobRun, *, pool_factory: Callable[[JobConfig], object] | None = None) -> None:
        self.job = job
        self.config = job.config
        self.pool_factory = pool_factory
        self.pool = None
        self.progress = None
        self.in_flight = InFlight()
        self.lock = threading.Lock()
        self.stop_reason: str | None = None
        self.budget = FailureBudget(job.config)
        self.sampling = job.config.sampling()
        self.live = LiveMetrics(run=job.metrics.job_id)
        # Rows an earlier run committed, when this dataflow counts them itself (None: the writer's count).
        self.resumed_rows: int | None = None
        # Split documents (hierarchical policy): calls their answers made possible, not yet sent,
        # and the documents with calls outstanding.
        self.follow_ups: list[GenerationRequest] = []
        self.open_splits = 0

    @property
    def needs_ray(self) -> bool:
        return self.pool_factory is None

    def start(self, config: JobConfig) -> None:
        """Starts the engine for `config` (the job's, with the cluster's CPUs per rank filled in)."""
        self.config = config
        self.pool = self.pool_factory(config) if self.pool_factory is not None else start_pool(config)

    def run(self) -> tuple[str | None, dict | None]:
        """Every document through the engine. -> (None when all are committed, else why the job
        stops; engine stats, read at the end by engine_stats())."""
        job = self.job
        self.progress = progress_bar(self.config, max(job.plan.num_rows - len(job.writer.committed), 0))
        source = requests_with_follow_ups(self.requests(iter_documents(job.plan)), self.follow_ups,
                                          lambda: self.open_splits > 0 and not self.stop_reason)
        for results in self.pool.run(source, self.config.in_flight):
            self.on_results(results)
            if self.stop_reason:
                break
        if self.stop_reason:
            return self.stop_reason, None
        if len(self.in_flight):
            return f"the engine finished without answering {len(self.in_flight)} request(s)", None
        return None, None

    def engine_stats(self, stats: dict | None) -> dict | None:
        """At the end of the run (whatever happened): closes the progress bar and reads the pool's
        stats (best effort)."""
        if self.progress is not None:
            self.progress.close()
        if self.pool is None:
            return stats
        try:
            return self.pool.stats()
        except Exception as e:  # stats are best effort when the pool is broken
            return {"error": str(e)}

    def shutdown(self) -> None:
        if self.pool is not None:
            try:
                self.pool.shutdown()
            except Exception:
                log.exception("pool shutdown failed")

    # -- rows

    def emit(self, rows: list[dict], results: list[GenerationResult] | None = None, prompt_tokens: int = 0) -> None:
        """All rows of one document: committed, counted and budgeted as one step (a stop signal
        waits for its end, so a document is never half counted or half committed)."""
        job = self.job
        with self.lock, job.stopper.critical():
            job.writer.add_document(rows)
            job.metrics.add_document(rows, results, prompt_tokens)
            self.live.document(rows)
            self.budget.add(rows)
            self._update_progress()
            if self.stop_reason is None:
                self.stop_reason = self.budget.stop_reason(job.metrics.error_types, job.metrics.first_errors)

    def _update_progress(self) -> None:
        if self.progress is None:
            return
        metrics = self.job.metrics
        self.progress.update(1)
        wall = max(metrics.serving_s, 1e-9)
        self.progress.set_postfix(
            ok=metrics.documents_ok, err=metrics.documents_error,
            tok_s=f"{(metrics.prompt_tokens + metrics.output_tokens) / wall:.0f}",
            out_tok_s=f"{metrics.output_tokens / wall:.1f}", refresh=False,
        )

    # -- requests

    def requests(self, documents: Iterable[Document]) -> Iterator[GenerationRequest]:
        """Prompts in windows, longest first; error rows go straight to the writer."""
        job = self.job
        committed = job.writer.committed
        window: list[tuple[GenerationRequest, PendingDocument]] = []
        for doc in documents:
            if self.stop_reason:
                return
            if committed is not None and committed.is_committed(doc.key):
                job.metrics.documents_resumed += 1  # not in the progress total
                continue
            if job.skip is not None and job.skip(doc):
                job.metrics.documents_skipped += 1
                if self.progress is not None:
                    self.progress.update(1)
                continue
            self.budget.documents_read += 1
            prepared = prepare_document(doc, task=self.config.task, builder=job.builder, base=job.base,
                                        sampling=self.sampling, long_prompts=job.long_prompts)
            if prepared.request is not None:
                window.append((prepared.request, prepared.pending))
            elif prepared.pending is not None:  # split into sections: each a request of the window
                self.open_splits += 1
                window += [(request, prepared.pending) for request in prepared.pending.split.start(job.long_prompts)]
            else:
                self.emit(prepared.rows)
                continue
            if len(window) >= self.config.window:
                yield from self._release(window)
                window = []
        yield from self._release(window)

    def _release(self, window) -> Iterator[GenerationRequest]:
        window.sort(key=lambda item: item[0].prompt_tokens, reverse=True)
        for request, pending in window:
            if self.stop_reason:
                return
            self.in_flight.add(request.request_id, pending)
            self.live.queued(1)
            yield request

    # -- results

    def on_results(self, results: list[GenerationResult]) -> None:
        pending = self.in_flight.answer(results)
        if pending is None:
            return
        self.live.answered(results)
        split = pending.split
        if split is None:
            rows = result_rows(pending, results, base=self.job.base, builder=self.job.builder)
            self.emit(rows, results, pending.prompt_tokens_sent)
            return
        follow = split.on_results(results[0].request_id, results, self.job.long_prompts)
        for request in follow:
            self.in_flight.add(request.request_id, pending)
        self.live.queued(len(follow))
        self.follow_ups.extend(follow)
        if split.finished:
            self.open_splits -= 1
            self.emit(split_rows(pending, base=self.job.base), split.results, split.tokens_sent)

"""Live metrics of a running job or processor, through `ray.util.metrics`: Ray exports them on
each node's Prometheus endpoint and the dashboard shows them (Metrics tab, with Grafana).

| name | kind | tags | what |
| --- | --- | --- | --- |
| `dca_documents_total` | counter | `run`, `status` (ok, error) | documents decided (all rows of a document) |
| `dca_rows_total` | counter | `run`, `status` | output rows (one per document and question) |
| `dca_prompt_tokens_total` | counter | `run`, `replica` | prompt tokens the engine answered |
| `dca_output_tokens_total` | counter | `run`, `replica` | generated tokens |
| `dca_output_tokens_per_second` | gauge | `run`, `replica` | output tokens / second over the last engine call |
| `dca_device_seconds_total` | counter | `run`, `replica`, `kind` (gpu, cpu) | device busy time summed over ranks |
| `dca_peak_memory_bytes` | gauge | `run`, `replica` | peak memory of the last request, max over ranks |
| `dca_queue_depth` | gauge | `run`, `replica` | requests handed to the engine and not answered yet |

`run` is the job's id (`summarize-<fingerprint>`, the nightly's submission id) or the processor's
run id (`Processor.run_id`), so runs sharing a cluster, or one process running several jobs, stay
apart on a dashboard. All counters start at 0 in each process and Prometheus sums them over
processes. Recording is best effort: outside a Ray worker or driver the calls do nothing.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class LiveMetrics:
    def __init__(self, run: str, replica: str = "driver") -> None:
        self.run = run
        self.replica = replica
        self._pending = 0
        try:
            from ray.util.metrics import Counter, Gauge

            self._documents = Counter("dca_documents_total", "documents decided", tag_keys=("run", "status"))
            self._rows = Counter("dca_rows_total", "output rows written", tag_keys=("run", "status"))
            self._prompt = Counter("dca_prompt_tokens_total", "prompt tokens answered", tag_keys=("run", "replica"))
            self._output = Counter("dca_output_tokens_total", "tokens generated", tag_keys=("run", "replica"))
            self._rate = Gauge("dca_output_tokens_per_second", "output tokens per second of the last engine call",
                               tag_keys=("run", "replica"))
            self._device = Counter("dca_device_seconds_total", "device busy seconds summed over ranks",
                                   tag_keys=("run", "replica", "kind"))
            self._peak = Gauge("dca_peak_memory_bytes", "peak memory of the last request, max over ranks",
                               tag_keys=("run", "replica"))
            self._queue = Gauge("dca_queue_depth", "requests inside the engine", tag_keys=("run", "replica"))
            self.enabled = True
        except Exception as error:  # noqa: BLE001 - metrics must never stop the work
            log.debug("live metrics off: %s", error)
            self.enabled = False

    def _tags(self) -> dict[str, str]:
        return {"run": self.run, "replica": self.replica}

    def _safe(self, fn, *args, **kw) -> None:
        if not self.enabled:
            return
        try:
            fn(*args, **kw)
        except Exception as error:  # noqa: BLE001
            log.debug("live metric not recorded: %s", error)

    def queued(self, n: int) -> None:
        self._pending += n
        self._safe(self._queue.set, self._pending, tags=self._tags())

    def answered(self, results) -> None:
        """One request's results (one per suffix)."""
        self._pending = max(0, self._pending - 1)
        tags = self._tags()
        self._safe(self._queue.set, self._pending, tags=tags)
        for result in results:
            if result.prompt_tokens:
                self._safe(self._prompt.inc, result.prompt_tokens, tags=tags)
            if result.output_tokens:
                self._safe(self._output.inc, result.output_tokens, tags=tags)
            if result.device_seconds_all_ranks:
                kind = "gpu" if (result.memory_kind or "").startswith("cuda") else "cpu"
                self._safe(self._device.inc, result.device_seconds_all_ranks, tags={**tags, "kind": kind})
            if result.peak_memory_bytes is not None:
                self._safe(self._peak.set, result.peak_memory_bytes, tags=tags)

    def throughput(self, output_tokens: int, seconds: float) -> None:
        """Output tokens of one engine call over its wall time."""
        if seconds > 0:
            self._safe(self._rate.set, output_tokens / seconds, tags=self._tags())

    def document(self, rows: list[dict]) -> None:
        """All output rows of one document."""
        for row in rows:
            self._safe(self._rows.inc, 1, tags={"run": self.run, "status": row["status"]})
        status = "ok" if all(row["status"] == "ok" for row in rows) else "error"
        self._safe(self._documents.inc, 1, tags={"run": self.run, "status": status})

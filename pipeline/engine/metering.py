"""Device time and memory, one rule for every path of the engine.

The rule (docs/jobs.md "Metrics"):

- On every rank, the busy time of every model forward is measured: CUDA events recorded on the
  stream before and after it (`time_kind` "cuda_event"), or on CPU the wall clock around it
  ("cpu_wall"; CPU kernels run synchronously, so that is the time the forward held the rank).
  Token choice, broadcasts, KV copies and host bookkeeping between forwards are not forwards and
  are not counted; the warm-up forward at load time is not either.
- Each forward's time is split between the rows in it in proportion to the tokens each
  contributed (its prompt block, or its one decode token). A shared QA prefix belongs to all the
  rows of its document: its tokens are split evenly between them. Padding is nobody's token: in
  a left-padded batch (static scheduler) the pad positions' cost is carried by the real tokens.
- A request's device time on a rank is the sum of its rows' shares; `gpu_time_s` is the max over
  ranks on CUDA (None on CPU, where `device_time_s` carries the CPU figure with its kind) and
  `device_seconds_all_ranks` the sum over ranks. So the sum over requests of
  `device_seconds_all_ranks` equals the sum over ranks of busy time, and busy time can never
  exceed ranks x serving wall clock (forwards on one rank do not overlap).
- Peak memory of a request: the largest peak of the rank's memory during the forwards it took
  part in (prefill, QA prefix included, and decode), max over ranks. It is the rank's memory,
  shared with the other rows of those forwards: the allocator peak on CUDA
  (`cuda_max_allocated`, reset before every forward), the process's peak RSS on CPU
  (`cpu_peak_rss`, VmHWM reset before every forward).

`ForwardMeter` measures on a rank (torch imported lazily); `Ledger` is the driver-side sum over
calls and ranks (pure Python).
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

CUDA_MEMORY_KIND = "cuda_max_allocated"
CPU_MEMORY_KIND = "cpu_peak_rss"
CUDA_TIME_KIND = "cuda_event"
CPU_TIME_KIND = "cpu_wall"


def _read_vm_hwm() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _reset_vm_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets the peak resident set size (Linux >= 4.0)
    except OSError:
        pass  # then the peak covers the process's life so far; still an upper bound


@dataclass
class MeterReport:
    """What one rank measured since the last `collect`: picklable, sent to the driver."""

    time_kind: str
    memory_kind: str
    # Sum of the forwards' times.
    busy_s: float = 0.0
    forwards: int = 0
    # Tokens fed to the model (real ones: prompt blocks and decode tokens).
    tokens: int = 0
    # Row key -> seconds attributed to it; row key -> peak bytes of the forwards it was in.
    seconds: dict = field(default_factory=dict)
    peaks: dict = field(default_factory=dict)


class ForwardMeter:
    """Times the forwards of one rank and attributes each to its rows by tokens (see module doc).

        meter = ForwardMeter(device)
        with meter.forward({row_a: 512, row_b: 1}):   # tokens each row contributes
            logits = model(...)
        report = meter.collect()                      # resolves CUDA events (one synchronize)

    A forward that raises is not recorded (neither its time nor its shares): the two sums stay
    equal."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.time_kind = CUDA_TIME_KIND if self.cuda else CPU_TIME_KIND
        self.memory_kind = CUDA_MEMORY_KIND if self.cuda else CPU_MEMORY_KIND
        # (start event or None, end event or elapsed seconds, shares, peak bytes)
        self._pending: list[tuple] = []

    @contextmanager
    def forward(self, shares: dict):
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            _reset_vm_hwm()
            start = time.perf_counter()
        yield
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            # The caching allocator counts on the host: no synchronisation needed.
            peak = int(torch.cuda.max_memory_allocated(self.device))
            self._pending.append((start, end, dict(shares), peak))
        else:
            elapsed = time.perf_counter() - start
            self._pending.append((None, elapsed, dict(shares), _read_vm_hwm()))

    def collect(self) -> MeterReport:
        """Everything measured since the last call, attributed; clears the pending forwards."""
        report = MeterReport(time_kind=self.time_kind, memory_kind=self.memory_kind)
        if self.cuda and self._pending:
            import torch

            torch.cuda.synchronize(self.device)
        for start, end, shares, peak in self._pending:
            seconds = start.elapsed_time(end) / 1e3 if start is not None else end
            total = sum(shares.values())
            report.busy_s += seconds
            report.forwards += 1
            report.tokens += int(round(total))
            for key, tokens in shares.items():
                part = seconds * tokens / total if total > 0 else seconds / len(shares)
                report.seconds[key] = report.seconds.get(key, 0.0) + part
                if peak is not None:
                    report.peaks[key] = max(report.peaks.get(key, 0), peak)
        self._pending.clear()
        return report


@dataclass
class RowMetrics:
    """One row's device time and peak memory, per rank, summed over calls (driver side)."""

    seconds: list = field(default_factory=list)  # per rank
    peaks: list = field(default_factory=list)  # per rank (None: not measured)


class Ledger:
    """Driver side: per request (by sequence number) and suffix, device seconds and peaks per
    rank, added up over every call of every attempt; per rank, busy seconds."""

    def __init__(self, ranks: int):
        self.ranks = ranks
        self.rows: dict = {}  # (seq, suffix_index) -> RowMetrics
        self.busy_s = [0.0] * ranks
        self.forwards = 0
        self.tokens = 0
        self.time_kind: str | None = None
        self.memory_kind: str | None = None

    def add(self, rank: int, report: MeterReport) -> None:
        self.busy_s[rank] += report.busy_s
        if rank == 0:
            self.forwards += report.forwards
            self.tokens += report.tokens
        self.time_kind, self.memory_kind = report.time_kind, report.memory_kind
        for key, seconds in report.seconds.items():
            self._row(key).seconds[rank] += seconds
        for key, peak in report.peaks.items():
            row = self._row(key)
            row.peaks[rank] = peak if row.peaks[rank] is None else max(row.peaks[rank], peak)

    def _row(self, key) -> RowMetrics:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = RowMetrics([0.0] * self.ranks, [None] * self.ranks)
        return row

    def pop(self, seq: int, suffixes: int) -> list[RowMetrics]:
        """The rows of a finished request (removed from the ledger); zeros for unmeasured rows."""
        return [self.rows.pop((seq, i), None) or RowMetrics([0.0] * self.ranks, [None] * self.ranks)
                for i in range(suffixes)]

    def apply(self, result, row: RowMetrics) -> None:
        """Fills a GenerationResult's device metrics from its row (the rule in the module doc)."""
        result.device_time_s = max(row.seconds) if row.seconds else None
        result.device_time_kind = self.time_kind
        result.device_seconds_all_ranks = sum(row.seconds) if row.seconds else None
        result.gpu_time_s = result.device_time_s if self.time_kind == CUDA_TIME_KIND else None
        peaks = [p for p in row.peaks if p is not None]
        result.peak_memory_per_rank = peaks
        result.peak_memory_bytes = max(peaks, default=None)
        result.memory_kind = self.memory_kind

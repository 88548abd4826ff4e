"""Per-job metrics: totals, latency by prompt-length bucket, device time, peak memory per rank,
and a plot, for the whole job across resumes.

Written next to the output as `_metrics.json` and `_metrics.png` (names starting with `_` so
pyarrow.dataset readers of the output skip them). Figures come from the engine's per-request
measurements, under the engine's one rule for device time (`pipeline.engine.metering`, docs/jobs.md
"Metrics"): on CPU the device time is CPU wall time of the forwards, labelled `cpu`, never `gpu`.

A resumed run does not overwrite the earlier runs' figures: `summary()` is this run's summary
plus `job`, the whole job (sums over every run's own summary, latency buckets over every
committed row), and `runs`, each run's summary; the plot draws every committed row. Earlier runs
are read back from the earlier `_metrics.json` and the committed output.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, defaultdict

from pipeline.engine.attention_record import engine_record_of_stats

# Prompt-length buckets (upper bounds, tokens): powers of two from 1k to 128k, then everything above.
BUCKET_BOUNDS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def bucket_of(prompt_tokens: int) -> str:
    lo = 0
    for hi in BUCKET_BOUNDS:
        if prompt_tokens < hi:
            return f"{_k(lo)}-{_k(hi)}"
        lo = hi
    return f">={_k(lo)}"


def _k(n: int) -> str:
    return f"{n // 1024}k" if n else "0"


def _engine_busy(stats: dict | None) -> tuple[float | None, int | None]:
    """(busy seconds summed over every rank of every replica, ranks) from ReplicaPool.stats()."""
    if not isinstance(stats, dict):
        return None, None
    per_rank = [r.get("busy_s_per_rank") for r in stats.values() if isinstance(r, dict)]
    if not per_rank or any(p is None for p in per_rank):
        return None, None
    return float(sum(sum(p) for p in per_rank)), sum(len(p) for p in per_rank)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class JobMetrics:
    """Accumulates one run's measurements (the rows this run wrote, not rows resumed from disk);
    `resume` adds what earlier runs of the same job recorded, for the whole-job summary."""

    def __init__(self, *, job_id: str, task: str, config: dict, total_input_rows: int) -> None:
        self.job_id = job_id
        self.task = task
        self.config = config
        self.total_input_rows = total_input_rows
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self._serving_t0: float | None = None  # set when the replicas are up
        self.documents_ok = 0
        self.documents_error = 0
        self.documents_skipped = 0  # unchanged since an earlier run (nightly)
        self.documents_resumed = 0  # already committed in this output by an earlier run
        self.rows_ok = 0
        self.rows_error = 0
        self.error_types: Counter = Counter()
        self.first_errors: dict[str, str] = {}
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.truncated_tokens = 0
        self.documents_truncated = 0
        # Documents answered in sections (truncation hierarchical), and engine calls made (one per
        # request: a document answered in one prompt is one call).
        self.documents_split = 0
        self.engine_calls = 0
        self.device_seconds = 0.0
        self.gpu_seconds = 0.0
        self.device_kinds: set[str] = set()
        self.time_kinds: set[str] = set()
        # Earlier runs of this job (their own summaries), and the committed rows they wrote.
        self.previous_runs: list[dict] = []
        self.previous_points: list[tuple] = []
        self.runs_without_metrics = 0
        self.peak_memory_per_rank: dict[str, int] = {}
        self.memory_kinds: set[str] = set()
        # One per output row: (prompt tokens, latency, prefill, peak memory, device-seconds).
        self.points: list[tuple[int, float, float | None, int | None, float | None]] = []

    @property
    def wall_s(self) -> float:
        return time.monotonic() - self._t0

    def mark_serving(self) -> None:
        """The engine is up: tokens/s count from here (startup is reported separately)."""
        self._serving_t0 = time.monotonic()

    @property
    def startup_s(self) -> float | None:
        return None if self._serving_t0 is None else self._serving_t0 - self._t0

    @property
    def serving_s(self) -> float:
        return time.monotonic() - (self._serving_t0 if self._serving_t0 is not None else self._t0)

    def add_document(self, rows: list[dict], results: list | None = None, prompt_tokens: int = 0) -> None:
        """One document's output rows, the engine results behind them (None: rejected before the
        engine) and the prompt tokens sent (shared prefix once + every suffix)."""
        self.prompt_tokens += prompt_tokens
        failed = any(r["status"] != "ok" for r in rows)
        self.documents_error += failed
        self.documents_ok += not failed
        truncated = max((r.get("truncated_tokens") or 0) for r in rows)
        self.truncated_tokens += truncated
        self.documents_truncated += truncated > 0
        self.documents_split += any((r.get("sections") or 0) > 1 for r in rows)
        self.engine_calls += len({result.request_id for result in results or ()})
        for row in rows:
            if row["status"] == "ok":
                self.rows_ok += 1
            else:
                self.rows_error += 1
                self.error_types[row["error_type"]] += 1
                self.first_errors.setdefault(row["error_type"], row.get("error_message") or "")
            self.output_tokens += row.get("output_tokens") or 0
            if row.get("latency_s") is not None and row.get("prompt_tokens"):
                self.points.append((row["prompt_tokens"], row["latency_s"], row.get("prefill_s"),
                                    row.get("peak_memory_bytes"), row.get("device_time_s")))
        for result in results or ():
            self._add_result(result)

    def merge(self, other: JobMetrics) -> None:
        """Adds another accumulator's documents (the Ray Data dataflow counts its documents in a
        ledger actor, off the driver, and the driver merges the ledger's totals at the end)."""
        for name in ("documents_ok", "documents_error", "documents_skipped", "rows_ok", "rows_error", "prompt_tokens",
                     "output_tokens", "truncated_tokens", "documents_truncated", "documents_split", "engine_calls",
                     "device_seconds", "gpu_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.error_types.update(other.error_types)
        for kind, message in other.first_errors.items():
            self.first_errors.setdefault(kind, message)
        self.device_kinds |= other.device_kinds
        self.time_kinds |= other.time_kinds
        self.memory_kinds |= other.memory_kinds
        for key, value in other.peak_memory_per_rank.items():
            self.peak_memory_per_rank[key] = max(self.peak_memory_per_rank.get(key, 0), value)
        self.points.extend(other.points)

    def _add_result(self, result) -> None:
        if result.device_seconds_all_ranks is not None:
            self.device_seconds += result.device_seconds_all_ranks
        if getattr(result, "device_time_kind", None):
            self.time_kinds.add(result.device_time_kind)
        if result.gpu_time_s is not None:
            self.gpu_seconds += result.gpu_time_s
        kind = result.memory_kind or "unknown"
        self.device_kinds.add("cuda" if kind.startswith("cuda") else "cpu" if kind.startswith("cpu") else kind)
        if result.memory_kind:
            self.memory_kinds.add(result.memory_kind)
        per_rank = list(result.peak_memory_per_rank or [])
        if not per_rank and result.peak_memory_bytes is not None:
            per_rank = [result.peak_memory_bytes]
        for rank, value in enumerate(per_rank):
            key = f"{result.replica or 'replica'}/rank{rank}"
            if value is not None:
                self.peak_memory_per_rank[key] = max(self.peak_memory_per_rank.get(key, 0), int(value))

    def latency_by_bucket(self, points: list | None = None) -> list[dict]:
        groups: dict[str, list] = defaultdict(list)
        for point in self.points if points is None else points:
            groups[bucket_of(point[0])].append(point)
        out = []
        for name in sorted(groups, key=lambda b: min(p[0] for p in groups[b])):
            pts = groups[name]
            latencies = [p[1] for p in pts]
            prefills = [p[2] for p in pts if p[2] is not None]
            out.append({
                "prompt_tokens": name, "rows": len(pts),
                "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
                "prefill_p50_s": percentile(prefills, 50), "prefill_p95_s": percentile(prefills, 95),
            })
        return out

    def run_summary(self, *, status: str, message: str | None = None, engine_stats: dict | None = None,
                    extra: dict | None = None) -> dict:
        """This run alone."""
        wall = self.wall_s
        serving = self.serving_s
        on_gpu = "cuda" in self.device_kinds
        busy, ranks = _engine_busy(engine_stats)
        device = {
            "kind": "cuda" if on_gpu else ("cpu" if self.device_kinds else None),
            # How forwards were timed: "cuda_event" or "cpu_wall" (pipeline.engine.metering).
            "time_kind": sorted(self.time_kinds)[0] if len(self.time_kinds) == 1 else (sorted(self.time_kinds) or None),
            # Device time of every forward, summed over all ranks of all replicas, as attributed
            # to the requests answered (GPU-seconds on CUDA; null on CPU, where cpu_seconds has it).
            "gpu_seconds_all_ranks": round(self.device_seconds, 3) if on_gpu else None,
            "cpu_seconds_all_ranks": None if on_gpu else round(self.device_seconds, 3),
            # The engine's own sum of busy time over ranks (equals the attributed sum but for
            # forwards of requests still running when the run ended), its ranks, and the share
            # of ranks x serving wall clock they were busy.
            "busy_seconds_all_ranks": round(busy, 3) if busy is not None else None,
            "ranks": ranks,
            "busy_fraction": round(busy / (ranks * serving), 4) if busy is not None and ranks and serving > 0 else None,
            "gpu_time_s_sum": round(self.gpu_seconds, 3) if on_gpu else None,
        }
        return {
            "job_id": self.job_id,
            "task": self.task,
            "status": status,
            "message": message,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            # Whole run; startup = checks, tokenizer, Ray and replica start (model loading).
            "wall_s": round(wall, 3),
            "startup_s": round(self.startup_s, 3) if self.startup_s is not None else None,
            "serving_s": round(serving, 3),
            "documents": {
                "input_rows": self.total_input_rows,
                "ok": self.documents_ok,
                "error": self.documents_error,
                "skipped": self.documents_skipped,
                "already_committed": self.documents_resumed,
                # This run's work: input rows neither committed by an earlier run nor skipped.
                "to_do": max(self.total_input_rows - self.documents_skipped - self.documents_resumed, 0),
                "truncated": self.documents_truncated,
                "split": self.documents_split,
            },
            "engine_calls": self.engine_calls,
            "rows": {"ok": self.rows_ok, "error": self.rows_error, "error_types": dict(self.error_types),
                     "first_error_by_type": self.first_errors},
            "tokens": {
                "prompt": self.prompt_tokens,
                "output": self.output_tokens,
                "truncated": self.truncated_tokens,
                # Per second of serving (after startup).
                "prompt_per_s": round(self.prompt_tokens / serving, 2) if serving > 0 else None,
                "output_per_s": round(self.output_tokens / serving, 2) if serving > 0 else None,
            },
            "device": device,
            "peak_memory": {
                "kind": sorted(self.memory_kinds)[0] if len(self.memory_kinds) == 1 else sorted(self.memory_kinds),
                "per_rank_bytes": dict(sorted(self.peak_memory_per_rank.items())),
                "max_bytes": max(self.peak_memory_per_rank.values(), default=None),
            },
            "latency_by_prompt_tokens": self.latency_by_bucket(),
            # The attention backend this run's replicas chose at start-up and why (pipeline.engine.
            # attention_record.engine_record; per replica under "engine"); None without an engine.
            "attention_backend": engine_record_of_stats(engine_stats),
            "engine": engine_stats,
            "config": self.config,
            **(extra or {}),
        }

    def summary(self, *, status: str, message: str | None = None, engine_stats: dict | None = None,
                extra: dict | None = None) -> dict:
        """This run's summary (the top-level keys, as before), plus the whole job: `job` adds up
        the counts, tokens, device time and memory of every run of the job, with latency buckets
        over every committed row, and `runs` lists each run's own summary (oldest first)."""
        run = self.run_summary(status=status, message=message, engine_stats=engine_stats, extra=extra)
        runs = [*self.previous_runs, run]
        out = dict(run)
        out["run"] = len(runs)
        out["runs"] = [{k: v for k, v in r.items() if k not in ("config", "runs", "job")} for r in runs]
        out["job"] = self._job_totals(runs)
        return out

    def _job_totals(self, runs: list[dict]) -> dict:
        latest = runs[-1]
        job = {"runs": len(runs), "status": latest["status"], "started_at": runs[0].get("started_at")}
        if self.runs_without_metrics:
            # Earlier runs that ended without writing metrics (a killed driver): their documents
            # are in the output, not in these sums.
            job["runs_without_metrics"] = self.runs_without_metrics
        for key in ("wall_s", "startup_s", "serving_s"):
            job[key] = round(sum(r.get(key) or 0.0 for r in runs), 3)
        job["documents"] = {"input_rows": latest["documents"]["input_rows"],
                            **{key: sum(r["documents"].get(key, 0) for r in runs)
                               for key in ("ok", "error", "skipped", "truncated", "split")}}
        job["engine_calls"] = sum(r.get("engine_calls", 0) for r in runs)
        types: Counter = Counter()
        first: dict = {}
        for r in runs:
            types.update(r["rows"].get("error_types", {}))
            for kind, text in r["rows"].get("first_error_by_type", {}).items():
                first.setdefault(kind, text)
        job["rows"] = {"ok": sum(r["rows"]["ok"] for r in runs), "error": sum(r["rows"]["error"] for r in runs),
                       "error_types": dict(types), "first_error_by_type": first}
        tokens = {k: sum(r["tokens"].get(k, 0) for r in runs) for k in ("prompt", "output", "truncated")}
        serving = job["serving_s"]
        tokens["prompt_per_s"] = round(tokens["prompt"] / serving, 2) if serving > 0 else None
        tokens["output_per_s"] = round(tokens["output"] / serving, 2) if serving > 0 else None
        job["tokens"] = tokens
        device = dict(latest["device"])
        for key in ("gpu_seconds_all_ranks", "cpu_seconds_all_ranks", "busy_seconds_all_ranks", "gpu_time_s_sum"):
            values = [r["device"].get(key) for r in runs if r["device"].get(key) is not None]
            device[key] = round(sum(values), 3) if values else None
        busy, ranks = device.get("busy_seconds_all_ranks"), device.get("ranks")
        device["busy_fraction"] = round(busy / (ranks * serving), 4) if busy and ranks and serving > 0 else None
        job["device"] = device
        per_rank: dict = {}
        kinds: set = set()
        for r in runs:
            memory = r.get("peak_memory", {})
            kind = memory.get("kind")
            kinds.update(kind if isinstance(kind, list) else [kind] if kind else [])
            for key, value in (memory.get("per_rank_bytes") or {}).items():
                per_rank[key] = max(per_rank.get(key, 0), value)
        job["peak_memory"] = {"kind": sorted(kinds)[0] if len(kinds) == 1 else sorted(kinds),
                              "per_rank_bytes": dict(sorted(per_rank.items())),
                              "max_bytes": max(per_rank.values(), default=None)}
        job["latency_by_prompt_tokens"] = self.latency_by_bucket(self.previous_points + self.points)
        return job

    def resume(self, output_dir: str, runs_before: int) -> None:
        """Takes in what earlier runs of this job left in `output_dir`: their summaries (from
        _metrics.json, when it is this job's) and the committed rows' latencies and peaks (for the
        buckets and the plot). runs_before: earlier runs the output's manifest counts; those that
        wrote no metrics (a killed driver) are counted in `runs_without_metrics`."""
        path = os.path.join(output_dir, "_metrics.json")
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("job_id") == self.job_id:
            self.previous_runs = list(old.get("runs") or [old])  # a file from before runs were listed
            self.runs_without_metrics = int(old.get("runs_without_metrics", 0))
        self.runs_without_metrics = max(self.runs_without_metrics, runs_before - len(self.previous_runs))
        from pipeline.data.writer import committed_parts, read_output

        if not committed_parts(output_dir):
            return
        columns = ["prompt_tokens", "latency_s", "prefill_s", "peak_memory_bytes", "device_time_s"]
        table = read_output(output_dir, columns=columns).to_pydict()
        self.previous_points = [point for point in zip(*(table[c] for c in columns)) if point[1] is not None and point[0]]

    def write(self, output_dir: str, summary: dict, plot: bool = True) -> dict:
        """Writes _metrics.json (atomically) and _metrics.png; returns the paths written."""
        from pipeline.data.writer import write_json_atomic

        paths = {"metrics": os.path.join(output_dir, "_metrics.json")}
        write_json_atomic(paths["metrics"], json.loads(json.dumps(summary, default=str)))
        if plot:
            paths.update(self.write_plot(output_dir))
        return paths

    def write_plot(self, output_dir: str) -> dict:
        """Writes _metrics.png (every committed row of the job, earlier runs' included) when there
        is something to plot; returns {"plot": path} or {}."""
        if not self.points and not self.previous_points:
            return {}
        path = os.path.join(output_dir, "_metrics.png")
        this_run = self.points
        self.points = self.previous_points + this_run
        try:
            self.plot(path)
        finally:
            self.points = this_run
        return {"plot": path}

    def plot(self, path: str) -> None:
        """Device time and peak memory against prompt length, one point per output row.

        The left panel is each row's device-seconds (`device_time_s`: its shares of the forwards it
        took part in): what a longer prompt costs. Its latency is not drawn: under continuous
        batching rows share the engine's steps, so a short document's latency is that of the
        batch it waited in. Rows without device time (outputs written before the column) are left
        out, and the title says how many are drawn.

        Readable whatever the lengths: both axes start at 0 (a 5% memory difference is drawn as
        one, not as the whole height), the x axis always reaches the job's max_input_tokens and
        DCA's pretraining_length P when known (where the plain model would leave its trained
        context), points are translucent so that rows of equal length (QA questions, a corpus of
        equal prompts) show as darker marks, and the titles say how many rows are drawn."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        points = self.points
        rows = len(points)
        lengths = {p[0] for p in points}
        config = self.config or {}
        references = []  # (x, label, style)
        dca = config.get("dca_in_effect") or {}
        if dca.get("dca_enabled") and dca.get("dca_pretraining_length"):
            references.append((dca["dca_pretraining_length"],
                               f"DCA pretraining_length P = {dca['dca_pretraining_length']:,} (trained context)", ":"))
        longest = max(p[0] for p in points)
        # The prompt limit when it is near the data (truncated documents pile up against it);
        # far above it, it would only squeeze the points into a corner.
        if config.get("max_input_tokens") and config["max_input_tokens"] <= 1.5 * longest:
            references.append((config["max_input_tokens"], f"--max-input-tokens {config['max_input_tokens']:,}", "--"))
        x_max = max([longest] + [x for x, _, _ in references]) * 1.08

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
        style = dict(s=26, alpha=0.55, edgecolors="none")
        timed = [(p[0], p[4]) for p in points if len(p) > 4 and p[4] is not None]
        if timed:
            ax1.scatter([a for a, _ in timed], [b for _, b in timed], label="row (prefill + decode)", color="tab:blue",
                        **style)
        else:
            ax1.text(0.5, 0.5, "no device time measured", ha="center", va="center", transform=ax1.transAxes,
                     color="grey")
        mem = [(p[0], p[3] / 2**30) for p in points if p[3] is not None]
        if mem:
            ax2.scatter([a for a, _ in mem], [b for _, b in mem], color="tab:red", label="peak memory", **style)
        else:
            ax2.text(0.5, 0.5, "no memory measurements", ha="center", va="center", transform=ax2.transAxes,
                     color="grey")
        y1 = max((b for _, b in timed), default=1.0)
        y2 = max((b for _, b in mem), default=1.0)
        tokens = FuncFormatter(lambda x, _: f"{x:,.0f}")
        drawn = len(timed)
        what = f"{drawn} row{'s' if drawn != 1 else ''}" + (f" of {rows}" if drawn < rows else "") + (
            f", {len(lengths)} prompt length{'s' if len(lengths) != 1 else ''}" if len(lengths) < rows else "")
        time_kind = ", ".join(sorted(self.time_kinds)) or "device"
        kind = ", ".join(sorted(self.memory_kinds)) or "n/a"
        for ax, top, ylabel, title in (
            (ax1, y1, f"device-seconds ({time_kind})",
             f"Device time per row, summed over ranks, vs prompt length ({what})"),
            (ax2, y2, "GiB", f"Peak memory per request, max over ranks ({kind})"),
        ):
            for x, label, ls in references:
                ax.axvline(x, color="grey", ls=ls, lw=1, label=label)
            ax.set_xlim(0, x_max)
            ax.set_ylim(0, max(top, 1e-9) * 1.1)
            ax.xaxis.set_major_formatter(tokens)
            ax.xaxis.set_major_locator(MaxNLocator(6, steps=[1, 2, 4, 5, 10], integer=True))
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=10)
            ax.grid(True, alpha=0.3)
        # One legend below both panels: it never hides a point, wherever the points are.
        handles = {}
        for ax in (ax1, ax2):
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 3), fontsize=8,
                   frameon=False)
        fig.suptitle(f"{self.task} job {self.job_id}")
        fig.tight_layout(rect=(0, 0.08 if len(handles) <= 3 else 0.12, 1, 1))
        import uuid

        from pipeline.data.writer import open_new_file

        # Written aside under a fresh name (never through a link planted at a known name), then renamed.
        tmp = f"{path}.tmp.{uuid.uuid4().hex[:8]}.png"
        try:
            with open_new_file(tmp) as f:
                fig.savefig(f, dpi=110, format="png")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        finally:
            plt.close(fig)

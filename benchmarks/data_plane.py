"""Data-plane benchmark: how much work the driver does per document, with the engine taken away.

    .venv/bin/python benchmarks/data_plane.py                 # 10k documents of 4k-32k tokens
    .venv/bin/python benchmarks/data_plane.py --docs 2000     # smaller

A synthetic corpus (public-domain text from examples/texts, sliced to 4k-32k SmolLM2 tokens per
document) goes through two data planes whose engine answers at once with a fixed output, so
what is measured is reading, checking, tokenising, prompt building, scheduling and writing:

- `job_driver`: `pipeline.job.run_job` (the jobs today): one driver process reads every file,
  tokenises every document, schedules and commits every part (exactly once, manifest, lock);
- `ray_data`: `pipeline.dataflows.processor.build_processor` with a stand-in engine stage, then
  `Dataset.write_parquet`: reading, prompts and writing run in Ray tasks and actors;
- `ray_data_job`: `pipeline.job.run_job` with `dataflow="ray-data"` (the jobs' `--dataflow
  ray-data`) and the same stand-in in its engine stage: work units read in Ray tasks, prompts in
  CPU actors, one committed part per unit (exactly once, manifest, lock, metrics) from Ray tasks.

Per mode: wall time, documents/s, and the DRIVER's CPU seconds per document (getrusage of this
process; Ray workers excluded), the figure that limits how many replicas one driver can feed.
The scaling argument at 100k-token documents (printed and written) divides a replica's time per
document by the driver's CPU per 100k-token document, extrapolated linearly in tokens from this
run. Prints a table and writes benchmarks/results/data_plane.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "token")  # before anything imports ray

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.dataflows.processor import EngineStage  # noqa: E402
from pipeline.engine.requests import GenerationResult  # noqa: E402

OUTPUT = "a fixed summary"


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_corpus(directory: Path, docs: int, tokenizer, *, seed: int = 0, per_file: int = 500) -> dict:
    """Documents of 4k-32k tokens cut from the shipped texts; returns token statistics."""
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "examples" / "texts").glob("*.txt")))
    words = text.split()
    ids_per_word = len(tokenizer(" ".join(words[:20000]), add_special_tokens=False)["input_ids"]) / 20000
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    rows, lengths, file_index = [], [], 0
    for i in range(docs):
        tokens = rng.randint(4096, 32768)
        n = int(tokens / ids_per_word)
        start = rng.randrange(0, max(1, len(words) - n))
        piece = words[start:start + n]
        while len(piece) < n:  # longer than the texts: wrap around
            piece += words[:n - len(piece)]
        rows.append({"id": f"doc{i:06d}", "text": " ".join(piece)})
        lengths.append(tokens)
        if len(rows) == per_file or i == docs - 1:
            pq.write_table(pa.Table.from_pylist(rows), directory / f"part-{file_index:04d}.parquet")
            rows, file_index = [], file_index + 1
    return {"documents": docs, "files": file_index, "target_tokens_mean": sum(lengths) / docs,
            "target_tokens_min": min(lengths), "target_tokens_max": max(lengths)}


class InstantPool:
    """The job's engine, answering every request at once with a fixed output."""

    def run(self, requests, max_in_flight):
        for request in requests:
            yield [GenerationResult(request_id=request.request_id, suffix_index=i, output=OUTPUT,
                                    prompt_tokens=len(request.prefix_ids) + len(s), output_tokens=4,
                                    prefill_s=0.0, decode_s=0.0, wall_time_s=0.0, replica="instant")
                   for i, s in enumerate(request.suffix_ids)]

    def stats(self):
        return {}

    def shutdown(self):
        pass


class InstantEngineStage(EngineStage):
    """The processor's engine stage with InstantPool in place of a replica."""

    def _start_engine(self):
        return InstantPool()


def _instant_unit_engine_stage():
    from pipeline.dataflows.units import UnitEngineStage

    class InstantUnitEngineStage(UnitEngineStage):
        """The jobs' ray-data engine stage with InstantPool in place of a replica."""

        def _start_engine(self):
            return InstantPool()

    return InstantUnitEngineStage


def run_ray_data_job(corpus: Path, out: Path, max_input_tokens: int, prompt_actors: int) -> dict:
    import ray

    from pipeline.config.job import JobConfig
    from pipeline.config.model import ModelSpec
    from pipeline.job import run_job

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        config = JobConfig(task="summarize", input_path=str(corpus), output_dir=str(out), model_spec=ModelSpec(),
                           max_input_tokens=max_input_tokens, max_new_tokens=4, progress=False, dataflow="ray-data",
                           unit_rows=64, prompt_actors=prompt_actors, cpus_per_rank=1)
        cpu0, t0 = _cpu_s(), time.perf_counter()
        summary = run_job(config, engine_stage=_instant_unit_engine_stage())
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        return {"wall_s": wall, "driver_cpu_s": cpu, "documents_ok": summary["documents"]["ok"],
                "prompt_tokens": summary["tokens"]["prompt"]}
    finally:
        ray.shutdown()


def run_job_driver(corpus: Path, out: Path, max_input_tokens: int) -> dict:
    from pipeline.config.job import JobConfig
    from pipeline.config.model import ModelSpec
    from pipeline.job import run_job

    config = JobConfig(task="summarize", input_path=str(corpus), output_dir=str(out), model_spec=ModelSpec(),
                       max_input_tokens=max_input_tokens, max_new_tokens=4, progress=False, part_rows=512)
    cpu0, t0 = _cpu_s(), time.perf_counter()
    summary = run_job(config, pool_factory=lambda c: InstantPool())
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    return {"wall_s": wall, "driver_cpu_s": cpu, "documents_ok": summary["documents"]["ok"],
            "prompt_tokens": summary["tokens"]["prompt"]}


def run_ray_data(corpus: Path, out: Path, max_input_tokens: int, prompt_actors: int) -> dict:
    import ray

    from pipeline.config.processor import DCAProcessorConfig
    from pipeline.dataflows.processor import Processor

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        config = DCAProcessorConfig(task="summarize", max_input_tokens=max_input_tokens, max_new_tokens=4,
                                    batch_size=64, concurrency=1, prompt_concurrency=prompt_actors)
        processor = Processor(config, engine_stage=InstantEngineStage)
        cpu0, t0 = _cpu_s(), time.perf_counter()
        ds = processor(ray.data.read_parquet(str(corpus)))
        ds.drop_columns(["text"]).write_parquet(str(out))
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        table = pq.read_table(out, columns=["status", "prompt_tokens"])
        ok = sum(1 for s in table["status"].to_pylist() if s == "ok")
        return {"wall_s": wall, "driver_cpu_s": cpu, "documents_ok": ok,
                "prompt_tokens": sum(table["prompt_tokens"].to_pylist())}
    finally:
        ray.shutdown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10000)
    parser.add_argument("--max-input-tokens", type=int, default=32768 + 256)
    parser.add_argument("--prompt-actors", type=int, default=1,
                        help="Ray Data prompt-stage actors (1 CPU each; leave a CPU for the read tasks)")
    parser.add_argument("--replica-s-per-100k-doc", type=float, default=60.0,
                        help="a replica's time per 100k-token document, for the scaling argument "
                             "(default: Llama-2-70B tp 2 on A100-80G, see the output's note)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_plane.json"))
    parser.add_argument("--modes", default="job_driver,ray_data,ray_data_job")
    args = parser.parse_args(argv)

    from pipeline.config.model import ModelSpec
    from pipeline.engine.models import load_tokenizer

    tokenizer = load_tokenizer(ModelSpec())
    work = Path(tempfile.mkdtemp(prefix="dca-data-plane-"))
    try:
        t0 = time.perf_counter()
        corpus = build_corpus(work / "corpus", args.docs, tokenizer)
        corpus["build_s"] = round(time.perf_counter() - t0, 1)
        results = {}
        for mode in args.modes.split(","):
            out = work / f"out-{mode}"
            if mode == "job_driver":
                r = run_job_driver(work / "corpus", out, args.max_input_tokens)
            elif mode == "ray_data_job":
                r = run_ray_data_job(work / "corpus", out, args.max_input_tokens, args.prompt_actors)
            else:
                r = run_ray_data(work / "corpus", out, args.max_input_tokens, args.prompt_actors)
            r["documents_per_s"] = r["documents_ok"] / r["wall_s"]
            r["driver_cpu_ms_per_document"] = 1000 * r["driver_cpu_s"] / r["documents_ok"]
            r["driver_cpu_s_per_100k_tokens"] = r["driver_cpu_s"] / r["prompt_tokens"] * 100_000
            r["replicas_one_driver_feeds_at_100k"] = args.replica_s_per_100k_doc / r["driver_cpu_s_per_100k_tokens"]
            results[mode] = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = f"{'mode':<12} {'docs':>6} {'wall s':>8} {'docs/s':>8} {'driver cpu s':>13} {'cpu ms/doc':>11} {'cpu s/100k tok':>15} {'replicas fed @100k':>19}"
    print(header)
    for mode, r in results.items():
        print(f"{mode:<12} {r['documents_ok']:>6} {r['wall_s']:>8.1f} {r['documents_per_s']:>8.1f} "
              f"{r['driver_cpu_s']:>13.1f} {r['driver_cpu_ms_per_document']:>11.2f} "
              f"{r['driver_cpu_s_per_100k_tokens']:>15.4f} {r['replicas_one_driver_feeds_at_100k']:>19.0f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {
        "benchmark": "data_plane", "commit": commit, "machine": platform.node(), "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "corpus": corpus, "results": results,
        "replica_s_per_100k_doc": args.replica_s_per_100k_doc,
        "note": ("engine replaced by an instant stand-in; driver CPU from getrusage of the driver process "
                 "(Ray workers excluded); replicas_one_driver_feeds_at_100k = replica_s_per_100k_doc / driver "
                 "CPU per 100k prompt tokens, extrapolated linearly from this run. replica_s_per_100k_doc default "
                 "60 s: a 100k prefill of Llama-2-70B is ~1.4e16 FLOPs, ~28 s on 2 A100s at ~250 TFLOP/s "
                 "effective each, plus ~512 decode steps at ~50 ms."),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

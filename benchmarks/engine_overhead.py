"""Engine overhead: one request through a tp_size=1 replica vs the same model called in-process.

    .venv/bin/python benchmarks/engine_overhead.py            # SmolLM2, 4096-token prompt, 64 new tokens
    .venv/bin/python benchmarks/engine_overhead.py --repeats 5 --threads 2

Three ways to run the same greedy request (same token ids, same DCA model, same thread count):
- `direct`: `pipeline.engine.generation.generate_batch` on a model loaded in this process;
- `hf_generate`: transformers' `model.generate` on that model (the plain-transformers yardstick);
- `engine`: `ReplicaPool.submit(...).result()` on a one-rank replica (Ray actor).
Runs are interleaved (engine, direct, hf, engine, ...) so drift on a shared machine hits all of
them. Besides end-to-end medians, `dispatch_overhead_s` = engine end-to-end minus the time the
rank itself measured (Ray call, pickling, driver queue, thread hand-offs): it does not depend on
how noisy the machine is, unlike the difference of two medians.

Prints a table and writes JSON to benchmarks/results/engine_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "token")  # before anything imports ray (environment.md)
TEXT = REPO / "examples" / "texts" / "alice-chapters-1-3.txt"  # shipped with the repo


def _prompt_ids(tokenizer, tokens: int) -> list[int]:
    text = TEXT.read_text(encoding="utf-8", errors="replace") if TEXT.is_file() else "All work and no play. " * 4000
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in-process and in the rank actor")
    parser.add_argument("--skip-hf", action="store_true", help="skip the transformers generate() yardstick")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "engine_overhead.json"))
    args = parser.parse_args()

    import ray
    import torch

    from pipeline.config.engine import EngineConfig
    from pipeline.config.model import ModelSpec
    from pipeline.config.task import SamplingParams
    from pipeline.engine import ReplicaPool
    from pipeline.engine.generation import RankContext, generate_batch
    from pipeline.engine.models import load_model, load_tokenizer
    from pipeline.engine.requests import GenerationRequest

    torch.set_num_threads(args.threads)
    spec = ModelSpec(model=args.model)
    tokenizer = load_tokenizer(spec)
    prompt = _prompt_ids(tokenizer, args.prompt_tokens)
    # EOS would end a run early and make the modes incomparable: every run makes new_tokens tokens.
    sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    eos = tokenizer.eos_token_id

    model = load_model(spec, "cpu")
    ctx = RankContext(model=model, device=torch.device("cpu"), tokenizer=tokenizer, eos_token_ids=frozenset({eos}),
                      pad_token_id=tokenizer.pad_token_id or 0)

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    config = EngineConfig(model_spec=spec, tp_size=1, cpus_per_rank=args.threads,
                          max_input_tokens=args.prompt_tokens + 1)
    pool = ReplicaPool(config).start()

    def request(i):
        return GenerationRequest(request_id=f"bench-{i}", prefix_ids=prompt, sampling=sampling)

    def run_engine(i):
        start = time.perf_counter()
        (result,) = pool.submit(request(i)).result()
        total = time.perf_counter() - start
        assert result.status == "ok", result.error_message
        return total, result

    def run_direct(i):
        start = time.perf_counter()
        ((result,),) = generate_batch(ctx, [request(i)])
        return time.perf_counter() - start, result

    def run_hf(i):
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=eos)
        return time.perf_counter() - start, out[0, len(prompt):].tolist()

    # Warm-up of each path (allocator, rope tables, first Ray call).
    run_engine(-1)
    run_direct(-1)
    modes = {"engine": [], "direct": [], "hf_generate": []}
    dispatch, tokens = [], {}
    for i in range(args.repeats):
        seconds, result = run_engine(i)
        modes["engine"].append(seconds)
        dispatch.append(seconds - result.wall_time_s)
        tokens["engine"] = result.output_ids
        seconds, result = run_direct(i)
        modes["direct"].append(seconds)
        tokens["direct"] = result.output_ids
        if not args.skip_hf:
            seconds, ids = run_hf(i)
            modes["hf_generate"].append(seconds)
            tokens["hf_generate"] = ids
        print(f"round {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in modes.items() if v),
              flush=True)
    pool.shutdown()
    ray.shutdown()

    median = {k: statistics.median(v) for k, v in modes.items() if v}
    overhead = (median["engine"] - median["direct"]) / median["direct"]
    dispatch_median = statistics.median(dispatch)
    summary = {
        "model": args.model, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
        "threads": args.threads, "repeats": args.repeats, "device": "cpu",
        "seconds": modes, "median_s": median,
        "engine_vs_direct_overhead": overhead,
        "dispatch_overhead_s": dispatch, "dispatch_overhead_median_s": dispatch_median,
        "dispatch_overhead_fraction": dispatch_median / median["engine"],
        "same_tokens_engine_direct": tokens["engine"] == tokens["direct"],
        "same_tokens_direct_hf": tokens.get("hf_generate") == tokens["direct"] if "hf_generate" in tokens else None,
        "target": "engine overhead <= 5% of the request time",
        "host": platform.node(), "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print()
    print(f"{'mode':<14}{'median s':>10}{'min s':>10}{'max s':>10}")
    for name, values in modes.items():
        if values:
            print(f"{name:<14}{statistics.median(values):>10.3f}{min(values):>10.3f}{max(values):>10.3f}")
    print(f"\nengine vs direct (medians): {overhead * 100:+.1f}%")
    print(f"dispatch overhead (engine end-to-end - time inside the rank): {dispatch_median * 1e3:.1f} ms "
          f"= {summary['dispatch_overhead_fraction'] * 100:.2f}% of the request")
    print(f"same tokens engine/direct: {summary['same_tokens_engine_direct']}, direct/hf: {summary['same_tokens_direct_hf']}")
    print(f"load average at end: {summary['load_average_at_end']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

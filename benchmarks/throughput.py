"""Throughput of the engine on a mixed-length corpus: continuous batching vs the static scheduler.

    # CPU (the engine on a local Ray, tp 1): 40 documents of 1k-16k tokens, the tiny random model
    .venv/bin/python benchmarks/throughput.py --model tiny --documents 40 --min-tokens 1024 --max-tokens 16384
    # SmolLM2-135M (the embedded model): sized to finish on 2 shared cores, see the results file
    .venv/bin/python benchmarks/throughput.py --model smollm2 --documents 12 --min-tokens 1024 --max-tokens 4096
    # GPU mode (one process, no Ray: the GPU image has none): a Llama-2-70B tensor-parallel rank
    # stack with random bf16 weights, 4k-100k prompts, run in process on CUDA
    python benchmarks/throughput.py --model llama2-70b-rank --layers 2 --device cuda --engine in_process \
        --documents 16 --min-tokens 4096 --max-tokens 100000

The corpus is synthetic: prompt lengths drawn log-uniformly between --min-tokens and
--max-tokens (seeded), token ids random, every document generating exactly --new-tokens tokens,
or with --new-tokens-max a seeded count of its own (ignore_eos: the schedulers are compared on the
same work). With --prefill-runs each scheduler also runs the corpus with 1 new token per document,
which splits its wall clock into prefill and what decoding added: continuous batching can only
shrink the second part, so static's wall over continuous's prefill bounds its speedup.

Both schedulers run the same requests in the same order through the same code path (`--engine ray`: a `ReplicaPool` replica,
`EngineConfig.scheduler` "static" or "continuous"; `--engine in_process`: the rank-side code
of that replica in this process). Reported per scheduler: serving wall clock (after the model is
loaded), output tokens/s, documents/hour, device-seconds per document (the engine's busy time of
every forward summed over ranks: CUDA events on GPU, CPU wall on CPU, labelled), busy fraction,
latency p50/p95, and whether every document's greedy tokens are identical between the two.
With --repeats N the schedulers run N times each in alternating order (a shared machine's load
then hits both alike); the table reports each scheduler's median run and lists every wall clock.

Writes JSON (default benchmarks/results/throughput_<model>_<device>.json) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "token")  # before anything imports ray (environment.md)

TINY_DCA = {"pretraining_length": 64, "chunk_size": 48, "local_window": 8}


def _build_tiny_model(directory: str, pretraining_length: int = 64) -> str:
    """The test suite's tiny random Llama (9 heads / 3 KV heads, head_dim 8, 2 layers, P = 64, or
    the pretraining length given)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=8, max_position_embeddings=pretraining_length, initializer_range=0.2, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(directory)
    return directory


def _build_rank_stack(directory: str, layers: int) -> str:
    """One tensor-parallel rank of Llama-2-70B at tp 2 (32 query heads, 4 KV heads, head_dim 128,
    intermediate 14336), `layers` layers, random weights, saved as bf16 (GPU mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=8192, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=4096,
        torch_dtype="bfloat16", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    return directory


def corpus(documents: int, min_tokens: int, max_tokens: int, vocab: int, seed: int) -> list[list[int]]:
    """Prompt token ids, lengths log-uniform in [min_tokens, max_tokens], in a shuffled order."""
    rng = random.Random(seed)
    out = []
    for _ in range(documents):
        n = int(round(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens)))))
        out.append([rng.randrange(3, vocab) for _ in range(n)])
    return out


def output_lengths(documents: int, new_tokens: int, new_tokens_max: int | None, seed: int) -> list[int]:
    """Tokens each document generates: all `new_tokens`, or uniform in [new_tokens, new_tokens_max]
    (seeded): real summaries end at different lengths, which a static batch pays for."""
    if new_tokens_max is None:
        return [new_tokens] * documents
    rng = random.Random(seed + 1)
    return [rng.randint(new_tokens, new_tokens_max) for _ in range(documents)]


def _requests(prompts, new_tokens: list[int]):
    """One request per prompt, generating exactly its count of `new_tokens`."""
    from pipeline.config.task import SamplingParams
    from pipeline.engine.requests import GenerationRequest

    return [GenerationRequest(request_id=f"doc{i:03d}", prefix_ids=p,
                              sampling=SamplingParams(max_new_tokens=n, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts, new_tokens))]


def run_ray(spec, scheduler: str, requests, args) -> dict:
    from pipeline.config.engine import EngineConfig
    from pipeline.engine import ReplicaPool

    config = EngineConfig(
        model_spec=spec, tp_size=args.tp, scheduler=scheduler, max_input_tokens=args.max_tokens + 16,
        max_batch_size=args.max_batch_size, cpus_per_rank=args.threads, device=args.device,
        request_timeout_s=None, prefill_block=args.prefill_block,
    )
    with ReplicaPool(config) as pool:
        start = time.monotonic()
        results = {}
        for rs in pool.run(requests, max_in_flight=args.in_flight):
            results[rs[0].request_id] = rs[0]
        wall = time.monotonic() - start
        (stats,) = pool.stats().values()
    return {"wall_s": wall, "results": [results[r.request_id] for r in requests],
            "busy_s": sum(stats["busy_s_per_rank"]), "ranks": args.tp, "stats": stats}


def run_in_process(ctx, scheduler: str, requests, args) -> dict:
    import torch

    from pipeline.engine.continuous import generate_continuous, resolve_prefill_tokens
    from pipeline.engine.generation import generate_batch
    from pipeline.engine.scheduler import static_batch

    def sync():
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)

    sync()
    start = time.monotonic()
    if scheduler == "continuous":
        results = [r[0] for r in generate_continuous(ctx, requests, max_rows=args.max_batch_size,
                                                     prefill_block=args.prefill_block)]
    else:  # the static scheduler's batches (static_batch), each through generate_batch
        prefill = None if args.prefill_block == "auto" else args.prefill_block
        static_ctx = dataclasses.replace(ctx, prefill_block=prefill)
        waiting = list(requests)
        results_by_id = {}
        while waiting:
            chosen = static_batch([(r.prompt_tokens, False) for r in waiting], 8192, args.max_batch_size)
            batch = [waiting[i] for i in chosen]
            for r in batch:
                waiting.remove(r)
            for rs in generate_batch(static_ctx, batch):
                results_by_id[rs[0].request_id] = rs[0]
        results = [results_by_id[r.request_id] for r in requests]
    sync()
    wall = time.monotonic() - start
    # One rank: the attributions of every request sum to the rank's busy time.
    busy = sum(r.device_seconds_all_ranks or 0.0 for r in results)
    return {"wall_s": wall, "results": results, "busy_s": busy, "ranks": 1,
            "stats": {"prefill_tokens": resolve_prefill_tokens(args.prefill_block, ctx.model)
                      if scheduler == "continuous" else None}}


def summarise(name: str, run: dict, new_tokens: int) -> dict:
    results = run["results"]
    failed = [r for r in results if r.status != "ok"]
    out_tokens = sum(r.output_tokens for r in results)
    wall = run["wall_s"]
    latencies = sorted(r.wall_time_s for r in results if r.wall_time_s is not None)
    kind = next((r.device_time_kind for r in results if r.device_time_kind), None)
    return {
        "scheduler": name,
        "documents": len(results),
        "failed": len(failed),
        "first_error": failed[0].error_message if failed else None,
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "output_tokens": out_tokens,
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(out_tokens / wall, 3),
        "documents_per_hour": round(len(results) * 3600 / wall, 1),
        "device_time_kind": kind,
        "device_seconds": round(run["busy_s"], 2),
        "device_seconds_per_document": round(run["busy_s"] / len(results), 3),
        "attributed_device_seconds": round(sum(r.device_seconds_all_ranks or 0.0 for r in results), 2),
        "busy_fraction": round(run["busy_s"] / (run["ranks"] * wall), 3),
        "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_p95_s": round(latencies[max(0, math.ceil(0.95 * len(latencies)) - 1)], 2) if latencies else None,
        "engine": {k: v for k, v in run["stats"].items() if k not in ("last_error",)},
    }


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | llama2-70b-rank | a HF directory")
    parser.add_argument("--tiny-pretraining-length", type=int, default=64,
                        help="tiny: the model's P (64 as in the tests: a 16k prompt is ~340 DCA chunks; "
                             "1024: 16x past P at 16k, the product's ratio of 4k to 64k)")
    parser.add_argument("--layers", type=int, default=2, help="llama2-70b-rank: decoder layers of the stack")
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--min-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--new-tokens-max", type=int, default=None,
                        help="each document generates a seeded uniform count in [--new-tokens, this] "
                             "(default: exactly --new-tokens each)")
    parser.add_argument("--prefill-runs", nargs="?", const="all", default=None, metavar="SCHEDULERS",
                        help="also run each scheduler (or those listed, comma-separated) once with 1 new "
                             "token per document: the wall clock then splits into prefill and the "
                             "marginal cost of decoding; continuous alone gives the speedup bound")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedulers", default="static,continuous")
    parser.add_argument("--engine", choices=("ray", "in_process"), default="ray")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tp", type=int, default=1, help="ranks per replica (--engine ray)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPUs) per rank")
    parser.add_argument("--max-batch-size", type=int, default=8, help="rows per batch, both schedulers")
    parser.add_argument("--in-flight", type=int, default=16, help="requests inside the engine at once")
    parser.add_argument("--prefill-block", default="auto", help="EngineConfig.prefill_block (auto, chunk, N)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per scheduler, in alternating order")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/throughput_<model>_<device>.json)")
    args = parser.parse_args(argv)
    if args.prefill_block not in ("auto", "chunk"):
        args.prefill_block = int(args.prefill_block)

    import torch

    from pipeline.config.model import ModelSpec

    if args.engine == "in_process" or args.device == "cpu":
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    if args.model == "tiny":
        p = args.tiny_pretraining_length
        dca = TINY_DCA if p == 64 else {"pretraining_length": p}  # the spec's default chunk_size, local_window
        spec = ModelSpec(model=_build_tiny_model(tmp.name, p), dca=dca, dtype="float32")
    elif args.model == "llama2-70b-rank":
        spec = ModelSpec(model=_build_rank_stack(tmp.name, args.layers), dca={}, dtype="bfloat16")
    else:
        spec = ModelSpec(model=args.model, dca={})
    from pipeline.engine.models import load_model_config

    vocab = int(load_model_config(spec).vocab_size)
    prompts = corpus(args.documents, args.min_tokens, args.max_tokens, vocab, args.seed)
    lengths = output_lengths(len(prompts), args.new_tokens, args.new_tokens_max, args.seed)
    requests = _requests(prompts, lengths)
    print(f"{len(requests)} documents, {sum(len(p) for p in prompts)} prompt tokens "
          f"({min(len(p) for p in prompts)}-{max(len(p) for p in prompts)}), {min(lengths)}-{max(lengths)} new "
          f"tokens each; model {args.model}, {args.engine} on {args.device}", flush=True)

    ctx = None
    load_s = None
    if args.engine == "in_process":
        from pipeline.engine.generation import RankContext
        from pipeline.engine.models import load_model

        start = time.monotonic()
        model = load_model(spec, args.device)
        ctx = RankContext(model=model, device=torch.device(args.device), eos_token_ids=frozenset({2}))
        load_s = time.monotonic() - start
    else:
        import ray

        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.tp * args.threads),
                 num_gpus=torch.cuda.device_count() if args.device == "cuda" else 0,
                 include_dashboard=False, log_to_driver=False)
    names = args.schedulers.split(",")
    all_runs: dict[str, list] = {name: [] for name in names}
    prefill_runs: dict[str, dict] = {}
    try:
        if args.prefill_runs:
            first_tokens = _requests(prompts, [1] * len(prompts))
            for name in names if args.prefill_runs == "all" else args.prefill_runs.split(","):
                print(f"running {name} with 1 new token per document (prefill) ...", flush=True)
                run = run_in_process(ctx, name, first_tokens, args) if ctx is not None else \
                    run_ray(spec, name, first_tokens, args)
                prefill_runs[name] = {"wall_s": round(run["wall_s"], 2), "device_seconds": round(run["busy_s"], 2)}
                print(json.dumps({name: prefill_runs[name]}), flush=True)
        for repeat in range(args.repeats):
            # Alternate the order (A B, B A, ...): load from other work on a shared machine then
            # hits both schedulers alike instead of whichever runs second.
            for name in names if repeat % 2 == 0 else names[::-1]:
                print(f"running {name} (repeat {repeat + 1}/{args.repeats}) ...", flush=True)
                run = run_in_process(ctx, name, requests, args) if ctx is not None else run_ray(spec, name, requests, args)
                all_runs[name].append(run)
                summary = summarise(name, run, args.new_tokens)
                print(json.dumps({k: v for k, v in summary.items() if k != "engine"}), flush=True)
    finally:
        if ctx is None:
            import ray

            ray.shutdown()
    # Per scheduler, the run with the median wall clock (the faster one of two).
    runs = {name: sorted(rs, key=lambda r: r["wall_s"])[(len(rs) - 1) // 2] for name, rs in all_runs.items()}
    table = {name: summarise(name, run, args.new_tokens) for name, run in runs.items()}
    for name, rs in all_runs.items():
        table[name]["all_walls_s"] = [round(r["wall_s"], 2) for r in rs]
    for name, prefill in prefill_runs.items():
        # What decoding added to the run: the run's wall less the same documents' first tokens.
        row = table[name]
        decode_wall = row["wall_s"] - prefill["wall_s"]
        row["prefill_wall_s"] = prefill["wall_s"]
        row["decode_wall_s"] = round(decode_wall, 2)
        row["decode_output_tokens_per_s"] = (
            round((row["output_tokens"] - row["documents"]) / decode_wall, 2) if decode_wall > 0 else None)
    identical = None
    if {"static", "continuous"} <= set(runs):
        # Every run of either scheduler against the first static run.
        reference = all_runs["static"][0]["results"]
        pairs = [(a, b) for rs in all_runs.values() for run in rs for a, b in zip(reference, run["results"])]
        same = {a.request_id: True for a in reference}
        for a, b in pairs:
            same[a.request_id] &= a.output_ids == b.output_ids
        identical = sum(same.values())
        first_diff = next((rid for rid, ok in same.items() if not ok), None)
    out = {
        "model": args.model,
        "tiny_pretraining_length": args.tiny_pretraining_length if args.model == "tiny" else None,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "engine": args.engine,
        "tp": args.tp if args.engine == "ray" else 1,
        "threads_per_rank": args.threads,
        "documents": args.documents,
        "prompt_tokens_range": [args.min_tokens, args.max_tokens],
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens,
        "new_tokens_max": args.new_tokens_max,
        "max_batch_size": args.max_batch_size,
        "in_flight": args.in_flight,
        "prefill_block": args.prefill_block,
        "repeats": args.repeats,
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "load_s": load_s,
        "schedulers": table,
        "identical_greedy_outputs": None if identical is None else f"{identical}/{len(requests)}",
        "first_different_document": None if identical is None else first_diff,
        "speedup_output_tokens_per_s": (
            round(table["continuous"]["output_tokens_per_s"] / table["static"]["output_tokens_per_s"], 2)
            if {"static", "continuous"} <= set(table) else None),
        # With prefill runs: the speedup of decoding alone, and the most continuous batching could
        # give on this corpus if its decoding cost nothing (static's wall / continuous prefill).
        "decode_speedup": (
            round(table["static"]["decode_wall_s"] / table["continuous"]["decode_wall_s"], 2)
            if {"static", "continuous"} <= set(prefill_runs) and table["continuous"]["decode_wall_s"] > 0 else None),
        "speedup_bound_if_decoding_were_free": (
            round(table["static"]["wall_s"] / prefill_runs["continuous"]["wall_s"], 2)
            if "continuous" in prefill_runs and "static" in table else None),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "host_load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = Path(args.out or REPO / "benchmarks" / "results" / f"throughput_{args.model}_{args.device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"\n{'scheduler':<12} {'wall s':>8} {'out tok/s':>10} {'docs/h':>8} {'dev-s/doc':>10} {'busy':>6} "
          f"{'p50 s':>7} {'p95 s':>7}")
    for name, row in table.items():
        print(f"{name:<12} {row['wall_s']:>8} {row['output_tokens_per_s']:>10} {row['documents_per_hour']:>8} "
              f"{row['device_seconds_per_document']:>10} {row['busy_fraction']:>6} {row['latency_p50_s']:>7} "
              f"{row['latency_p95_s']:>7}")
    for name, row in table.items():
        if "prefill_wall_s" in row:
            print(f"{name:<12} prefill (1 token each) {row['prefill_wall_s']} s, decoding added {row['decode_wall_s']} s "
                  f"({row['decode_output_tokens_per_s']} tok/s)")
    if out["decode_speedup"] is not None:
        print(f"decode speedup {out['decode_speedup']}x")
    if out["speedup_bound_if_decoding_were_free"] is not None:
        print(f"speedup bound if decoding were free: {out['speedup_bound_if_decoding_were_free']}x")
    print(f"identical greedy outputs: {out['identical_greedy_outputs']}; speedup (output tok/s): "
          f"{out['speedup_output_tokens_per_s']}; written to {path}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU check of continuous batching and the device-time rule, in ONE process (no Ray, no DeepSpeed:
the GPU image has neither). Called by scripts/gpu_check.py; runs alone too.

    python scripts/gpu_check_metering.py                 # on a CUDA machine, about 1-3 minutes
    python scripts/gpu_check_metering.py --device cpu    # dry run of the same code on CPU

1. tokens: a tiny random Llama with DCA (float32): the continuous batch (three rows at most, so
   requests wait and join as rows end; prefill blocks beside decode steps) gives every request
   the greedy tokens it gets alone (`generate_batch`, one request), and seeded sampling the same
   samples.
2. metering: a Llama-2-7B-geometry stack (2 layers, random bf16 weights, DCA with P = 4096), six
   requests of 2k-16k tokens and a QA request (8k prefix, 3 questions) through
   `generate_continuous` on the GPU: every result has gpu_time_s (CUDA events, max over ranks; one
   rank here); the sum of the per-request attributions equals the rank's busy time (sum of its
   forwards' event times); that busy time lies within the CUDA-event span of the whole run (events
   recorded before and after it), so GPU-seconds <= ranks x wall. Per-request GPU time and peak
   memory (allocator peak of the forwards each took part in, the QA prefix included) are printed.
3. throughput: benchmarks/throughput.py in process on CUDA, continuous vs static scheduler, on
   that stack (8 documents of 4k-32k, 64 new tokens): output tokens/s, GPU-seconds per document,
   identical greedy outputs.

Prints one JSON line per check; writes benchmarks/results/gpu_check_metering.json (--output);
exit code 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY_DCA = {"pretraining_length": 64, "chunk_size": 48, "local_window": 8}


def _tiny(directory: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=8, max_position_embeddings=64, initializer_range=0.2, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


def _stack(directory: str, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(directory)
    return directory


def _prompts(lengths, vocab, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _request(rid, prompt, suffixes=None, **sampling):
    from pipeline.config.task import SamplingParams
    from pipeline.engine.requests import GenerationRequest

    return GenerationRequest(request_id=rid, prefix_ids=prompt, suffix_ids=suffixes or [[]],
                             sampling=SamplingParams(**sampling))


def run_checks(device: str, records: list, throughput: bool = True) -> None:
    import torch

    from pipeline.config.model import ModelSpec
    from pipeline.engine.continuous import generate_continuous
    from pipeline.engine.generation import RankContext, generate_batch
    from pipeline.engine.models import load_model

    def record(name, ok, **info):
        entry = {"check": name, "ok": ok, **info}
        records.append(entry)
        print(json.dumps(entry, default=str), flush=True)

    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        # 1. tokens
        try:
            model = load_model(ModelSpec(model=_tiny(tmp + "/tiny"), dca=TINY_DCA, dtype="float32"), device)
            ctx = RankContext(model=model, device=dev, eos_token_ids=frozenset({2}))
            lengths, news = (390, 9, 130, 250, 70, 333, 41), (12, 30, 5, 20, 25, 8, 16)
            requests = [_request(f"r{i}", p, max_new_tokens=n)
                        for i, (p, n) in enumerate(zip(_prompts(lengths, 128), news))]
            prefix, s1, s2 = _prompts((170, 12, 5), 128, seed=1)
            requests.append(_request("qa", prefix, [s1, [], s2], max_new_tokens=14))
            requests += [_request(f"s{i}", p, do_sample=True, seed=7 + i, top_p=0.9, max_new_tokens=12)
                         for i, p in enumerate(_prompts((60, 150), 128, seed=3))]
            alone = [[r.output_ids for r in generate_batch(ctx, [q])[0]] for q in requests]
            together = [[r.output_ids for r in rows] for rows in generate_continuous(ctx, requests, max_rows=3,
                                                                                       prefill_block=64)]
            same = [a == b for a, b in zip(alone, together)]
            record("continuous_tokens_match_alone", all(same), matching=f"{sum(same)}/{len(same)}",
                   different=[q.request_id for q, s in zip(requests, same) if not s])
            del model, ctx
        except Exception:  # noqa: BLE001 - reported
            record("continuous_tokens_match_alone", False, error=traceback.format_exc(limit=6))

        # 2. metering
        try:
            stack = _stack(tmp + "/stack", device)
            spec = ModelSpec(model=stack, dca={}, dtype="bfloat16" if device == "cuda" else "float32")
            model = load_model(spec, device)
            ctx = RankContext(model=model, device=dev, eos_token_ids=frozenset({2}))
            scale = 1 if device == "cuda" else 64  # the CPU dry run uses short prompts
            prompts = _prompts([n // scale for n in (2048, 16384, 4096, 12288, 3000, 8192)], 32000, seed=4)
            requests = [_request(f"m{i}", p, max_new_tokens=32, ignore_eos=True) for i, p in enumerate(prompts)]
            prefix, *questions = _prompts([8192 // scale, 20, 30, 25], 32000, seed=5)
            requests.append(_request("qa", prefix, questions, max_new_tokens=16, ignore_eos=True))
            generate_continuous(ctx, requests[:1], prefill_block="auto")  # warm-up (kernels, rope tables)
            reports = []
            if device == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            wall = time.perf_counter()
            results = generate_continuous(ctx, requests, max_rows=8, prefill_block="auto", reports=reports)
            wall = time.perf_counter() - wall
            span = wall
            if device == "cuda":
                end.record()
                torch.cuda.synchronize()
                span = start.elapsed_time(end) / 1e3
            flat = [r for rows in results for r in rows]
            busy = sum(r.busy_s for r in reports)
            attributed = sum(r.device_seconds_all_ranks for r in flat)
            gpu_sum = sum(r.gpu_time_s or 0.0 for r in flat)
            kind = flat[0].device_time_kind
            has_gpu_time = all((r.gpu_time_s is not None and r.gpu_time_s > 0) == (device == "cuda") for r in flat)
            qa_peaks = [r.peak_memory_bytes for r in results[-1]]
            ok = (all(r.status == "ok" for r in flat) and has_gpu_time and abs(attributed - busy) <= 1e-6 * max(busy, 1)
                  and busy <= span * 1.001 and min(qa_peaks) > 0)
            record("device_time_rule", ok, device_time_kind=kind, busy_s=round(busy, 4),
                   attributed_s=round(attributed, 4), gpu_time_s_sum=round(gpu_sum, 4), span_s=round(span, 4),
                   wall_s=round(wall, 4), busy_fraction_of_span=round(busy / span, 3) if span else None,
                   forwards=sum(r.forwards for r in reports),
                   per_request_gpu_time_s={rows[0].request_id: [round(r.device_time_s, 4) for r in rows]
                                           for rows in results},
                   qa_peak_memory_bytes=qa_peaks, memory_kind=flat[0].memory_kind,
                   max_memory_allocated=torch.cuda.max_memory_allocated() if device == "cuda" else None)
            del model, ctx
            if device == "cuda":
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - reported
            record("device_time_rule", False, error=traceback.format_exc(limit=6))

    # 3. throughput
    if throughput:
        out = ROOT / "benchmarks" / "results" / f"throughput_llama2-70b-rank_{device}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--model", "llama2-70b-rank", "--layers", "2",
               "--device", device, "--engine", "in_process", "--documents", "8",
               "--min-tokens", "4096" if device == "cuda" else "256",
               "--max-tokens", "32768" if device == "cuda" else "1024", "--new-tokens", "64", "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        result = json.loads(out.read_text()) if proc.returncode == 0 and out.exists() else None
        record("throughput_continuous_vs_static", proc.returncode == 0,
               speedup=result and result["speedup_output_tokens_per_s"],
               identical=result and result["identical_greedy_outputs"],
               table=result and {k: {f: v[f] for f in ("wall_s", "output_tokens_per_s", "device_seconds_per_document",
                                                      "busy_fraction")} for k, v in result["schedulers"].items()},
               output=None if proc.returncode == 0 else (proc.stdout[-2000:] + proc.stderr[-3000:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--no-throughput", action="store_true", help="skip stage 3")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gpu_check_metering.json"))
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"check": "cuda_available", "ok": False}))
        return 1
    records: list = []
    run_checks(args.device, records, throughput=not args.no_throughput)
    failed = [r["check"] for r in records if r["ok"] is False]
    summary = {"summary": "continuous batching and metering check", "device": args.device,
               "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__, "failed": failed, "records": records}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

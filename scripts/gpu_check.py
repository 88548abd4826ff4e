"""The prepared GPU check: one command, under 8 minutes on one H100/A100.

    PYTHONPATH=. python scripts/gpu_check.py            # writes benchmarks/results/gpu_check.json
                                                        # and benchmarks/results/gpu_bench.json

Needs only torch (CUDA), triton and transformers; flash-attn, Ray and DeepSpeed are optional.
1. Backends agree: DCA attention with the torch backend (aten memory-efficient kernel), the Triton
   kernels and, when flash-attn is importable, the flash backend, in bf16, each against a float32
   torch-backend run of the same inputs (Llama-2-70B head layout per GPU at tp 2: 32 query heads,
   4 KV heads); the Triton kernels in float32 too.
2. Prefill time and peak memory, DCA vs plain (SDPA, and flash-attn 2 when installed), at 16k,
   32k and 64k tokens on a Llama-2-7B-shaped stack of a few layers in bf16 with random weights.
3. benchmarks/gpu_bench.py (the 2-layer Llama-2-70B rank stack: prefill, attention and decode,
   plain vs DCA, torch vs Triton), unless --skip-bench.
4. Continuous batching and the device-time rule (scripts/gpu_check_metering.py, one process):
   greedy tokens of each request alone, per-request GPU time summing to the rank's busy time
   within the run's CUDA-event span, and the throughput benchmark (continuous vs static) on a
   Llama-2-70B rank stack.
5. The engine check (scripts/gpu_check_engine.py), when Ray and DeepSpeed are installed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def check_backends(results: dict) -> None:
    import torch

    from dca import DCAConfig
    from dca.attention import RopeTable, dca_attention, rotate_keys

    config = DCAConfig(4096)
    n = 16384
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, n, 128, device="cuda", generator=g)
    k = torch.randn(1, 4, n, 128, device="cuda", generator=g)
    v = torch.randn(1, 4, n, 128, device="cuda", generator=g)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))

    def build(ids, dtype):
        f = ids.float()[:, None] * inv
        e = torch.cat([f, f], -1)
        return e.cos().to(dtype), e.sin().to(dtype)

    rope = RopeTable(config, build)
    idx = torch.arange(n, device="cuda")[None]

    def run(dtype, backend):
        kr = rotate_keys(k.to(dtype), idx, rope)
        return dca_attention(q.to(dtype), kr, v.to(dtype), idx, idx, rope, 128**-0.5, backend=backend).float()

    ref = run(torch.float32, "torch")
    backends = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
    backends += ["flash"] if importlib.util.find_spec("flash_attn") else []
    rows = []
    if "triton" in backends:
        out = run(torch.float32, "triton")
        rows.append({"backend": "triton", "dtype": "float32", "max_abs_err_vs_fp32": (out - ref).abs().max().item(),
                     "max_rel_err_vs_fp32": ((out - ref).abs().max() / ref.abs().max()).item()})
    for backend in backends:
        out = run(torch.bfloat16, backend)
        rows.append({"backend": backend, "dtype": "bfloat16", "max_abs_err_vs_fp32": (out - ref).abs().max().item(),
                     "mean_abs_err_vs_fp32": (out - ref).abs().mean().item()})
    if "flash" in backends:
        a, b = run(torch.bfloat16, "torch"), run(torch.bfloat16, "flash")
        rows.append({"backend": "flash vs torch", "dtype": "bfloat16", "max_abs_err": (a - b).abs().max().item()})
    else:
        rows.append({"backend": "flash", "note": "flash-attn is not installed: flash backend not checked"})
    errors = {r["backend"]: r["max_abs_err_vs_fp32"] for r in rows if r.get("dtype") == "bfloat16"}
    if "triton" in errors:
        rows.append({"check": "triton bf16 error <= 2 x torch bf16 error", "met": errors["triton"] <= 2 * errors["torch"]})
    results["backends"] = rows
    print("\nbackend agreement (16k tokens, 32 q heads / 4 kv heads, head_dim 128):")
    for r in rows:
        print("  ", r)


def time_prefill(results: dict, lengths, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dca import DCAConfig, apply_dca

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
    )
    modes = [("plain sdpa", "sdpa", None), ("dca torch", "sdpa", "torch")]
    if importlib.util.find_spec("triton"):
        modes.append(("dca triton", "sdpa", "triton"))
    if importlib.util.find_spec("flash_attn"):
        modes = [("plain flash-attn", "flash_attention_2", None)] + modes + [("dca flash", "sdpa", "flash")]
    else:
        print("\nflash-attn is not installed: timing the DCA torch backend on CUDA against SDPA")
    rows = []
    for label, impl, backend in modes:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        if impl != "sdpa":
            model.set_attn_implementation(impl)
        if backend:
            apply_dca(model, DCAConfig(4096, backend=backend))
        for n in lengths:
            ids = torch.randint(0, 32000, (1, n), device="cuda")
            try:
                with torch.inference_mode():
                    model(ids[:, :256], logits_to_keep=1)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    model(ids, use_cache=False, logits_to_keep=1)
                    end.record()
                    torch.cuda.synchronize()
                row = {"mode": label, "tokens": n, "layers": layers, "prefill_ms": start.elapsed_time(end),
                       "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
            except torch.OutOfMemoryError:
                row = {"mode": label, "tokens": n, "layers": layers, "error": "out of memory"}
                torch.cuda.empty_cache()
            rows.append(row)
            print("  ", row, flush=True)
        del model
        torch.cuda.empty_cache()
    results["prefill"] = rows
    print(f"\n| mode | tokens | prefill (ms, {layers} layers) | peak extra (GiB) |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['tokens']} | {r.get('prefill_ms', float('nan')):.1f} | {r.get('peak_extra_gib', float('nan')):.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="*", default=[16384, 32768, 65536])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--skip-bench", action="store_true", help="do not run benchmarks/gpu_bench.py")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available here; this script is for a GPU machine")
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
        "torch": torch.__version__, "flash_attn": importlib.util.find_spec("flash_attn") is not None,
    }
    print(results)
    t0 = time.time()
    check_backends(results)
    time_prefill(results, args.lengths, args.layers)
    if args.skip_bench:
        results["gpu_bench"] = "skipped (--skip-bench)"
    else:
        torch.cuda.empty_cache()
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import gpu_bench

        bench = gpu_bench.main([])
        results["gpu_bench"] = {"output": "benchmarks/results/gpu_bench.json", "summary": bench["summary"]}
    torch.cuda.empty_cache()
    # Continuous batching and the device-time rule, in process (no Ray or DeepSpeed needed).
    metering = ROOT / "scripts" / "gpu_check_metering.py"
    proc = subprocess.run([sys.executable, str(metering)], cwd=ROOT, capture_output=True, text=True)
    results["metering"] = {"returncode": proc.returncode, "output": proc.stdout[-6000:] + proc.stderr[-2000:]}
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    engine = ROOT / "scripts" / "gpu_check_engine.py"
    if engine.exists() and importlib.util.find_spec("ray") and importlib.util.find_spec("deepspeed"):
        proc = subprocess.run([sys.executable, str(engine)], cwd=ROOT, capture_output=True, text=True)
        results["engine"] = {"returncode": proc.returncode, "output": proc.stdout[-4000:] + proc.stderr[-2000:]}
        print(proc.stdout[-4000:], proc.stderr[-2000:])
    else:
        results["engine"] = "skipped: Ray or DeepSpeed not installed here"
        print("engine check skipped: Ray or DeepSpeed not installed here")
    results["seconds"] = time.time() - t0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

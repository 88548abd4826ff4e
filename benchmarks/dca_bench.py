"""DCA speed and memory benchmark: prints a table and writes JSON (not a test: machines are noisy).

Two parts, each measurement in a fresh subprocess so peak RSS belongs to that measurement alone:

  attention  one DCA attention call (9 query heads, 3 KV heads, head_dim 64, float32) at 16k,
             32k, 64k tokens: extra peak memory of the call over its inputs, and time; plain
             causal SDPA beside it.
  prefill    the SmolLM2-135M geometry (30 layers, random weights), DCA vs the same model
             without DCA (SDPA): prefill time and peak RSS (KV cache included) at 4k, 8k, 16k,
             32k (last-position logits only), and decode ms/token after the 16k prefill.

    .venv/bin/python benchmarks/dca_bench.py                      # everything (~20-40 min on 2 cores)
    .venv/bin/python benchmarks/dca_bench.py --part attention
    .venv/bin/python benchmarks/dca_bench.py --part prefill --lengths 4096 8192

Compare ratios within one run: both sides of a ratio run back to back on the same machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DECODE_TOKENS = 16


def _reset_peak_rss() -> int:
    """Resets the kernel's RSS high-water mark (VmHWM) to the current RSS, and returns that."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _peak_rss() -> int:
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def worker_attention(mode: str, length: int, threads: int) -> dict:
    import torch

    from dca import DCAConfig
    from dca.attention import RopeTable, rotate_keys
    from dca.backends import dca_attention

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q = torch.randn(1, 9, length, 64)  # (B, Hq, T, D)
    k = torch.randn(1, 3, length, 64)
    v = torch.randn(1, 3, length, 64)
    config = DCAConfig(8192)
    idx = torch.arange(length)[None]
    inv = 1.0 / (100000.0 ** (torch.arange(0, 64, 2).float() / 64))

    def build(ids, dtype):
        f = ids.float()[:, None] * inv
        e = torch.cat([f, f], -1)
        return e.cos().to(dtype), e.sin().to(dtype)

    rope = RopeTable(config, build)
    if mode == "dca":
        k = rotate_keys(k, idx, rope)

        def call():
            return dca_attention(q, k, v, idx, idx, rope, 0.125)
    else:

        def call():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    rope.tables(q.device, q.dtype)
    base = _reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    out = call()
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    extra = _peak_rss() - base
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v))
    del out
    return {"mode": mode, "length": length, "seconds": seconds, "cpu_s": cpu_s, "extra_peak_bytes": extra, "input_bytes": inputs}


def worker_prefill(mode: str, length: int, threads: int, layers: int, decode: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dca import DCAConfig, apply_dca

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # SmolLM2-135M geometry (pipeline/engine/models.py loads the real one; random weights time the same).
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(cfg).eval()
    if mode == "dca":
        apply_dca(model, DCAConfig(pretraining_length=8192))
    ids = torch.randint(0, 49152, (1, length))
    with torch.inference_mode():
        model(ids[:, :64], logits_to_keep=1)  # warm-up: first-call allocations and kernel choice
        base = _reset_peak_rss()
        start, cpu = time.perf_counter(), time.process_time()
        # With the cache, as generation prefills: the same footprint at every length.
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill_s, prefill_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        peak = _peak_rss() - base
        result = {"mode": mode, "length": length, "layers": layers, "prefill_s": prefill_s,
                  "prefill_cpu_s": prefill_cpu_s, "extra_peak_bytes": peak}
        if decode:
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            times, cpu_times = [], []
            for _ in range(DECODE_TOKENS):
                start, cpu = time.perf_counter(), time.process_time()
                out = model(token, cache=cache, use_cache=True)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu)
                token = out.logits[:, -1:].argmax(-1)
            result["decode_ms_per_token"] = 1000 * sorted(times)[len(times) // 2]  # median
            result["decode_cpu_ms_per_token"] = 1000 * sorted(cpu_times)[len(cpu_times) // 2]
    return result


def run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(x):
    return f"{x / 2**20:,.0f}"


def bench_attention(lengths, threads):
    rows = []
    for n in lengths:
        for mode in ("sdpa", "dca"):
            r = run_worker(["attention", mode, str(n), str(threads)])
            rows.append(r)
            print(f"  attention {mode:5s} {n:>6}: {r['seconds']:7.2f} s, extra peak {_mib(r['extra_peak_bytes'])} MiB",
                  flush=True)
    dca = {r["length"]: r for r in rows if r["mode"] == "dca"}
    summary = {}
    if min(lengths) in dca and max(lengths) in dca:
        lo, hi = dca[min(lengths)], dca[max(lengths)]
        # inputs + what the call adds on top of them
        summary["dca_peak_ratio_max_over_min"] = (hi["extra_peak_bytes"] + hi["input_bytes"]) / (
            lo["extra_peak_bytes"] + lo["input_bytes"]
        )
        summary["dca_call_extra_ratio_max_over_min"] = hi["extra_peak_bytes"] / max(1, lo["extra_peak_bytes"])
    return rows, summary


def bench_prefill(lengths, threads, layers, decode_length):
    rows = []
    for n in lengths:
        for mode in ("sdpa", "dca"):
            r = run_worker(["prefill", mode, str(n), str(threads), str(layers), str(int(n == decode_length))])
            rows.append(r)
            dec = f", decode {r['decode_ms_per_token']:.1f} ms/token" if "decode_ms_per_token" in r else ""
            print(f"  prefill {mode:5s} {n:>6}: {r['prefill_s']:7.2f} s, extra peak {_mib(r['extra_peak_bytes'])} MiB{dec}", flush=True)
    by = {(r["mode"], r["length"]): r for r in rows}
    summary = {}
    for n in lengths:
        if ("dca", n) in by and ("sdpa", n) in by:
            summary[f"prefill_time_ratio_{n}"] = by[("dca", n)]["prefill_s"] / by[("sdpa", n)]["prefill_s"]
            summary[f"prefill_cpu_time_ratio_{n}"] = by[("dca", n)]["prefill_cpu_s"] / by[("sdpa", n)]["prefill_cpu_s"]
    if ("dca", 8192) in by and ("dca", 16384) in by:
        summary["dca_peak_ratio_16k_over_8k"] = by[("dca", 16384)]["extra_peak_bytes"] / by[("dca", 8192)]["extra_peak_bytes"]
    if ("dca", decode_length) in by and "decode_ms_per_token" in by[("dca", decode_length)]:
        summary["decode_time_ratio"] = (
            by[("dca", decode_length)]["decode_ms_per_token"] / by[("sdpa", decode_length)]["decode_ms_per_token"]
        )
        summary["decode_cpu_time_ratio"] = (
            by[("dca", decode_length)]["decode_cpu_ms_per_token"] / by[("sdpa", decode_length)]["decode_cpu_ms_per_token"]
        )
    return rows, summary


def print_table(result):
    print("\n| part | mode | tokens | wall (s) | CPU (s) | extra peak RSS (MiB) | decode wall / CPU (ms/token) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in result.get("attention", []):
        print(f"| attention call | {r['mode']} | {r['length']} | {r['seconds']:.2f} | {r['cpu_s']:.2f} "
              f"| {_mib(r['extra_peak_bytes'])} | |")
    for r in result.get("prefill", []):
        dec = f"{r['decode_ms_per_token']:.1f} / {r['decode_cpu_ms_per_token']:.1f}" if "decode_ms_per_token" in r else ""
        print(f"| prefill | {r['mode']} | {r['length']} | {r['prefill_s']:.2f} | {r['prefill_cpu_s']:.2f} "
              f"| {_mib(r['extra_peak_bytes'])} | {dec} |")
    print("\n| ratio | value | target |")
    print("| --- | ---: | --- |")
    targets = {
        "prefill_time_ratio_8192": "<= 1.25", "prefill_time_ratio_16384": "<= 1.25",
        "prefill_cpu_time_ratio_8192": "<= 1.25", "prefill_cpu_time_ratio_16384": "<= 1.25",
        "dca_peak_ratio_16k_over_8k": "<= 2.2", "decode_time_ratio": "<= 1.3",
        "dca_peak_ratio_max_over_min": "<= 4.5 (64k/16k)", "dca_call_extra_ratio_max_over_min": "<= 4.5 (64k/16k)",
        "decode_cpu_time_ratio": "<= 1.3",
    }
    for key, value in result["summary"].items():
        print(f"| {key} | {value:.3f} | {targets.get(key, '')} |")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *rest = sys.argv[2:]
        if kind == "attention":
            out = worker_attention(rest[0], int(rest[1]), int(rest[2]))
        else:
            out = worker_prefill(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4] == "1")
        print(json.dumps(out))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "attention", "prefill"], default="all")
    p.add_argument("--lengths", type=int, nargs="*", help="prefill lengths (default 4096 8192 16384 32768)")
    p.add_argument("--attention-lengths", type=int, nargs="*", default=[16384, 32768, 65536])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--decode-length", type=int, default=16384)
    p.add_argument("--output", default=str(RESULTS / "dca_bench.json"))
    args = p.parse_args()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "command": " ".join(sys.argv),
        "summary": {},
    }
    if args.part in ("all", "attention"):
        result["attention"], s = bench_attention(args.attention_lengths, args.threads)
        result["summary"].update(s)
    if args.part in ("all", "prefill"):
        lengths = args.lengths or [4096, 8192, 16384, 32768]
        result["prefill"], s = bench_prefill(lengths, args.threads, args.layers, args.decode_length)
        result["summary"].update(s)
    print_table(result)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

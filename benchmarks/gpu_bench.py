"""DCA against plain attention on one GPU, side by side in ONE process (issue 10's benchmark).

The stack: 2 decoder layers of Llama-2-70B as one rank of tensor parallelism 2 holds them (hidden
8192, 32 query heads, 4 KV heads, head_dim 128, intermediate 14336; vocab 32000), random bf16
weights, DCA with P = 4096 (S = 3072, W = 512, L = 2560, the production defaults).

  attention  one attention call, 16k-100k tokens: SDPA (flash) vs the DCA Triton kernel (keys
             already rotated, as the cache holds them), and the torch backend ("before")
  prefill    the stack at 32k, 64k, 100k: plain one-shot SDPA vs DCA chunked prefill (block L,
             the engine's DynamicCache, which the Triton path adopts), and the torch backend
  decode     one step at 32k and 100k, batch 1 and 4 (left-padded rows of 100/90/75/50% of the
             length), plain (SDPA, DynamicCache) vs DCA on a StaticKVCache, bf16 and int8 KV,
             eager and replayed from a CUDA graph (dca.graphs.CapturedDecodeStep)

Prints a table and writes benchmarks/results/gpu_bench.json (device, torch and triton versions,
commit, every row, the issue's targets and whether each is met).

    python benchmarks/gpu_bench.py                      # one H100/H200: < 3 minutes
    python benchmarks/gpu_bench.py --skip-before        # without the torch-backend rows
    python benchmarks/gpu_bench.py --smoke --output /tmp/gpu_bench_smoke.json
        # CPU, toy sizes, kernels through Triton's interpreter: checks the script runs end to end
        # (tests/test_gpu_bench_smoke.py); its timings mean nothing

DCA_TRITON_BLOCKS=rows,BN,warps,stages overrides the prefill kernel's tiles (tuning runs); on a GPU the
prefill tiles are swept first (TILE_CANDIDATES and the GPU's own list; --no-sweep keeps the list).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = dict(
    hidden=8192, heads=32, kv_heads=4, head_dim=128, intermediate=14336, vocab=32000, layers=2, pretraining=4096,
    attention=[16384, 32768, 65536, 100000], prefill=[32768, 65536, 100000], decode=[32768, 100000],
    batches=[1, 4], warm_tokens=4096, decode_steps=20, decode_warmup=2,
)
SMOKE = dict(
    hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=101, layers=2, pretraining=32,
    attention=[64], prefill=[64], decode=[48], batches=[2], warm_tokens=16, decode_steps=1, decode_warmup=0,
)
ROW_FRACTIONS = (1.0, 0.9, 0.75, 0.5)  # lengths of the left-padded decode rows
KV_LABEL = {"cuda": "bf16", "cpu": "model dtype"}  # the smoke run's model is float32
TARGETS = {
    "prefill_ratio_32768": 1.25, "prefill_ratio_65536": 1.10, "prefill_ratio_100000": 1.10,
    "attention_ratio_32768": 1.15, "attention_ratio_65536": 1.15, "attention_ratio_100000": 1.15,
    "decode_ms_100000_b1": 1.4, "decode_ms_100000_b4": 2.5, "int8_over_bf16_decode_100000_b1": 1.2,
    "int8_over_bf16_decode_100000_b4": 1.2, "prefill_peak_extra_gib_100000": 1.5,
}


class Timer:
    """Milliseconds of fn(): CUDA events on a GPU, perf_counter on CPU; the median of `reps`."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def __call__(self, fn, reps: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                self.torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)


def llama_config(shape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], max_position_embeddings=shape["pretraining"], rope_theta=10000.0,
    )


def stack_flops(shape, n: int) -> float:
    """Forward FLOPs of the stack over n tokens (causal attention counted once per visible pair)."""
    h, hq, hkv, d, inter = shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"], shape["intermediate"]
    linear = 2 * n * (h * hq * d * 2 + h * hkv * d * 2 + 3 * h * inter)
    return shape["layers"] * (linear + attention_flops(shape, n))


def attention_flops(shape, n: int) -> float:
    return 2.0 * shape["heads"] * shape["head_dim"] * n * (n + 1)  # QK and PV, n(n+1)/2 pairs, 2 flops each


def bench_attention(shape, config, device, timer, results, before: bool):
    import torch
    import torch.nn.functional as F

    from dca import triton_kernels
    from dca.attention import RopeTable, dca_attention, rotate_keys

    hq, hkv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device).float() / d))

    def build(ids, dtype):
        f = ids.float()[:, None] * inv
        e = torch.cat([f, f], -1)
        return e.cos().to(dtype), e.sin().to(dtype)

    rope = RopeTable(config, build)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for n in shape["attention"]:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, hq, n, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(1, hkv, n, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(1, hkv, n, d, device=device, dtype=dtype, generator=g)
        idx = torch.arange(n, device=device)[None]
        kr = rotate_keys(k, idx, rope)
        cos, sin = rope.tables(device, dtype)
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        scale = torch.full((1,), d**-0.5, device=device)
        reps = 3 if n < 65536 else 2

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        plain_kernel = "default"
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    sdpa()
                plain_kernel = "flash"

                def sdpa():  # noqa: F811
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            except RuntimeError:
                plain_kernel = "default (flash refused GQA)"
        rows = {"plain": timer(sdpa, reps),
                "dca_triton": timer(lambda: triton_kernels.prefill(q, kr, v, zero, zero + n, scale, cos, sin, config), reps)}
        if before:
            rows["dca_torch_before"] = timer(lambda: dca_attention(q, kr, v, idx, idx, rope, d**-0.5, backend="torch"), reps)
        flops = attention_flops(shape, n)
        for mode, ms in rows.items():
            results["attention"].append({"tokens": n, "mode": mode, "ms": ms, "tflops": flops / ms / 1e9,
                                         **({"sdpa_kernel": plain_kernel} if mode == "plain" else {})})
            print(f"  attention {n:>6} {mode:17s} {ms:9.2f} ms", flush=True)
        del q, k, v, kr
        empty_cache(device)


# Prefill tiles (rows = query heads x tokens, BLOCK_N, warps, stages) timed on the GPU before the
# measurements, besides this GPU's own list (dca.triton_kernels.CUDA_TILES). 64x64x4 and 64x32x4
# spill at head_dim 128 in the compile table: timed to see what that costs.
TILE_CANDIDATES = [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 3),
                   (64, 64, 4, 2), (64, 32, 4, 2)]


def sweep_prefill_tiles(shape, config, device, timer, results, n=32768):
    """Times the DCA prefill kernel at n tokens with each candidate tile and makes the fastest the
    first of this GPU's prefill list for the rest of the run (dca.triton_kernels.CUDA_TILES)."""
    import torch

    from dca import triton_kernels

    hq, hkv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, hq, n, d, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, hkv, n, d, device=device, dtype=torch.bfloat16, generator=g)
    cos = torch.randn(config.chunk_size + 1, d, device=device, dtype=torch.bfloat16)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    scale = torch.full((1,), d**-0.5, device=device)
    major, minor = torch.cuda.get_device_capability(device)
    lists = triton_kernels.CUDA_TILES[triton_kernels.arch_family(major * 10 + minor)]
    default = list(lists["prefill"])
    rows = []
    for tiles in default + [t for t in TILE_CANDIDATES if t not in default]:
        lists["prefill"] = [tiles]
        try:
            ms = timer(lambda: triton_kernels.prefill(q, k, k, zero, zero + n, scale, cos, cos, config), 3)
            rows.append({"tiles": list(tiles), "ms": ms, "in_list": tiles in default})
        except triton_kernels.KernelUnavailable as error:
            rows.append({"tiles": list(tiles), "error": str(error)[:300], "in_list": tiles in default})
        print(f"  prefill tiles {tiles}: {rows[-1].get('ms', rows[-1].get('error'))}", flush=True)
    best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"], default=None)
    chosen = [tuple(best["tiles"])] if best else []
    lists["prefill"] = chosen + [t for t in default if t not in chosen]
    results["prefill_tile_sweep"] = {"tokens": n, "rows": rows, "chosen": best["tiles"] if best else None,
                                     "list_before": [list(t) for t in default]}
    del q, k


def empty_cache(device):
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_prefill(model, ids, mode, timer, device, shape, chunked: bool, reps: int) -> dict:
    import torch
    from transformers import DynamicCache

    from dca.prefill import chunked_prefill

    def run():
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            if chunked:
                chunked_prefill(model, ids, cache)
            else:
                model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        return cache

    ms = timer(run, reps, warmup=0)
    row = {"tokens": ids.shape[1], "mode": mode, "ms": ms, "tflops": stack_flops(shape, ids.shape[1]) / ms / 1e9}
    if device.type == "cuda":
        torch.cuda.synchronize()
        empty_cache(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        cache = run()
        torch.cuda.synchronize()
        row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30  # KV cache included
        del cache
    return row


def bench_prefill(model, mode, shape, device, timer, results, chunked: bool):
    import torch

    with torch.inference_mode():  # warm-up: kernel compilation, allocator
        warm = torch.randint(0, shape["vocab"], (1, shape["warm_tokens"]), device=device)
        measure_prefill(model, warm, mode, timer, device, shape, chunked, reps=1)
    for n in shape["prefill"]:
        ids = torch.randint(0, shape["vocab"], (1, n), device=device)
        try:
            row = measure_prefill(model, ids, mode, timer, device, shape, chunked, reps=2 if n >= 65536 else 3)
        except torch.OutOfMemoryError:
            row = {"tokens": n, "mode": mode, "error": "out of memory"}
        results["prefill"].append(row)
        print(f"  prefill {n:>6} {mode:17s} {row.get('ms', float('nan')):9.1f} ms, "
              f"peak extra {row.get('peak_extra_gib', float('nan')):.2f} GiB", flush=True)
        empty_cache(device)


def decode_lengths(n: int, batch: int) -> list[int]:
    return [int(n * f) for f in ROW_FRACTIONS[:batch]]


def decode_inputs(shape, n, batch, device):
    import torch

    lengths = decode_lengths(n, batch)
    mask = torch.zeros(batch, n + 1, dtype=torch.long, device=device)
    for r, length in enumerate(lengths):
        mask[r, n - length :] = 1  # left padding: every row ends at the last column
    ids = torch.randint(0, shape["vocab"], (batch, 1), device=device)
    return lengths, mask, ids


def bench_plain_decode(model, shape, device, timer, results, label="plain"):
    """SDPA and a DynamicCache holding random K/V (the length is restored after every step)."""
    import torch
    from transformers import DynamicCache

    for n in shape["decode"]:
        for batch in shape["batches"]:
            lengths, mask, ids = decode_inputs(shape, n, batch, device)
            cache = DynamicCache(config=model.config)
            dtype = next(model.parameters()).dtype
            for layer in range(shape["layers"]):
                kv = torch.randn(batch, shape["kv_heads"], n, shape["head_dim"], device=device, dtype=dtype)
                cache.update(kv, kv.clone(), layer)
            positions = (mask.sum(-1, keepdim=True) - 1)

            def step():
                with torch.inference_mode():
                    model(ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
                cache.crop(-1)

            ms = timer(step, shape["decode_steps"], warmup=shape["decode_warmup"])
            add_decode_row(results, shape, model, n, batch, label, KV_LABEL[device.type], "eager", ms, lengths)
            del cache
            empty_cache(device)


def bench_dca_decode(model, shape, device, timer, results, kv_dtypes=("auto", "int8"), graphs=True, label="dca_triton"):
    """A StaticKVCache holding random K/V: one masked step records the row starts, then maskless
    steps, eager and (on CUDA) replayed from a CUDA graph."""
    import torch

    from dca import set_prompt_length
    from dca.cache import StaticKVCache
    from dca.graphs import CapturedDecodeStep, set_cache_length

    steps = shape["decode_steps"]
    for n in shape["decode"]:
        for batch in shape["batches"]:
            for kv_dtype in kv_dtypes:
                lengths, mask, ids = decode_inputs(shape, n, batch, device)
                cache = StaticKVCache(max_tokens=n + 2 * steps + 8, kv_dtype=kv_dtype)
                dtype = next(model.parameters()).dtype
                probe = torch.empty(batch, shape["kv_heads"], 1, shape["head_dim"], device=device, dtype=dtype)
                for _ in range(shape["layers"]):
                    layer = cache.layer_class_to_replicate()
                    k, v, k_scale, v_scale = layer.reserve(probe, cache.max_tokens)
                    if kv_dtype == "int8":
                        k.random_(-127, 128), v.random_(-127, 128), k_scale.uniform_(0.005, 0.02), v_scale.uniform_(0.005, 0.02)
                    else:
                        k.normal_(), v.normal_()
                    layer.length = n
                    cache.layers.append(layer)
                set_prompt_length(cache, torch.tensor(lengths))
                with torch.inference_mode():  # the masked step: per-row starts recorded on the cache
                    model(ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)

                def step():
                    with torch.inference_mode():
                        model(ids, cache=cache, use_cache=True, logits_to_keep=1)

                name = "int8" if kv_dtype == "int8" else KV_LABEL[device.type]
                ms = timer(step, steps, warmup=shape["decode_warmup"])
                add_decode_row(results, shape, model, n, batch, label, name, "eager", ms, lengths)
                if graphs and device.type == "cuda":
                    set_cache_length(cache, n + 1)
                    try:
                        captured = CapturedDecodeStep(model, cache)
                        ms = timer(lambda: captured(ids), steps, warmup=1)
                        add_decode_row(results, shape, model, n, batch, label, name, "cuda_graph", ms, lengths)
                    except Exception as error:  # noqa: BLE001 - reported, not fatal
                        results["decode"].append({"tokens": n, "batch": batch, "mode": label, "kv": name,
                                                  "step": "cuda_graph", "error": repr(error)[:500]})
                        print(f"  decode {n} b{batch} {name} cuda_graph failed: {error!r}", flush=True)
                del cache
                empty_cache(device)


def add_decode_row(results, shape, model, n, batch, mode, kv, step, ms, lengths):
    embed = model.model.embed_tokens.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - embed.numel() * embed.element_size()
    per_token = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"]
    kv_bytes = per_token * sum(lengths) * (1 + 4 / shape["head_dim"] if kv == "int8" else 2)
    row = {"tokens": n, "batch": batch, "mode": mode, "kv": kv, "step": step, "ms": ms,
           "gb_per_s": (weights + kv_bytes) / ms / 1e6}
    results["decode"].append(row)
    print(f"  decode {n:>6} b{batch} {mode:17s} {kv} {step:10s} {ms:8.3f} ms, {row['gb_per_s']:7.0f} GB/s", flush=True)


def summarise(results) -> dict:
    def find(section, **keys):
        for row in results[section]:
            if all(row.get(k) == v for k, v in keys.items()) and "ms" in row:
                return row
        return None

    summary = {}
    for n in {r["tokens"] for r in results["prefill"]}:
        a, b = find("prefill", tokens=n, mode="dca_triton"), find("prefill", tokens=n, mode="plain")
        if a and b:
            summary[f"prefill_ratio_{n}"] = a["ms"] / b["ms"]
        if a and "peak_extra_gib" in a:
            summary[f"prefill_peak_extra_gib_{n}"] = a["peak_extra_gib"]
    for n in {r["tokens"] for r in results["attention"]}:
        a, b = find("attention", tokens=n, mode="dca_triton"), find("attention", tokens=n, mode="plain")
        if a and b:
            summary[f"attention_ratio_{n}"] = a["ms"] / b["ms"]
    for n in {r["tokens"] for r in results["decode"]}:
        for batch in {r["batch"] for r in results["decode"]}:
            best = {}
            for kv in ("bf16", "model dtype", "int8"):
                rows = [r for r in results["decode"] if r.get("tokens") == n and r.get("batch") == batch
                        and r.get("mode") == "dca_triton" and r.get("kv") == kv and "ms" in r]
                if rows:
                    best[kv] = min(r["ms"] for r in rows)  # the CUDA graph when it ran
            full = best.get("bf16", best.get("model dtype"))
            if full is not None:
                summary[f"decode_ms_{n}_b{batch}"] = full
                if "int8" in best:
                    summary[f"int8_over_bf16_decode_{n}_b{batch}"] = best["int8"] / full
    return {k: {"value": v, "target": TARGETS.get(k), "met": (v <= TARGETS[k]) if k in TARGETS else None}
            for k, v in sorted(summary.items())}


def print_tables(results):
    print("\n| part | tokens | batch | mode | KV | step | ms | TFLOP/s | GB/s | peak extra GiB |")
    print("| --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for part in ("attention", "prefill", "decode"):
        for r in results[part]:
            ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "")
            tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
            gb = f"{r['gb_per_s']:.0f}" if "gb_per_s" in r else ""
            mem = f"{r['peak_extra_gib']:.2f}" if "peak_extra_gib" in r else ""
            print(f"| {part} | {r['tokens']} | {r.get('batch', 1)} | {r['mode']} | {r.get('kv', '')} | "
                  f"{r.get('step', '')} | {ms} | {tf} | {gb} | {mem} |")
    print("\n| measure | value | target | met |\n| --- | ---: | ---: | --- |")
    for key, s in results["summary"].items():
        target = "" if s["target"] is None else f"<= {s['target']}"
        print(f"| {key} | {s['value']:.3f} | {target} | {'' if s['met'] is None else s['met']} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU through Triton's interpreter")
    p.add_argument("--skip-before", action="store_true", help="skip the torch-backend ('before') rows")
    p.add_argument("--parts", nargs="*", default=["attention", "prefill", "decode"])
    p.add_argument("--no-sweep", action="store_true", help="keep the tile lists (scripts/gpu_check.py sweeps first)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gpu_bench.json"))
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before dca.triton_kernels is imported
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_bench: CUDA is not available here (use --smoke on CPU to check the script runs)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the interpreter's numpy threads and torch's would fight over the cores
    shape = SMOKE if args.smoke else FULL
    import triton

    from dca import DCAConfig, apply_dca

    t0 = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke: Triton interpreter)",
        "torch": torch.__version__, "triton": triton.__version__,
        "commit": commit + ("-dirty" if dirty else ""), "smoke": args.smoke, "shape": shape,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "attention": [], "prefill": [], "decode": [],
    }
    print({k: results[k] for k in ("device", "torch", "triton", "commit")}, flush=True)
    config = DCAConfig(shape["pretraining"])
    timer = Timer(device)
    before = not args.skip_before
    if device.type == "cuda" and not os.environ.get("DCA_TRITON_BLOCKS") and not args.no_sweep:
        sweep_prefill_tiles(shape, config, device, timer, results)
    if "attention" in args.parts:
        bench_attention(shape, config, device, timer, results, before)
    if {"prefill", "decode"} & set(args.parts):
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape)).to(dtype).eval()
        model.set_attn_implementation("sdpa")
        if "prefill" in args.parts:
            bench_prefill(model, "plain", shape, device, timer, results, chunked=False)
        if "decode" in args.parts:
            bench_plain_decode(model, shape, device, timer, results)
        apply_dca(model, config)  # "auto": the Triton kernels on CUDA
        if device.type == "cpu":
            apply_dca(model, DCAConfig(shape["pretraining"], backend="triton"))
        if "prefill" in args.parts:
            bench_prefill(model, "dca_triton", shape, device, timer, results, chunked=True)
        if "decode" in args.parts:
            bench_dca_decode(model, shape, device, timer, results)
        if before:
            apply_dca(model, DCAConfig(shape["pretraining"], backend="torch"))
            if "prefill" in args.parts:
                bench_prefill(model, "dca_torch_before", shape, device, timer, results, chunked=True)
            if "decode" in args.parts:
                bench_plain_decode(model, shape, device, timer, results, label="dca_torch_before")
    results["summary"] = summarise(results)
    results["seconds"] = time.time() - t0
    print_tables(results)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()

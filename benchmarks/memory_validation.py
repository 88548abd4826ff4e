"""Measured peak memory of a request against the memory planner's prediction (pipeline/memory_plan.py).

CPU (what docs/memory.md records):

    .venv/bin/python benchmarks/memory_validation.py --device cpu --out results/memory_cpu.jsonl

Every case runs in a fresh subprocess: random-weight model built from a config (fp32, DCA applied,
torch attention backend), then the request (prefill, one-shot or chunked, then greedy decode
steps). Peak = the process's peak RSS during the request (VmHWM, reset through
/proc/self/clear_refs once the model is built), minus its RSS before the model was built.
tracemalloc does not see torch's allocations. The subprocesses run with MALLOC_MMAP_THRESHOLD_
fixed, so glibc returns freed large blocks to the OS and RSS follows live tensor memory (as
torch.cuda.max_memory_allocated does on a GPU) instead of the heap's high-water mark.

GPU (a machine with CUDA; not run in this project's CPU-only CI):

    python benchmarks/memory_validation.py --device cuda --layers 2 --lengths 32768 65536 100000

builds a Llama-2-70B-shaped stack of `--layers` decoder layers with the dimensions of ONE rank at
tensor-parallel 2 (32 query heads, 4 KV heads, intermediate 14336, hidden 8192), random bf16
weights, and measures torch.cuda.max_memory_allocated per request. Depth-independent terms
(activations, logits) are measured as they are; weights and KV cache scale with depth, so the
full-depth figure is the measured peak plus (80 - layers) x (one layer's weights + one layer's
KV cache), compared with the planner's prediction for Llama-2-70B at tp=2 without its
runtime_overhead (the allocator does not see the CUDA context).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.memory_plan import MiB, MemoryPlan, ModelShape, ServingConfig  # noqa: E402

# Llama-layout shapes measured on CPU (random weights). P is DCA's pretraining_length.
CPU_SHAPES = {
    "tiny": dict(num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=768,
                 vocab_size=8192, tie_word_embeddings=False, pretraining_length=2048),
    "smollm2": dict(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                    vocab_size=49152, tie_word_embeddings=True, pretraining_length=2048),
}

# (shape, prompt tokens, prefill block (None = one shot), kv dtype, batch)
CPU_CASES = [
    ("tiny", 4096, None, "float32", 1),
    ("tiny", 4096, 1280, "float32", 1),
    ("tiny", 16384, None, "float32", 1),
    ("tiny", 16384, 1280, "float32", 1),
    ("tiny", 16384, 512, "float32", 1),
    ("tiny", 16384, 1280, "int8", 1),
    ("tiny", 16384, None, "int8", 1),
    ("tiny", 4096, 1280, "float32", 4),
    ("smollm2", 2048, None, "float32", 1),
    ("smollm2", 8192, None, "float32", 1),
    ("smollm2", 8192, 1280, "float32", 1),
    ("smollm2", 8192, 1280, "int8", 1),
    ("smollm2", 8192, None, "int8", 1),
]

# One rank of Llama-2-70B at tp=2, for the GPU run.
LLAMA2_70B_RANK = dict(hidden_size=8192, num_heads=32, num_kv_heads=4, head_dim=128, intermediate_size=14336,
                       vocab_size=32000, tie_word_embeddings=False, pretraining_length=4096)


# --- measuring, inside the worker subprocess -------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


class _Meter:
    """Peak bytes of what runs between start() and peak(): CUDA allocator peak or process RSS peak."""

    def __init__(self, device):
        self.device = device

    def current(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _status_kib("VmRSS") * 1024

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_kib("VmHWM") * 1024


def run_case(case: dict) -> dict:
    """Builds the model, runs one request, returns measured bytes."""
    import torch

    torch.set_num_threads(case.get("threads", 2))
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from dca import DCAConfig, apply_dca
    from dca.kv_quant import Int8KVCache
    from dca.prefill import chunked_prefill

    device = torch.device(case["device"])
    dtype = getattr(torch, case["dtype"])
    s = case["shape"]
    meter = _Meter(device)
    _warm_up(device, dtype, case["kv_dtype"])
    base = meter.current()
    config = LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        head_dim=s["head_dim"], max_position_embeddings=s["pretraining_length"],
        tie_word_embeddings=s["tie_word_embeddings"], rope_theta=10000.0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    apply_dca(model, DCAConfig(pretraining_length=s["pretraining_length"], backend="torch"))
    import gc

    gc.collect()
    after_model = meter.current()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, s["vocab_size"], (case["batch"], case["prompt_tokens"]), generator=g).to(device)
    cache = Int8KVCache() if case["kv_dtype"] == "int8" else DynamicCache()

    meter.start()
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = chunked_prefill(model, ids, cache, block_size=case["prefill_block"] or case["prompt_tokens"])
        prefill_peak = meter.peak()
        for _ in range(case["new_tokens"]):
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(nxt, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    peak = meter.peak()
    seconds = time.perf_counter() - t0
    if isinstance(cache, Int8KVCache):
        kv_bytes = cache.nbytes()
    else:
        kv_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    return dict(
        weights_measured=after_model - base,
        peak_over_model=peak - after_model,
        prefill_peak_over_model=prefill_peak - after_model,
        peak_total=peak - base,
        kv_measured=kv_bytes,
        seconds=round(seconds, 1),
    )


def _warm_up(device, dtype, kv_dtype) -> None:
    """Runs the whole code path once on a toy model, so lazily imported modules and kernel
    initialisation are in the baseline, not in the measured numbers."""
    import gc

    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from dca import DCAConfig, apply_dca
    from dca.kv_quant import Int8KVCache
    from dca.prefill import chunked_prefill

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    apply_dca(model, DCAConfig(pretraining_length=32, backend="torch"))
    cache = Int8KVCache() if kv_dtype == "int8" else DynamicCache()
    with torch.inference_mode():
        logits = chunked_prefill(model, torch.ones(1, 70, dtype=torch.long, device=device), cache, block_size=20)
        model(logits.argmax(-1, keepdim=True), cache=cache, use_cache=True, logits_to_keep=1)
    del model, cache, logits
    gc.collect()


# --- the driver ------------------------------------------------------------------------------


def predict(shape: dict, case: dict, device: str) -> dict:
    shape_obj = ModelShape(name=case["name"], **shape)
    config = ServingConfig(
        tp_size=1, weight_dtype=case["dtype"], compute_dtype=case["dtype"], kv_dtype=case["kv_dtype"],
        prefill_block=case["prefill_block"], logits="last", attention_backend="torch", device=device,
    )
    plan = MemoryPlan(shape_obj, config)
    e = plan.estimate(case["prompt_tokens"], case["new_tokens"], case["batch"])
    return e.to_dict()


def run_in_subprocess(case: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), OMP_NUM_THREADS=str(case.get("threads", 2)))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True, env=env, cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_cases(args) -> list[dict]:
    cases = []
    for name, n, block, kv, batch in CPU_CASES:
        if args.only and name not in args.only:
            continue
        cases.append(dict(name=name, shape=CPU_SHAPES[name], prompt_tokens=n, prefill_block=block, kv_dtype=kv,
                          batch=batch, new_tokens=args.new_tokens, dtype="float32", device="cpu",
                          threads=args.threads))
    return cases


def cuda_cases(args) -> list[dict]:
    shape = dict(LLAMA2_70B_RANK, num_layers=args.layers)
    cases = []
    for n in args.lengths:
        for kv in ("bfloat16", "int8"):
            cases.append(dict(name=f"llama2-70b-rank-{args.layers}L", shape=shape, prompt_tokens=n, prefill_block=2560,
                              kv_dtype=kv, batch=1, new_tokens=args.new_tokens, dtype="bfloat16", device="cuda"))
    return cases


def cpu_row(case: dict, measured: dict) -> dict:
    pred = predict(case["shape"], case, "cpu")
    dyn_pred = pred["kv_cache"] + pred["activations"] + pred["logits"]
    return dict(
        model=case["name"], prompt_tokens=case["prompt_tokens"], prefill_block=case["prefill_block"] or "one-shot",
        kv_dtype=case["kv_dtype"], batch=case["batch"], new_tokens=case["new_tokens"],
        measured_total_mib=measured["peak_total"] / MiB, predicted_total_mib=pred["total"] / MiB,
        total_error=(pred["total"] - measured["peak_total"]) / measured["peak_total"],
        measured_dynamic_mib=measured["peak_over_model"] / MiB, predicted_dynamic_mib=dyn_pred / MiB,
        dynamic_error=(dyn_pred - measured["peak_over_model"]) / measured["peak_over_model"],
        measured_weights_mib=measured["weights_measured"] / MiB, predicted_weights_mib=pred["weights"] / MiB,
        measured_kv_mib=measured["kv_measured"] / MiB, predicted_kv_mib=pred["kv_cache"] / MiB,
        peak_phase=pred["peak_phase"], seconds=measured["seconds"],
    )


def cuda_row(case: dict, measured: dict, full_layers: int = 80) -> dict:
    layers = case["shape"]["num_layers"]
    shape70 = ModelShape.load("llama2-70b")
    plan = MemoryPlan(shape70, ServingConfig(tp_size=2, kv_dtype=case["kv_dtype"], prefill_block=case["prefill_block"],
                                             attention_backend="torch"))
    pred = plan.estimate(case["prompt_tokens"], case["new_tokens"], case["batch"])
    per_layer_weights = (plan.weight_bytes() - MemoryPlan(
        ModelShape(**{**shape70.__dict__, "num_layers": 1}), plan.config).weight_bytes()) / (full_layers - 1)
    per_layer_kv = measured["kv_measured"] / layers
    scaled = measured["peak_total"] + (full_layers - layers) * (per_layer_weights + per_layer_kv)
    predicted = pred.total - pred.runtime_overhead
    return dict(
        model=case["name"], prompt_tokens=case["prompt_tokens"], prefill_block=case["prefill_block"],
        kv_dtype=case["kv_dtype"], new_tokens=case["new_tokens"],
        measured_stack_gib=measured["peak_total"] / 2**30, measured_scaled_gib=scaled / 2**30,
        predicted_gib=predicted / 2**30, error=(predicted - scaled) / scaled,
        measured_dynamic_gib=measured["peak_over_model"] / 2**30,
        predicted_activations_logits_gib=(pred.activations + pred.logits) / 2**30, seconds=measured["seconds"],
    )


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        cells = [f"{v:.1f}" if isinstance(v, float) and not k.endswith("error") else
                 (f"{v:+.1%}" if k.endswith("error") else str(v)) for k, v in r.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", help="CPU shapes to run (tiny, smollm2)")
    p.add_argument("--layers", type=int, default=2, help="cuda: decoder layers in the 70B-shaped stack")
    p.add_argument("--lengths", type=int, nargs="*", default=[32768, 65536, 100000], help="cuda: prompt tokens")
    p.add_argument("--out", help="append JSON lines here")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda needs a CUDA GPU; none is visible", file=sys.stderr)
            return 2
    cases = cpu_cases(args) if args.device == "cpu" else cuda_cases(args)
    rows = []
    for case in cases:
        measured = run_in_subprocess(case)
        row = cpu_row(case, measured) if args.device == "cpu" else cuda_row(case, measured)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps({**row, "raw": measured}) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

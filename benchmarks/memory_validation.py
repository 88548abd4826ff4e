"""Measured peak memory of a request against the memory planner's prediction (pipeline/engine/memory_plan.py),
and the quality cost of the int8 KV cache.

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

int8 KV cost on the embedded SmolLM2-135M at 16k tokens (2x its training length), DCA defaults:

    .venv/bin/python benchmarks/memory_validation.py --kv-quality --length 16384

feeds the same window of Paradise Lost through two caches (full precision and dca.kv_quant's
int8) block by block and reports perplexity of each, KL(full || int8) and top-1 agreement of the
next-token distributions, then runs passkey retrieval at a few depths with each cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.engine.memory_plan import MiB, MemoryPlan, ModelShape, ServingConfig  # noqa: E402

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
    ("tiny", 16384, 640, "float32", 1),
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
        tp_size=1, weight_dtype=case["dtype"], compute_dtype=case["dtype"], kv_cache_dtype=case["kv_dtype"],
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


def _parse_case(text: str) -> tuple:
    """'smollm2:4096:1280:int8:1' -> ("smollm2", 4096, 1280, "int8", 1); block 'none' = one shot."""
    name, n, block, kv, batch = text.split(":")
    return name, int(n), None if block == "none" else int(block), kv, int(batch)


def cpu_cases(args) -> list[dict]:
    cases = []
    for name, n, block, kv, batch in ([_parse_case(c) for c in args.case] if args.case else CPU_CASES):
        if args.only and name not in args.only:
            continue
        cases.append(dict(name=name, shape=CPU_SHAPES[name], prompt_tokens=n, prefill_block=block, kv_dtype=kv,
                          batch=batch, new_tokens=args.new_tokens, dtype="float32", device="cpu",
                          threads=args.threads))
    return cases


def cuda_cases(args) -> list[dict]:
    shape = dict(LLAMA2_70B_RANK, num_layers=args.layers)
    cases = []
    name = f"llama2-70b-rank-{args.layers}L"
    common = dict(name=name, shape=shape, batch=1, new_tokens=args.new_tokens, dtype="bfloat16", device="cuda")
    for n in args.lengths:
        for kv in ("bfloat16", "int8"):
            cases.append(dict(common, prompt_tokens=n, prefill_block=2560, kv_dtype=kv))
    # One-shot prefill at the shortest length (its activations grow with the prompt).
    cases.append(dict(common, prompt_tokens=min(args.lengths), prefill_block=None, kv_dtype="bfloat16"))
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
    # The stack itself: the planner for the rank's shape at tp=1 and this depth, without overhead.
    stack = MemoryPlan(ModelShape(name=case["name"], **case["shape"]), ServingConfig(
        tp_size=1, kv_cache_dtype=case["kv_dtype"], prefill_block=case["prefill_block"], attention_backend="torch",
    )).estimate(case["prompt_tokens"], case["new_tokens"], case["batch"])
    stack_dynamic = stack.kv_cache + stack.activations + stack.logits
    # Full depth: Llama-2-70B at tp=2; measured = stack peak + the missing layers' weights and KV.
    shape70 = ModelShape.load("llama2-70b")
    config70 = ServingConfig(tp_size=2, kv_cache_dtype=case["kv_dtype"], prefill_block=case["prefill_block"],
                             attention_backend="torch")
    plan = MemoryPlan(shape70, config70)
    pred = plan.estimate(case["prompt_tokens"], case["new_tokens"], case["batch"])
    one_layer = MemoryPlan(dataclasses.replace(shape70, num_layers=1), config70).weight_bytes()
    per_layer_weights = (plan.weight_bytes() - one_layer) / (full_layers - 1)
    per_layer_kv = measured["kv_measured"] / layers
    scaled = measured["peak_total"] + (full_layers - layers) * (per_layer_weights + per_layer_kv)
    predicted = pred.total - pred.runtime_overhead
    return dict(
        model=case["name"], prompt_tokens=case["prompt_tokens"], prefill_block=case["prefill_block"] or "one-shot",
        kv_dtype=case["kv_dtype"], new_tokens=case["new_tokens"],
        measured_stack_dynamic_gib=measured["peak_over_model"] / 2**30,
        predicted_stack_dynamic_gib=stack_dynamic / 2**30,
        stack_error=(stack_dynamic - measured["peak_over_model"]) / measured["peak_over_model"],
        measured_scaled_gib=scaled / 2**30, predicted_full_gib=predicted / 2**30,
        full_error=(predicted - scaled) / scaled, seconds=measured["seconds"],
    )


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        cells = [f"{v:.1f}" if isinstance(v, float) and not k.endswith("error") else
                 (f"{v:+.1%}" if k.endswith("error") else str(v)) for k, v in r.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kv_quality(args) -> dict:
    """Perplexity, logit divergence and passkey retrieval of SmolLM2 with a full-precision vs int8 KV cache."""
    import torch

    torch.set_num_threads(args.threads)
    from transformers import DynamicCache

    from dca.hf import dca_config_of
    from dca.kv_quant import Int8KVCache
    from dca.prefill import chunked_prefill
    import evaluation
    from pipeline.config.model import ModelSpec
    from pipeline.engine.models import load_model, load_tokenizer

    spec = ModelSpec()
    model = load_model(spec, device="cpu")
    tokenizer = load_tokenizer(spec)
    dca = dca_config_of(model)
    n = args.length
    ids = evaluation.encode(tokenizer, evaluation.read_book("plrabn12.txt"))[:n]
    if len(ids) < n:
        raise SystemExit(f"plrabn12.txt has {len(ids)} tokens, fewer than --length {n}")
    x = torch.tensor([ids])
    if args.passkey_only:
        return _passkey(args, model, tokenizer, n, {"length": n, "passkey": []}, time.perf_counter())
    caches = {"full": DynamicCache(), "int8": Int8KVCache()}
    nll = {k: 0.0 for k in caches}
    kl_sum, agree, max_abs, count = 0.0, 0, 0.0, 0
    t0 = time.perf_counter()
    for start in range(0, n, args.block):
        stop = min(n, start + args.block)
        logp = {}
        with torch.inference_mode():
            for name, cache in caches.items():
                out = model(x[:, start:stop], cache=cache, use_cache=True)
                logp[name] = torch.log_softmax(out.logits[0].float(), dim=-1)  # (T, V)
                del out
        targets = x[0, start + 1 : stop + 1]
        rows = targets.shape[0]  # the window's last token has no target
        for name in caches:
            nll[name] -= float(logp[name][torch.arange(rows), targets].sum())
        p_full = logp["full"].exp()
        kl_sum += float((p_full * (logp["full"] - logp["int8"])).sum())
        agree += int((logp["full"].argmax(-1) == logp["int8"].argmax(-1)).sum())
        max_abs = max(max_abs, float((logp["full"] - logp["int8"]).abs().max()))
        count += stop - start
        del logp, p_full
        print(f"  block {start}-{stop} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    tokens = n - 1
    result = {
        "model": "SmolLM2-135M-Instruct (embedded, float32)", "dca": dca.to_dict(), "length": n,
        "text": "plrabn12.txt tokens 0..", "ppl_full": math.exp(nll["full"] / tokens),
        "ppl_int8": math.exp(nll["int8"] / tokens), "mean_kl_full_int8": kl_sum / count,
        "top1_agreement": agree / count, "max_abs_logprob_diff": max_abs,
        "kv_bytes_full": sum(l.keys.numel() * l.keys.element_size() * 2 for l in caches["full"].layers),
        "kv_bytes_int8": caches["int8"].nbytes(), "passkey": [],
    }
    del caches
    _emit(result, args.out)
    return _passkey(args, model, tokenizer, n, result, t0)


def _passkey(args, model, tokenizer, n: int, result: dict, t0: float) -> dict:
    import torch
    from transformers import DynamicCache

    from dca.kv_quant import Int8KVCache
    from dca.prefill import chunked_prefill
    import evaluation

    for depth in args.depths:
        key = evaluation.make_passkey(int(depth * 1000))
        prompt = evaluation.build_passkey_prompt(tokenizer, n, depth, key, kind="repeat")
        px = torch.tensor([prompt.input_ids])
        row = {"depth": depth, "key": key}
        for name, make in (("full", DynamicCache), ("int8", Int8KVCache)):
            cache = make()
            with torch.inference_mode():
                logits = chunked_prefill(model, px, cache)
                answer = []
                for _ in range(8):
                    nxt = logits.argmax(-1, keepdim=True)
                    answer.append(int(nxt))
                    logits = model(nxt, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            text = tokenizer.decode(answer, skip_special_tokens=True)
            row[name] = {"answer": text, "correct": evaluation.passkey_correct(text, key)}
            del cache
            print(f"  passkey depth {depth} {name}: {text!r} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
        result["passkey"].append(row)
        _emit({"passkey": row, "length": n}, args.out)
    result["seconds"] = round(time.perf_counter() - t0)
    return result


def _emit(record: dict, out: str | None) -> None:
    """Partial results as they come (a 16k run takes long on 2 cores)."""
    print(json.dumps(record), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def kv_tiny(args) -> list[dict]:
    """Logit difference of the int8 KV cache against a full-precision one on tiny random models (float32)."""
    import torch

    torch.set_num_threads(args.threads)
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from dca import DCAConfig, apply_dca
    from dca.kv_quant import Int8KVCache

    rows = []
    for name, shape in CPU_SHAPES.items():
        if name != "tiny":
            continue
        for heads, kv_heads, head_dim in ((8, 2, 32), (4, 4, 64), (8, 2, 128)):
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=heads * head_dim,
                                 intermediate_size=3 * heads * head_dim, num_hidden_layers=shape["num_layers"],
                                 num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                                 max_position_embeddings=2048)
            model = LlamaForCausalLM(config).eval()
            apply_dca(model, DCAConfig(pretraining_length=2048, backend="torch"))
            x = torch.randint(1, shape["vocab_size"], (1, args.tiny_length), generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                full = model(x, cache=DynamicCache(), use_cache=True).logits[0].float()
                q = model(x, cache=Int8KVCache(), use_cache=True).logits[0].float()
            lp_full, lp_q = torch.log_softmax(full, -1), torch.log_softmax(q, -1)
            rows.append(dict(
                model=f"tiny {shape['num_layers']}L heads {heads}/{kv_heads} head_dim {head_dim}", tokens=args.tiny_length,
                max_abs_logit_diff=float((full - q).abs().max()), logit_std=float(full.std()),
                max_diff_over_std=float((full - q).abs().max() / full.std()),
                mean_kl=float((lp_full.exp() * (lp_full - lp_q)).sum(-1).mean()),
                top1_agreement=float((full.argmax(-1) == q.argmax(-1)).float().mean()),
            ))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", help="CPU shapes to run (tiny, smollm2)")
    p.add_argument("--case", action="append", help="CPU case MODEL:PROMPT:BLOCK|none:KV:BATCH (repeatable)")
    p.add_argument("--layers", type=int, default=2, help="cuda: decoder layers in the 70B-shaped stack")
    p.add_argument("--lengths", type=int, nargs="*", default=[32768, 65536, 100000], help="cuda: prompt tokens")
    p.add_argument("--out", help="append JSON lines here")
    p.add_argument("--kv-quality", action="store_true", help="int8 KV cost on SmolLM2 instead of memory")
    p.add_argument("--length", type=int, default=16384, help="--kv-quality: tokens")
    p.add_argument("--block", type=int, default=2048, help="--kv-quality: tokens per forward")
    p.add_argument("--depths", type=float, nargs="*", default=[0.25, 0.75], help="--kv-quality: passkey depths")
    p.add_argument("--passkey-only", action="store_true", help="--kv-quality: skip the perplexity part")
    p.add_argument("--kv-tiny", action="store_true", help="int8 KV logit difference on tiny random models")
    p.add_argument("--tiny-length", type=int, default=3000, help="--kv-tiny: tokens")
    args = p.parse_args(argv)
    if args.kv_tiny:
        print(markdown(kv_tiny(args)))
        return 0
    if args.kv_quality:
        kv_quality(args)
        return 0
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

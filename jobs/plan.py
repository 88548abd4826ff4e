"""Print the memory plan of a model on a device: what a request needs per GPU, and what fits.

    python -m jobs.plan --model llama2-70b --tp 2 --gpu-memory a100-80g \\
        --prompt-tokens 100000 --new-tokens 512 --kv-dtype int8
    python -m jobs.plan --model llama2-70b --tp 2 --gpu-memory 80GiB --compare   # configurations side by side
    python -m jobs.plan --model /models/Llama-2-7b-hf --tp 1 --gpu-memory 40GB --json

--model takes a preset (llama2-7b, llama2-13b, llama2-70b, llama3-8b, llama3-70b, smollm2: shapes
only, no weights needed), a Hugging Face directory, a config.json or a .gguf file. Nothing is
loaded but the config. The model behind the numbers: pipeline/memory_plan.py, docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.memory_plan import (
    COMPONENTS, DEVICE_MEMORY, KV_DTYPES, WEIGHT_BYTES, MemoryPlan, ModelShape, ServingConfig, fmt_bytes,
    parse_bytes,
)

# (label, ServingConfig overrides) compared by --compare, the naive one first.
COMPARED = [
    ("bf16 weights, bf16 KV, one-shot prefill, all logits", dict(kv_dtype="auto", prefill_block=None, logits="all")),
    ("bf16 weights, bf16 KV, one-shot prefill", dict(kv_dtype="auto", prefill_block=None)),
    ("bf16 weights, bf16 KV, chunked prefill", dict(kv_dtype="auto", prefill_block="chunk")),
    ("bf16 weights, int8 KV, one-shot prefill", dict(kv_dtype="int8", prefill_block=None)),
    ("bf16 weights, int8 KV, chunked prefill", dict(kv_dtype="int8", prefill_block="chunk")),
    ("bf16 weights, int8 KV, chunked prefill, torch attention (no flash-attn)",
     dict(kv_dtype="int8", prefill_block="chunk", attention_backend="torch")),
    ("int8 weights*, bf16 KV, chunked prefill", dict(weight_dtype="int8", kv_dtype="auto", prefill_block="chunk")),
    ("int8 weights*, int8 KV, chunked prefill", dict(weight_dtype="int8", kv_dtype="int8", prefill_block="chunk")),
]


def _block(text: str):
    if text in ("none", "one-shot"):
        return None
    if text == "chunk":
        return "chunk"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prefill-block must be 'none', 'chunk' or a number of tokens, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--prefill-block must be positive, got {value}")
    return value


def _memory(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="preset name, Hugging Face directory, config.json or .gguf")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per replica")
    p.add_argument("--gpu-memory", type=_memory, default=None,
                   help=f"memory of one GPU: '80GiB', '40GB', bytes, or {', '.join(sorted(DEVICE_MEMORY))}")
    p.add_argument("--prompt-tokens", type=int, default=100_000)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--weight-dtype", default="bfloat16", choices=sorted(WEIGHT_BYTES))
    p.add_argument("--kv-dtype", default="auto", choices=KV_DTYPES)
    p.add_argument("--prefill-block", type=_block, default="chunk", help="'none' (one shot), 'chunk' (DCA chunk_len) or tokens")
    p.add_argument("--logits", default="last", choices=("last", "all"))
    p.add_argument("--attention-backend", default="flash", choices=("flash", "torch"))
    p.add_argument("--chunk-len", type=int, default=None, help="DCA chunk_len (default 5P/8 of the model)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--compare", action="store_true", help="print standard configurations side by side")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p.parse_args(argv)


def _config(args, **overrides) -> ServingConfig:
    values = dict(
        tp_size=args.tp, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype, prefill_block=args.prefill_block,
        logits=args.logits, attention_backend=args.attention_backend, chunk_len=args.chunk_len, device=args.device,
        device_memory=args.gpu_memory,
    )
    values.update(overrides)
    return ServingConfig(**values)


def compare_table(shape: ModelShape, args) -> tuple[str, list[dict]]:
    rows, lines = [], []
    head = f"| configuration | {' | '.join(COMPONENTS)} | total | fits | longest prompt |"
    lines += [
        f"{shape.name}, tp={args.tp}, {fmt_bytes(args.gpu_memory)} per GPU; request: {args.prompt_tokens} prompt + "
        f"{args.new_tokens} new tokens, batch {args.batch}. Per GPU.",
        "",
        head,
        "|" + " --- |" * (len(COMPONENTS) + 4),
    ]
    for label, overrides in COMPARED:
        plan = MemoryPlan(shape, _config(args, **overrides))
        e = plan.estimate(args.prompt_tokens, args.new_tokens, args.batch)
        longest = plan.longest_prompt(args.new_tokens, args.batch) if args.gpu_memory else None
        fits = {True: "yes", False: "no", None: "?"}[e.fits]
        cells = " | ".join(fmt_bytes(getattr(e, c)) for c in COMPONENTS)
        lines.append(f"| {label} | {cells} | {fmt_bytes(e.total)} | {fits} | {longest if longest is not None else '?'} |")
        rows.append({"configuration": label, **e.to_dict(), "longest_prompt": longest})
    if any("*" in label for label, _ in COMPARED):
        lines += ["", "* int8 weights need a weight-quantisation library this project does not ship."]
    return "\n".join(lines), rows


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        shape = ModelShape.load(args.model)
        plan = MemoryPlan(shape, _config(args))
        if args.compare:
            text, rows = compare_table(shape, args)
            print(json.dumps(rows, indent=2) if args.json else text)
            return 0
        estimate = plan.estimate(args.prompt_tokens, args.new_tokens, args.batch)
    except (ValueError, FileNotFoundError) as e:
        print(f"jobs.plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {"model": shape.name, "serving": plan.config.to_dict(), **estimate.to_dict()}
        if args.gpu_memory:
            out["longest_prompt"] = plan.longest_prompt(args.new_tokens, args.batch)
        print(json.dumps(out, indent=2))
    else:
        print(plan.format_table(args.prompt_tokens, args.new_tokens, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())

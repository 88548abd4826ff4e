"""Print the memory plan of a model on a device: what a request needs per GPU, and what fits.

    python -m jobs.plan --model llama2-70b --tp 2 --gpu-memory a100-80g \\
        --max-input-tokens 100000 --max-new-tokens 512 --kv-cache-dtype int8
    python -m jobs.plan --model llama2-70b --tp 2 --gpu-memory 80GiB --compare   # configurations side by side
    python -m jobs.plan --model /models/Llama-2-7b-hf --tp 1 --gpu-memory 40GB --json

The flags a job also has (--model, --tp, --max-input-tokens, --max-new-tokens, --dtype,
--kv-cache-dtype, --prefill-block, --dca-* (--dca-backend included), --device) mean the same and default to the same
values as in `python -m jobs.summarize`, so the plan printed is the plan of the job run with those
flags (a job prints it at start). --model takes a preset (llama2-7b, llama2-13b, llama2-70b,
llama3-8b, llama3-70b, smollm2: shapes only, no weights needed), a Hugging Face directory, a
config.json or a .gguf file. Nothing is loaded but the config. The model behind the numbers:
pipeline/engine/memory_plan.py, docs/memory.md.

Exit status, for scripts: 0 when the plan fits (or no --gpu-memory was given to check it against),
1 when it does not fit (the table says DOES NOT FIT), 2 on bad flags; --compare always exits 0.
A job checks the same plan at start against the memory one of its ranks has, and refuses (exit 2)
a --max-input-tokens whose longest request cannot fit, naming the longest prompt that does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from jobs.common import add_dca_flags, add_engine_memory_flags, deprecated_alias
from pipeline.config.job import DEFAULT_MAX_INPUT_TOKENS, DEFAULT_MAX_NEW_TOKENS
from pipeline.config.model import dca_chunk_len
from pipeline.config.resolve import (
    ATTENTION_BACKENDS, COMPUTE_DTYPES, normalize_prefill_block, planned_attention_backend, planned_weight_dtype,
)
from pipeline.config.task import CONFIDENCE, HIERARCHICAL, QA_COMBINES, TRUNCATION_POLICIES
from pipeline.data.sections import estimate_split
from pipeline.engine.memory_plan import (
    COMPONENTS, DEVICE_MEMORY, WEIGHT_BYTES, MemoryPlan, ModelShape, ServingConfig, fmt_bytes, parse_bytes,
)

# (label, ServingConfig overrides) compared by --compare, the naive one first.
COMPARED = [
    ("bf16 weights, bf16 KV, one-shot prefill, all logits",
     dict(kv_cache_dtype="auto", prefill_block=None, logits="all")),
    ("bf16 weights, bf16 KV, one-shot prefill", dict(kv_cache_dtype="auto", prefill_block=None)),
    ("bf16 weights, bf16 KV, chunked prefill", dict(kv_cache_dtype="auto", prefill_block="chunk")),
    ("bf16 weights, int8 KV, one-shot prefill", dict(kv_cache_dtype="int8", prefill_block=None)),
    ("bf16 weights, int8 KV, chunked prefill", dict(kv_cache_dtype="int8", prefill_block="chunk")),
    ("bf16 weights, int8 KV, chunked prefill, flash-attn attention (Triton's fallback)",
     dict(kv_cache_dtype="int8", prefill_block="chunk", attention_backend="flash")),
    ("bf16 weights, int8 KV, chunked prefill, torch attention (no Triton, no flash-attn)",
     dict(kv_cache_dtype="int8", prefill_block="chunk", attention_backend="torch")),
    ("int8 weights*, bf16 KV, chunked prefill",
     dict(weight_dtype="int8", kv_cache_dtype="auto", prefill_block="chunk")),
    ("int8 weights*, int8 KV, chunked prefill",
     dict(weight_dtype="int8", kv_cache_dtype="int8", prefill_block="chunk")),
]


def _memory(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.plan", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("the job (same flags and defaults as jobs.summarize / jobs.qa)")
    g.add_argument("--model", default="smollm2", help="preset name, Hugging Face directory, config.json or .gguf "
                   "(default smollm2)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per replica (default 1)")
    g.add_argument("--max-input-tokens", type=int, default=DEFAULT_MAX_INPUT_TOKENS,
                   help=f"the longest prompt, planned for (default {DEFAULT_MAX_INPUT_TOKENS})")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"tokens generated per request at most (default {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--dtype", default="auto", choices=["auto", *sorted(WEIGHT_BYTES)],
                   help="weight dtype (default auto: bfloat16 on cuda, float32 on cpu); int8/int4 model "
                        "quantised weights this project does not ship")
    add_engine_memory_flags(g, planner=True)
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto (default) plans for GPUs, as a job does on a cluster that has them")
    add_dca_flags(p, planner=True)
    g = p.add_argument_group("the plan")
    g.add_argument("--gpu-memory", type=_memory, default=None,
                   help=f"memory of one GPU: '80GiB', '40GB', bytes, or {', '.join(sorted(DEVICE_MEMORY))}")
    g.add_argument("--batch", type=int, default=1, help="requests of max-input-tokens prefilled together (default 1)")
    g.add_argument("--logits", default="last", choices=("last", "all"))
    g.add_argument("--attention-backend", default=None, choices=ATTENTION_BACKENDS,
                   help="the DCA backend to plan for (default: what --dca-backend resolves to on --device, as a "
                        "job's ranks choose it: triton on cuda, torch on cpu; flash and torch are what triton "
                        "falls back to when its start-up self-check fails)")
    g.add_argument("--document-tokens", type=int, default=None, metavar="N",
                   help="with --truncation hierarchical: how a document of N tokens is answered (sections, levels, "
                        "engine calls)")
    g.add_argument("--truncation", default="middle", choices=TRUNCATION_POLICIES,
                   help="the job's --truncation (only hierarchical changes the plan: documents over the budget are "
                        "answered in sections, each call within --max-input-tokens)")
    g.add_argument("--task", default="summarize", choices=("summarize", "qa"), help="for --document-tokens")
    g.add_argument("--qa-combine", default="reduce", choices=QA_COMBINES,
                   help="for --document-tokens --task qa: the job's --qa-combine (confidence makes no combine call)")
    g.add_argument("--compare", action="store_true", help="print standard configurations side by side")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    # Earlier names, still accepted (with a warning).
    deprecated_alias(g, "--prompt-tokens", "--max-input-tokens", type=int)
    deprecated_alias(g, "--new-tokens", "--max-new-tokens", type=int)
    deprecated_alias(g, "--weight-dtype", "--dtype", choices=sorted(WEIGHT_BYTES))
    deprecated_alias(g, "--chunk-len", "--dca-chunk-len", type=int)
    args = p.parse_args(argv)
    args.prefill_block = normalize_prefill_block(args.prefill_block)
    if args.device == "auto":  # plan for GPUs, as a job does on a cluster that has them
        args.device = "cuda"
    args.dtype = planned_weight_dtype(args.dtype, args.device)
    if args.attention_backend is None:
        # int8/int4 weights compute in a half type (dtype None), as the job's ranks do.
        compute = args.dtype if args.dtype in COMPUTE_DTYPES else None
        args.attention_backend = planned_attention_backend(args.device, args.dca_backend or "auto", dtype=compute)
    return args


def _chunk_len(args, shape: ModelShape) -> int:
    """DCA chunk_len L from the --dca-* flags and the model's P (or the deprecated --chunk-len L)."""
    if getattr(args, "dca_chunk_len", None):
        return args.dca_chunk_len
    return dca_chunk_len(args.dca_pretraining_length or shape.pretraining_length, args.dca_chunk_size,
                         args.dca_local_window)


def _config(args, shape: ModelShape, **overrides) -> ServingConfig:
    values = dict(
        tp_size=args.tp, weight_dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
        prefill_block=args.prefill_block, logits=args.logits, attention_backend=args.attention_backend,
        chunk_len=_chunk_len(args, shape), device=args.device, device_memory=args.gpu_memory,
    )
    values.update(overrides)
    return ServingConfig(**values)


def compare_table(shape: ModelShape, args) -> tuple[str, list[dict]]:
    rows, lines = [], []
    head = f"| configuration | {' | '.join(COMPONENTS)} | total | fits | longest prompt |"
    lines += [
        f"{shape.name}, tp={args.tp}, {fmt_bytes(args.gpu_memory)} per GPU; request: {args.max_input_tokens} prompt + "
        f"{args.max_new_tokens} new tokens, batch {args.batch}; DCA attention {args.attention_backend} unless a row "
        "says otherwise. Per GPU.",
        "",
        head,
        "|" + " --- |" * (len(COMPONENTS) + 4),
    ]
    for label, overrides in COMPARED:
        plan = MemoryPlan(shape, _config(args, shape, **overrides))
        e = plan.estimate(args.max_input_tokens, args.max_new_tokens, args.batch)
        longest = plan.longest_prompt(args.max_new_tokens, args.batch) if args.gpu_memory else None
        fits = {True: "yes", False: "no", None: "?"}[e.fits]
        cells = " | ".join(fmt_bytes(getattr(e, c)) for c in COMPONENTS)
        lines.append(f"| {label} | {cells} | {fmt_bytes(e.total)} | {fits} | {longest if longest is not None else '?'} |")
        rows.append({"configuration": label, **e.to_dict(), "longest_prompt": longest})
    if any("*" in label for label, _ in COMPARED):
        lines += ["", "* int8 weights need a weight-quantisation library this project does not ship."]
    return "\n".join(lines), rows


# Exit status: 0 the plan fits (or no --gpu-memory to check it against), 1 it does not fit,
# 2 bad flags or an unreadable model. --compare is a table of alternatives and exits 0.
EXIT_DOES_NOT_FIT = 1


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        shape = ModelShape.load(args.model)
        plan = MemoryPlan(shape, _config(args, shape))
        if args.compare:
            text, rows = compare_table(shape, args)
            print(json.dumps(rows, indent=2) if args.json else text)
            return 0
        estimate = plan.estimate(args.max_input_tokens, args.max_new_tokens, args.batch)
    except (ValueError, FileNotFoundError) as e:
        print(f"jobs.plan: {e}", file=sys.stderr)
        return 2
    split = None
    if args.document_tokens is not None:
        if args.truncation != HIERARCHICAL:
            print("jobs.plan: --document-tokens needs --truncation hierarchical (the other policies send one "
                  "prompt per document, the plan above)", file=sys.stderr)
            return 2
        try:
            split = estimate_split(args.document_tokens, args.max_input_tokens, args.max_new_tokens,
                                   combine=not (args.task == "qa" and args.qa_combine == CONFIDENCE))
        except ValueError as e:
            print(f"jobs.plan: {e}", file=sys.stderr)
            return 2
    if args.json:
        out = {"model": shape.name, "serving": plan.config.to_dict(), **estimate.to_dict()}
        if args.gpu_memory:
            out["longest_prompt"] = plan.longest_prompt(args.max_new_tokens, args.batch)
        if split is not None:
            out["hierarchical"] = dataclasses.asdict(split)
        print(json.dumps(out, indent=2))
    else:
        print(plan.format_table(args.max_input_tokens, args.max_new_tokens, args.batch))
        if split is not None:
            print(split.describe(args.task))
    return EXIT_DOES_NOT_FIT if estimate.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())

"""Passkey retrieval and long-text perplexity, plain model vs DCA.

    python -m jobs.evaluate --mode quick                  # < 10 min on 2 CPU cores (SmolLM2-135M)
    python -m jobs.evaluate --mode full --out docs/eval/smollm2
    python -m jobs.evaluate --mode full --model /models/Llama-2-7b-hf \\
        --lengths 4096,8192,16384,32768 --out results/llama2
    python -m jobs.evaluate --config eval.json            # every EvalConfig field from a file
    python -m jobs.evaluate --plot-only docs/eval/smollm2/results.json
    python -m jobs.evaluate --document examples/texts/alice-chapters-1-4.txt   # plain vs DCA on one text

Writes results.json, results.csv, summary.md and PNG plots to --out (see docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("quick", "full"), default="quick", help="preset (default quick)")
    p.add_argument("--config", help="JSON file of EvalConfig fields (the preset's values are the defaults)")
    p.add_argument("--out", help="output directory (default out/eval/<mode>)")
    p.add_argument("--model", help="'smollm2', a Hugging Face directory or a .gguf file")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--lengths", type=_ints, help="comma-separated token lengths, e.g. 4096,8192,16384")
    p.add_argument("--depths", type=_floats, help="passkey depths in [0, 1], e.g. 0.1,0.5,0.9")
    p.add_argument("--seeds", type=_ints, help="passkey seeds, e.g. 0,1,2")
    p.add_argument("--fillers", type=_strs, help="passkey fillers: book,repeat")
    p.add_argument("--windows", type=int, help="perplexity windows per length")
    p.add_argument("--tasks", type=_strs, help="perplexity,passkey")
    p.add_argument("--alphas", type=_floats,
                   help="DCA variants to compare with plain, one per temperature_alpha (first is named 'dca')")
    p.add_argument("--ablation-pretraining-length", type=int,
                   help="add a DCA variant with this pretraining_length, run only up to the model's own")
    p.add_argument("--threads", type=int, help="torch intra-op threads (per rank with --tp)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (DeepSpeed AutoTP, local processes)")
    p.add_argument("--resume", action="store_true", help="keep the records already in --out and run only the rest")
    p.add_argument("--plot-only", metavar="RESULTS_JSON", help="redraw plots and summary from a results file")
    p.add_argument("--document", metavar="TEXT_FILE",
                   help="perplexity of the variants over this whole text (one window, every token), printed "
                        "side by side before and past the model's trained length")
    return p


def config_from_args(args) -> "EvalConfig":  # noqa: F821
    from evaluation import EvalConfig, Variant
    from pipeline.config.model import ModelSpec

    preset = EvalConfig.quick() if args.mode == "quick" else EvalConfig.full()
    values = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            from_file = json.load(f)
        parsed = EvalConfig.from_dict(from_file)  # validates; only the fields the file names apply
        values.update({k: getattr(parsed, k) for k in from_file})
    model = values["model"]
    if args.model or args.dtype:
        model = dataclasses.replace(model, **{k: v for k, v in (("model", args.model), ("dtype", args.dtype)) if v})
    values["model"] = dataclasses.replace(model, dca=None)
    for name in ("lengths", "depths", "seeds", "fillers", "windows", "tasks", "threads", "device"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    variants = list(values["variants"])
    if args.alphas is not None:
        variants = [Variant(name="plain")] + [
            Variant(name="dca" if i == 0 else f"dca_alpha{a:g}", dca={"temperature_alpha": a})
            for i, a in enumerate(args.alphas)
        ] + [v for v in variants if v.dca and "pretraining_length" in v.dca]
    if args.ablation_pretraining_length:
        p = args.ablation_pretraining_length
        variants = [v for v in variants if not (v.dca and "pretraining_length" in v.dca)]
        variants.append(Variant(name=f"dca_p{p}", dca={"pretraining_length": p}, native_only=True))
    values["variants"] = tuple(variants)
    return EvalConfig(**values)


def main(argv: list[str] | None = None) -> int:
    """Errors a user can act on (a missing file or model, bad settings) are one line, exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (FileNotFoundError, ValueError) as e:  # ModelError is a ValueError
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def _main(args) -> int:
    import evaluation

    if args.plot_only:
        path = Path(args.plot_only).resolve()
        results = json.loads(path.read_text(encoding="utf-8"))
        for p in evaluation.write_plots(results, path.parent):
            print(f"wrote {p}")
        print(f"wrote {evaluation.write_summary(results, path.parent)}")
        print(evaluation.summary_markdown(results))
        return 0
    config = config_from_args(args)
    tokenizer = None
    if args.document:
        from pipeline.engine.models import load_model_config, load_tokenizer

        path = Path(args.document).resolve()
        tokenizer = load_tokenizer(config.model)
        n = len(evaluation.encode(tokenizer, evaluation.read_book(str(path))))
        trained = int(load_model_config(config.model).max_position_embeddings)
        # Buckets of P/8 tokens (1k for SmolLM2): the table splits at P and shows blocks past it.
        config = dataclasses.replace(config, books=(str(path),), lengths=(n,), windows=1, tasks=("perplexity",),
                                     position_bucket=max(1, trained // 8))
    out = Path(args.out or f"out/eval/{args.mode}").resolve()
    print(f"evaluating {config.model.model}: variants {[v.name for v in config.variants]}, "
          f"lengths {list(config.lengths)} -> {out}", flush=True)
    if args.tp > 1:
        results = evaluation.run_evaluation_tp(config, out, args.tp, resume=args.resume)
    else:
        results = evaluation.run_evaluation(config, out, resume=args.resume, tokenizer=tokenizer,
                                            log=lambda m: print(m, flush=True))
    if args.document:
        print(evaluation.document_comparison(results))
        print(f"results and plots in {out}")
        return 0
    print(evaluation.summary_markdown(results))
    print(f"results and plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

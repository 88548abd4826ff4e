"""The quickstart's plain-vs-DCA comparison: one forward per variant against a shared prefix.

    .venv/bin/python benchmarks/document_comparison.py            # SmolLM2, CPU, the quickstart's document
    .venv/bin/python benchmarks/document_comparison.py --document FILE --repeats 2

`python -m jobs.evaluate --document` computes the perplexity of the plain model and of DCA over
every token of a text. DCA is plain attention over its first chunk_len tokens (and caches their
keys as the plain model does), so the evaluation runs the plain model over the whole text once,
keeping its KV cache, and DCA continues from that cache cut to the first chunk_len tokens
(`evaluation.shared_prefix_nll`). This script times both ways in one process, alternating them, on
the same model and tokens:

- separate: `evaluation.sequence_nll` per variant, one cacheless forward over the whole text each
  (what the evaluation did before);
- shared: `evaluation.shared_prefix_nll`, the plain model over everything, DCA over the rest only.

It checks that both give the same perplexities (per block of P/8 tokens, to 1e-3 relative), prints
a table (seconds, token-forwards, the ratio) and writes benchmarks/results/document_comparison.json.
The times are of this machine at the time it ran: compare the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_DOCUMENT = "examples/texts/alice-chapters-1-4.txt"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--document", default=DEFAULT_DOCUMENT, help=f"text file (default {DEFAULT_DOCUMENT})")
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a Hugging Face directory")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each way, alternating (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/document_comparison.json")
    args = parser.parse_args(argv)

    import torch

    import evaluation as ev
    from dca import apply_dca
    from pipeline.config.model import ModelSpec, dca_config_of_settings
    from pipeline.engine.models import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelSpec(model=args.model)
    tokenizer = load_tokenizer(spec)
    plain = load_model(dataclasses.replace(spec, dca=None), device="cpu").eval()
    trained = int(plain.config.max_position_embeddings)
    dca_config = dca_config_of_settings({}, trained)
    dca = apply_dca(copy.deepcopy(plain), dca_config)
    ids = ev.encode(tokenizer, ev.read_book(os.path.abspath(args.document)))
    n = len(ids)
    prefix = ev.shared_prefix([None, dca_config], n)
    if not prefix:
        sys.exit(f"error: {args.document} has {n} tokens; nothing to share with chunk_len {dca_config.chunk_len}")
    bucket = max(1, trained // 8)
    print(f"{args.document}: {n:,} tokens, model trained on {trained:,}; DCA chunk_len {dca_config.chunk_len:,}: "
          f"shared prefix {prefix:,} tokens; torch threads {torch.get_num_threads()}", flush=True)

    runs = {"separate": [], "shared": []}
    results = {}
    for r in range(args.repeats):
        for way in ("separate", "shared"):
            t0 = time.perf_counter()
            if way == "separate":
                nlls = [ev.sequence_nll(m, ids) for m in (plain, dca)]
            else:
                nlls = ev.shared_prefix_nll([plain, dca], ids, prefix).nll
            runs[way].append(time.perf_counter() - t0)
            results[way] = [ev.perplexity_summary(nll, n, bucket) for nll in nlls]
            print(f"  run {r + 1} {way}: {runs[way][-1]:.1f} s", flush=True)

    worst = 0.0
    for variant in range(2):
        a, b = (results[w][variant]["nll_by_position"] for w in ("separate", "shared"))
        worst = max(worst, max(abs(math.exp(x) - math.exp(y)) / math.exp(x) for x, y in zip(a, b)))
    forwards = {"separate": 2 * n, "shared": prefix + 2 * (n - prefix)}
    best = {way: min(times) for way, times in runs.items()}
    rows = [(way, best[way], forwards[way]) for way in ("separate", "shared")]
    print()
    print(f"{'way':<10} {'seconds (best)':>15} {'token-forwards':>15}")
    for way, sec, fw in rows:
        print(f"{way:<10} {sec:>15.1f} {fw:>15,}")
    print(f"shared / separate: time {best['shared'] / best['separate']:.2f}, "
          f"token-forwards {forwards['shared'] / forwards['separate']:.2f}; "
          f"largest perplexity difference per {bucket:,}-token block {worst:.1e} (relative)")
    if worst > 1e-3:
        sys.exit(f"error: the two ways disagree by {worst:.1e} (relative perplexity of a block)")
    record = {
        "document": args.document, "tokens": n, "trained_length": trained, "dca": dca_config.to_dict(),
        "shared_prefix": prefix, "seconds": runs, "best_seconds": best, "token_forwards": forwards,
        "time_ratio": best["shared"] / best["separate"], "largest_relative_ppl_difference": worst,
        "ppl": {way: {"plain": results[way][0]["ppl"], "dca": results[way][1]["ppl"]} for way in results},
        "torch_threads": torch.get_num_threads(), "host": platform.node(), "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

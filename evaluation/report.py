"""Summaries and plots of an evaluation's results (from a results dict, so a stopped run can
still be plotted): tables in markdown, perplexity by length and by position, passkey grids.
matplotlib is imported inside `write_plots`."""

from __future__ import annotations

import math
import os
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Summaries and plots (from a results dict, so a stopped run can still be plotted)


def summarize(results: dict) -> dict:
    """{"perplexity": {variant: {length: (mean ppl, mean last-quarter ppl, windows)}},
        "passkey": {filler: {variant: {length: {depth: (correct, total)}}}}}.

    Perplexities are averaged over windows in log space (exp of the mean NLL). Passkey counts are
    kept apart per filler: a model can fail one filler at every length (SmolLM2-135M with book
    text) and pooling them would hide what length does to the other."""
    ppl: dict = {}
    pk: dict = {}
    for r in results["records"]:
        if r["task"] == "perplexity":
            ppl.setdefault(r["variant"], {}).setdefault(r["length"], []).append(r)
        else:
            by_variant = pk.setdefault(r["filler"], {})
            cell = by_variant.setdefault(r["variant"], {}).setdefault(r["length"], {}).setdefault(r["depth"], [0, 0])
            cell[0] += int(bool(r["correct"]))
            cell[1] += 1
    out_ppl = {
        v: {
            n: (math.exp(sum(r["nll"] for r in rs) / len(rs)),
                math.exp(sum(r["nll_last_quarter"] for r in rs) / len(rs)), len(rs))
            for n, rs in sorted(by_len.items())
        }
        for v, by_len in ppl.items()
    }
    out_pk = {
        f: {v: {n: {d: tuple(c) for d, c in sorted(by_d.items())} for n, by_d in sorted(by_len.items())}
            for v, by_len in by_variant.items()}
        # The repeated filler first: it is the one that measures length generalisation.
        for f, by_variant in sorted(pk.items(), key=lambda item: item[0] != "repeat")
    }
    return {"perplexity": out_ppl, "passkey": out_pk}


def summary_markdown(results: dict) -> str:
    """Markdown tables of perplexity, and of passkey accuracy per filler, per variant and length."""
    s = summarize(results)
    lines = []
    if s["perplexity"]:
        lengths = sorted({n for by_len in s["perplexity"].values() for n in by_len})
        lines += ["Perplexity, whole window / last quarter (windows averaged in log space; "
                  "number of windows in brackets):", "",
                  "| variant | " + " | ".join(f"{n}" for n in lengths) + " |",
                  "| --- |" + " --- |" * len(lengths)]
        for v, by_len in s["perplexity"].items():
            cells = [f"{by_len[n][0]:.2f} / {by_len[n][1]:.2f} ({by_len[n][2]})" if n in by_len else ""
                     for n in lengths]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    for filler, by_variant in s["passkey"].items():
        lengths = sorted({n for by_len in by_variant.values() for n in by_len})
        lines += [f"Passkey accuracy, {filler} filler (correct / total over depths and seeds):", "",
                  "| variant | " + " | ".join(f"{n}" for n in lengths) + " |",
                  "| --- |" + " --- |" * len(lengths)]
        for v, by_len in by_variant.items():
            cells = []
            for n in lengths:
                if n in by_len:
                    c = sum(x[0] for x in by_len[n].values())
                    t = sum(x[1] for x in by_len[n].values())
                    cells.append(f"{c}/{t}")
                else:
                    cells.append("")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def document_comparison(results: dict, *, split: int | None = None, block: int | None = None) -> str:
    """Plain model vs DCA on one document (a perplexity run with one window): perplexity before and
    after `split` (default: the model's max_position_embeddings, its trained length) and per block
    of `block` tokens past it (default: the run's position_bucket), side by side. Uses each
    record's nll_by_position, so the run's position_bucket must divide `split` and `block`."""
    records = [r for r in results["records"] if r["task"] == "perplexity" and r.get("nll_by_position")]
    if not records:
        raise ValueError("no perplexity record with nll_by_position: run with --tasks perplexity")
    length = records[0]["length"]
    bucket = results["meta"]["config"].get("position_bucket") or 0
    split = split or results["meta"].get("max_position_embeddings") or length
    block = block or bucket
    if not bucket or split % bucket or block % bucket:
        raise ValueError(f"position_bucket {bucket} must divide the split {split} and the block {block}")
    variants = list(dict.fromkeys(r["variant"] for r in records))
    by_variant = {v: next(r for r in records if r["variant"] == v) for v in variants}
    # Bucket b holds the losses of targets b * bucket + 1 .. (b + 1) * bucket (length - 1 targets).
    sizes = [min(bucket, length - 1 - b * bucket) for b in range((length - 2) // bucket + 1)]

    def ppl(variant: str, lo: int, hi: int) -> float | None:
        nll = by_variant[variant]["nll_by_position"]
        picked = [(nll[b], sizes[b]) for b in range(len(sizes)) if lo <= b * bucket < hi]
        total = sum(n for _, n in picked)
        return math.exp(sum(x * n for x, n in picked) / total) if total else None

    rows = [(f"tokens 0-{split:,} (trained length)", 0, split), (f"tokens {split:,}-{length:,} (past it)", split, length)]
    rows += [(f"  {lo:,}-{lo + block if lo + block < length - 1 else length:,}", lo, lo + block)
             for lo in range(split, length - 1, block)]
    name = Path(by_variant[variants[0]].get("book") or "?").name
    lines = [f"Perplexity of {results['meta'].get('model')} on {name} ({length:,} tokens), trained on "
             f"{results['meta'].get('max_position_embeddings') or '?':,} tokens (lower is better):", "",
             f"{'':34}" + "".join(f"{v:>10}" for v in variants)]
    for label, lo, hi in rows:
        cells = [ppl(v, lo, hi) for v in variants]
        lines.append(f"{label:34}" + "".join(f"{c:>10.1f}" if c is not None else f"{'-':>10}" for c in cells))
    return "\n".join(lines)


def write_summary(results: dict, out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir) / "summary.md"
    meta = results["meta"]
    head = (f"# Evaluation summary\n\nmodel `{meta['model']}`, commit `{meta['commit']}`, "
            f"date {meta['date']}, finished {meta.get('finished')}\n\n")
    path.write_text(head + summary_markdown(results), encoding="utf-8")
    return path


def write_plots(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    """perplexity.png (ppl vs length, whole window and last quarter), passkey.png (accuracy grid
    depth x length per filler and variant) and loss_by_position.png (mean loss per position
    bucket, one panel per length past the training length). Only the plots the records allow are
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter

    out_dir = Path(out_dir)
    s = summarize(results)
    max_pos = results["meta"].get("max_position_embeddings")
    model = results["meta"].get("model")
    paths = []

    if s["perplexity"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, idx, title in ((axes[0], 0, "whole window"), (axes[1], 1, "last quarter of the window")):
            for k, (v, by_len) in enumerate(s["perplexity"].items()):
                ns = sorted(by_len)
                # Line styles and sizes differ: variants with equal results (same_as) overlap.
                ax.plot(ns, [by_len[n][idx] for n in ns], marker="osD^v"[k % 5], ms=7 - k % 4,
                        ls=("-", "--", ":", "-.")[k % 4], label=v)
            if max_pos:
                ax.axvline(max_pos, color="grey", ls="--", lw=1, label=f"training length {max_pos}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            all_lengths = sorted({n for by_len in s["perplexity"].values() for n in by_len})
            ax.set_xticks(all_lengths, [str(n) for n in all_lengths])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("window length (tokens)")
            ax.set_ylabel("perplexity")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Perplexity vs length: plain vs DCA ({model})")
        fig.tight_layout()
        paths.append(out_dir / "perplexity.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        ppl_records = [r for r in results["records"] if r["task"] == "perplexity" and r.get("nll_by_position")]
        if ppl_records:
            # One panel per length past the training length (where the variants part ways), or the
            # longest length if none is.
            ppl_lengths = sorted({r["length"] for r in ppl_records})
            shown = [n for n in ppl_lengths if max_pos and n > max_pos] or ppl_lengths[-1:]
            bucket = results["meta"]["config"].get("position_bucket") or 1
            fig, axes = plt.subplots(1, len(shown), figsize=(7 * len(shown), 4.2), squeeze=False)
            for ax, n in zip(axes[0], shown):
                per_pos: dict = {}
                for r in ppl_records:
                    if r["length"] == n:
                        per_pos.setdefault(r["variant"], []).append(r["nll_by_position"])
                for j, (v, rows) in enumerate(per_pos.items()):
                    k = min(len(x) for x in rows)
                    mean = [sum(x[i] for x in rows) / len(rows) for i in range(k)]
                    ends = [min((i + 1) * bucket, n) for i in range(k)]  # the last bucket may be short
                    ax.plot(ends, mean, marker=".", ls=("-", "--", ":", "-.")[j % 4],
                            label=f"{v} ({len(rows)} window{'s' if len(rows) > 1 else ''})")
                if max_pos:
                    ax.axvline(max_pos, color="grey", ls="--", lw=1, label=f"training length {max_pos}")
                ax.set_xlabel(f"position (end of each {bucket}-token bucket)")
                ax.set_ylabel("mean loss (nats/token)")
                ax.set_title(f"Loss by position in {n}-token windows")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
            fig.tight_layout()
            paths.append(out_dir / "loss_by_position.png")
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)

    if s["passkey"]:
        # One row of grids per filler, one column per variant.
        fillers = list(s["passkey"])
        variants = list(dict.fromkeys(v for by_variant in s["passkey"].values() for v in by_variant))
        lengths = sorted({n for by_variant in s["passkey"].values() for by_len in by_variant.values() for n in by_len})
        depths = sorted({d for by_variant in s["passkey"].values() for by_len in by_variant.values()
                         for by_d in by_len.values() for d in by_d})
        fig, axes = plt.subplots(
            len(fillers), len(variants), squeeze=False,
            figsize=(2.2 + 1.3 * len(lengths) * len(variants), (2.4 + 0.3 * len(depths)) * len(fillers) + 0.8),
        )
        cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
        for row, filler in zip(axes, fillers):
            for ax, v in zip(row, variants):
                grid = [[float("nan")] * len(lengths) for _ in depths]
                labels = [[""] * len(lengths) for _ in depths]
                for j, n in enumerate(lengths):
                    for i, d in enumerate(depths):
                        cell = s["passkey"][filler].get(v, {}).get(n, {}).get(d)
                        if cell:
                            grid[i][j] = cell[0] / cell[1]
                            labels[i][j] = f"{cell[0]}/{cell[1]}"
                ax.imshow(np.ma.masked_invalid(np.array(grid)), cmap=cmap, vmin=0, vmax=1, aspect="auto")
                for i in range(len(depths)):
                    for j in range(len(lengths)):
                        ax.text(j, i, labels[i][j] or "-", ha="center", va="center", fontsize=9)
                ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
                ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
                ax.set_xlabel("prompt length (tokens)")
                ax.set_ylabel("key depth")
                ax.set_title(f"{v}, {filler} filler", fontsize=10)
        fig.suptitle(f"Passkey accuracy ({model})")
        fig.tight_layout()
        paths.append(out_dir / "passkey.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths

"""Summary or continuation? How often SmolLM2-135M summarises the example documents, before and
after the prompt and generation changes.

    .venv/bin/python benchmarks/summary_quality.py                 # all variants, ~10 min on 2 idle cores
    .venv/bin/python benchmarks/summary_quality.py --variants before,after --corpus examples/corpus

Every document of the example corpora is summarised once per variant, greedily, through the same
code a job runs (pipeline.data.prompts.PromptBuilder for the prompt, pipeline.engine.generation.generate_batch
for the decoding loop, DCA on, chunked prefill), in this process (no Ray: the engine adds nothing
to the tokens). Each output is labelled by evaluation.summary_check (summary / continuation /
repetitive / empty). Corpora and prompt limits are those of docs/jobs.md's commands:

- examples/corpus (6 documents, 3.5k-29k tokens) capped at 2048 prompt tokens, as the quickstart
  ran them before (the issue that asked for this benchmark saw half of them continued);
- examples/quickstart (2 documents, 1.8k and 12.4k tokens) un-truncated, as scripts/quickstart.sh
  runs them now.

Variants:
- before: the templates and generation settings of the jobs before this change (instruction
  above the document, no stop string, no repetition guard);
- template: the current templates (instruction after the document), no stop, no guard;
- after: the current defaults of jobs.summarize (template + stop at a blank line + repetition
  guard: pipeline.config.task.TASK_GENERATION_DEFAULTS).

Writes benchmarks/results/summary_quality.json (every output with its measures) and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The summarisation templates before this change (pipeline/prompts.py at commit 84d3677).
BEFORE_TEMPLATES = {
    "system": "You are a careful assistant. You write short, faithful summaries.",
    "user": "Summarise the following document in three to five sentences.\n\n{document}",
    "base": "Document:\n{document}\n\nSummary of the document in three sentences:",
}
# (corpus directory, max_input_tokens): docs/jobs.md's settings for each.
CORPORA = {"examples/corpus": 2048, "examples/quickstart": 16384}


def variants():
    from pipeline.config.task import TASK_GENERATION_DEFAULTS
    from pipeline.data.prompts import DEFAULT_TEMPLATES

    after = TASK_GENERATION_DEFAULTS["summarize"]
    off = {"stop": (), "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    return {
        "before": (BEFORE_TEMPLATES, off),
        "template": (DEFAULT_TEMPLATES["summarize"], off),
        "after": (DEFAULT_TEMPLATES["summarize"], dict(after)),
    }


def load_engine_context():
    """The model and RankContext a replica of jobs.summarize builds (DCA on, chunked prefill)."""
    import torch

    from pipeline.config.job import DEFAULT_PREFILL_BLOCK
    from pipeline.config.model import ModelSpec
    from pipeline.engine.generation import RankContext
    from pipeline.engine.models import load_model, load_tokenizer

    spec = ModelSpec()
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, "cpu").eval()
    eos = set()
    for source in (tokenizer.eos_token_id, model.generation_config.eos_token_id, model.config.eos_token_id):
        eos.update(source if isinstance(source, (list, tuple)) else [source] if source is not None else [])
    ctx = RankContext(model=model, device=torch.device("cpu"), tokenizer=tokenizer, eos_token_ids=frozenset(eos),
                      pad_token_id=tokenizer.pad_token_id or 0, prefill_block=DEFAULT_PREFILL_BLOCK)
    return tokenizer, ctx


def variant_settings(chosen: dict) -> dict:
    return {name: {"user_template": templates["user"], "response": templates.get("response", ""),
                   **{k: list(v) if isinstance(v, tuple) else v for k, v in generation.items()}}
            for name, (templates, generation) in chosen.items()}


def rates(records: list[dict]) -> dict:
    from evaluation.summary_check import LABELS

    n = len(records)
    counts = {label: sum(r["label"] == label for r in records) for label in LABELS}
    return {"outputs": n, **counts, "summary_rate": round(counts["summary"] / n, 3) if n else None}


def markdown(results: dict) -> str:
    lines = [
        "# Summary or continuation: SmolLM2-135M-Instruct on the example corpora",
        "",
        f"Command: `{results['command']}`; {results['date']}, {results['host']} ({results['load']}), "
        f"torch threads {results['threads']}, max_new_tokens {results['max_new_tokens']}, greedy, DCA on.",
        "Labels from `evaluation/summary_check.py` (a screen: a fluent but wrong summary is a summary).",
        "",
        "| variant | outputs | summary | continuation | repetitive | empty | summary rate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["rates"].items():
        lines.append(f"| {name} | {r['outputs']} | {r['summary']} | {r['continuation']} | {r['repetitive']} | "
                     f"{r['empty']} | {r['summary_rate']:.0%} |")
    lines += ["", "Variants (chat template; the system message is the same in all; `response` starts the "
              "answer and is not part of the output):", ""]
    lines += [f"- **{k}**: `{json.dumps(v)}`" for k, v in results["variant_settings"].items()]
    lines.append("")
    for corpus in dict.fromkeys(r["corpus"] for r in results["records"]):
        lines += [f"## {corpus} (max_input_tokens {CORPORA.get(corpus, '?')})", ""]
        for r in (r for r in results["records"] if r["corpus"] == corpus):
            lines.append(f"- **{r['id']}**, {r['variant']}: **{r['label']}** (copied {r['copied']:.2f}, source lines "
                         f"{r['source_lines']}, repetitive {r['repetitive']:.2f}; prompt {r['prompt_tokens']} tok, "
                         f"{r['output_tokens']} new, {r['seconds']:.0f} s)  ")
            lines.append(f"  > {' '.join((r['output'] or '').split())}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="before,template,after")
    parser.add_argument("--corpus", action="append", help="corpus directory (repeatable; default both)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="as scripts/quickstart.sh (default 64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "summary_quality"))
    parser.add_argument("--markdown-only", action="store_true", help="rewrite OUT.md from OUT.json, run nothing")
    args = parser.parse_args(argv)
    if args.markdown_only:
        with open(args.out + ".json", encoding="utf-8") as f:
            results = json.load(f)
        with open(args.out + ".md", "w", encoding="utf-8") as f:
            f.write(markdown(results))
        print(f"wrote {args.out}.md")
        return 0

    import pyarrow.dataset as ds
    import torch

    from evaluation.summary_check import SourceIndex, check_summary
    from pipeline.config.task import SamplingParams
    from pipeline.data.prompts import PromptBuilder
    from pipeline.engine.generation import generate_batch
    from pipeline.engine.requests import GenerationRequest

    torch.set_num_threads(args.threads)
    chosen = {k: v for k, v in variants().items() if k in args.variants.split(",")}
    tokenizer, ctx = load_engine_context()
    records = []
    for corpus in args.corpus or list(CORPORA):
        max_input = CORPORA.get(corpus, 16384)
        docs = ds.dataset(os.path.join(ROOT, corpus), format="parquet").to_table(columns=["id", "text"]).to_pylist()
        for doc in docs:
            index = SourceIndex(doc["text"])
            for name, (templates, generation) in chosen.items():
                builder = PromptBuilder(tokenizer, task="summarize", templates={"summarize": templates},
                                        max_input_tokens=max_input)
                prompt = builder.build(doc["text"])
                sampling = SamplingParams(max_new_tokens=args.max_new_tokens, stop=tuple(generation["stop"]),
                                          repetition_penalty=generation["repetition_penalty"],
                                          no_repeat_ngram_size=generation["no_repeat_ngram_size"])
                request = GenerationRequest(request_id=doc["id"], prefix_ids=prompt.prefix_ids,
                                            suffix_ids=prompt.suffix_ids, sampling=sampling)
                begin = time.perf_counter()
                ((result,),) = generate_batch(ctx, [request])
                check = check_summary(result.output, index)
                records.append({"corpus": corpus, "id": doc["id"], "variant": name,
                                "prompt_tokens": result.prompt_tokens, "truncated_tokens": prompt.truncated_tokens,
                                "output_tokens": result.output_tokens, "seconds": round(time.perf_counter() - begin, 1),
                                "output": result.output, **check.to_dict()})
                print(f"{corpus} {doc['id']:22} {name:9} {check.label:13} ({records[-1]['seconds']:.0f} s) "
                      f"{' '.join((result.output or '').split())[:90]!r}", flush=True)
    results = {
        "command": " ".join(["python benchmarks/summary_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.node(),
        "load": "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the end",
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "variant_settings": variant_settings(chosen),
        "rates": {name: rates([r for r in records if r["variant"] == name]) for name in chosen},
        "records": records,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(results))
    for name, r in results["rates"].items():
        print(f"{name:9} summary {r['summary']}/{r['outputs']} ({r['summary_rate']:.0%}), continuation "
              f"{r['continuation']}, repetitive {r['repetitive']}, empty {r['empty']}")
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

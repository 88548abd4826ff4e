"""QA with several questions per document: shared-prefix KV reuse vs recomputing the prefix.

    .venv/bin/python benchmarks/qa_prefix_reuse.py                      # SmolLM2, CPU
    .venv/bin/python benchmarks/qa_prefix_reuse.py --doc-tokens 1024 4096 --questions 4 --out /tmp/x.json

For each document length, the same questions are answered twice through the engine (one replica,
tp 1, greedy):
- reuse: one GenerationRequest, prefix = instructions + document, one suffix per question (what
  jobs.qa sends): the engine prefills the prefix once and reuses its KV cache for every question;
- recompute: one request per question with the whole prompt as its prefix, sent one at a time
  (max_in_flight 1), so every question pays the document's prefill again.
Both produce the same answers (greedy); the script checks that. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUESTIONS = [
    "Who is Naomi?", "Whom does Ruth marry?", "Where do Naomi and Ruth go after the famine?",
    "What does Boaz tell his young men?", "Who is Obed?", "What happened to Elimelech?",
    "Why does Ruth stay with Naomi?", "Where did Ruth glean?",
]


def _run(pool, requests, max_in_flight):
    begin = time.perf_counter()
    results = [r for batch in pool.run(requests, max_in_flight) for r in batch]
    return time.perf_counter() - begin, results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--doc-tokens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--cpus-per-rank", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "qa_prefix_reuse.json"))
    args = parser.parse_args(argv)

    import ray

    from pipeline.config.engine import EngineConfig
    from pipeline.config.model import ModelSpec
    from pipeline.config.task import SamplingParams
    from pipeline.data.prompts import PromptBuilder
    from pipeline.engine import ReplicaPool
    from pipeline.engine.models import load_tokenizer
    from pipeline.engine.requests import GenerationRequest

    spec = ModelSpec(model=args.model)
    tokenizer = load_tokenizer(spec)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "texts", "kjv-ruth.txt"),
              encoding="utf-8") as f:
        text = f.read()
    questions = (QUESTIONS * 4)[:args.questions]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    ray.init(address="local", num_cpus=args.cpus_per_rank, include_dashboard=False, log_to_driver=False)
    pool = ReplicaPool(EngineConfig(model_spec=spec, max_input_tokens=max(args.doc_tokens) + 512,
                                    cpus_per_rank=args.cpus_per_rank))
    pool.start()
    rows = []
    try:
        # Warm-up (first-call overheads are not what we measure).
        warm = PromptBuilder(tokenizer, task="qa", max_input_tokens=256).build(text, questions[:1])
        _run(pool, [GenerationRequest(request_id="warm", prefix_ids=warm.prefix_ids, suffix_ids=warm.suffix_ids,
                                      sampling=sampling)], 1)
        for doc_tokens in args.doc_tokens:
            builder = PromptBuilder(tokenizer, task="qa", max_input_tokens=doc_tokens)
            prompt = builder.build(text, questions)
            shared = GenerationRequest(request_id=f"shared-{doc_tokens}", prefix_ids=prompt.prefix_ids,
                                       suffix_ids=prompt.suffix_ids, sampling=sampling)
            separate = [
                GenerationRequest(request_id=f"q{i}-{doc_tokens}", prefix_ids=prompt.prefix_ids + s, suffix_ids=[[]],
                                  sampling=sampling)
                for i, s in enumerate(prompt.suffix_ids)
            ]
            reuse_s, reuse = _run(pool, [shared], 1)
            recompute_s, recompute = _run(pool, separate, 1)
            assert all(r.status == "ok" for r in reuse + recompute), [r.error_message for r in reuse + recompute]
            reuse.sort(key=lambda r: r.suffix_index)
            recompute.sort(key=lambda r: int(r.request_id[1:].split("-")[0]))
            same = [a.output_ids == b.output_ids for a, b in zip(reuse, recompute)]
            rows.append({
                "prefix_tokens": len(prompt.prefix_ids), "questions": len(questions),
                "max_new_tokens": args.max_new_tokens,
                "reuse_s": round(reuse_s, 3), "recompute_s": round(recompute_s, 3),
                "speedup": round(recompute_s / reuse_s, 2),
                "reuse_prefix_prefill_s": reuse[0].prefix_prefill_s,
                "recompute_prefill_s_sum": round(sum(r.prefill_s or 0 for r in recompute), 3),
                "same_greedy_tokens": sum(same), "compared": len(same),
            })
    finally:
        pool.shutdown()
        ray.shutdown()

    header = f"{'prefix tok':>10} {'questions':>9} {'reuse s':>8} {'recompute s':>11} {'speedup':>7} {'same tokens':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['prefix_tokens']:>10} {r['questions']:>9} {r['reuse_s']:>8.2f} {r['recompute_s']:>11.2f} "
              f"{r['speedup']:>6.2f}x {r['same_greedy_tokens']:>5}/{r['compared']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"model": args.model, "device": "cpu", "cpus_per_rank": args.cpus_per_rank,
                   "machine": platform.platform(), "cpu_count": os.cpu_count(),
                   "load_average_at_end": os.getloadavg(), "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

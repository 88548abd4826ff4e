"""Documents longer than the prompt: truncation "middle" against the hierarchical policy.

    .venv/bin/python benchmarks/long_documents.py            # about 30-60 min on 2 idle CPU cores
    .venv/bin/python benchmarks/long_documents.py --tasks qa --depths 0.1 0.5 0.9

Two documents built from the public-domain texts in examples/texts (about 32k and 50k tokens of
the embedded model), each with facts planted at depths 0.1 .. 0.9 of its text (at the paragraph
break nearest that fraction of its characters), run through the real jobs (`python -m jobs.qa`,
`python -m jobs.summarize`) with a small prompt budget, once per policy:

- qa: the pass-key test of the DCA paper: each document holds one pass key ("The pass key is
  71432. Remember it. 71432 is the pass key.") at one depth, and is asked "What is the pass key?";
  2 texts x the depths = one document each. A row is correct when its final output holds the
  number. The hierarchical policy runs with each way of combining section answers (--qa-combine
  reduce and confidence: policies `hierarchical` and `hierarchical-confidence`), and the table
  also says in how many rows the section that holds the key found it (its section output holds the
  number): what the map step found, before the combine step.
  `--qa-corpus doors` is a harder variant: five keys of five doors in one document ("The pass key
  of the blue door is 71432. ..."), one question per door; a section that holds another door's key
  answers with that key, so it measures telling near-identical facts apart as well.
- summarize: the facts are unusual sentences ("A pangolin named Bartholomew ..."); the table says
  which facts' key word reaches the final summary, and (hierarchical) a section summary.
- cost: tokens sent and generated, engine calls, the job's device-seconds (busy time of the
  forwards, summed over ranks: CPU wall time of the forwards on CPU) and its wall clock, per policy.

The prompt budget defaults to 1024 tokens: the embedded 135M model finds a planted pass key in a
~1,000-token part but not in a ~3,500-token one (it answers "The pass key is the pass key."), so a
budget of 4096 would measure the model, not the policy. The model also rarely answers NOT FOUND
for a part without the answer; the reduce step then sees wrong answers beside the right one, which
is why the map step's finding is reported separately.

Writes benchmarks/results/long_documents.json and .md (the table the README quotes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ROOT / "examples" / "texts"
RESULTS = ROOT / "benchmarks" / "results"

DOCUMENTS = {
    "kjv-mark-esther-ruth": ["kjv-mark.txt", "kjv-esther.txt", "kjv-ruth.txt"],
    "alice-arden-loc": ["alice-chapters-1-4.txt", "as-you-like-it-act-1.txt",
                        "loc-workshop-electronic-texts-part-1.txt"],
}
DEPTHS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# Policies: the job's --truncation, and for hierarchical QA its --qa-combine.
POLICY_FLAGS = {"middle": ["--truncation", "middle"], "end": ["--truncation", "end"],
                "hierarchical": ["--truncation", "hierarchical"],
                "hierarchical-confidence": ["--truncation", "hierarchical", "--qa-combine", "confidence"]}
DOORS = ["blue", "red", "green", "yellow", "white", "black", "orange", "purple", "grey"]
KEYS = ["71432", "58219", "90367", "24851", "63094", "37518", "81276", "46903", "15748"]
# Names that only one source text of a document uses: a summary that names one speaks of that
# part of the document (the texts are consecutive: the first is the head, the last the tail).
PART_NAMES = {
    "kjv-mark.txt": ["jesus", "disciple", "baptis"],
    "kjv-esther.txt": ["esther", "ahasuerus", "mordecai", "haman"],
    "kjv-ruth.txt": ["ruth", "naomi", "boaz"],
    "alice-chapters-1-4.txt": ["alice", "rabbit", "wonderland"],
    "as-you-like-it-act-1.txt": ["orlando", "rosalind", "celia", "oliver"],
    "loc-workshop-electronic-texts-part-1.txt": ["library", "digital", "electronic", "scanning"],
}
# (planted sentence, key word that must reach the summary)
STORY_FACTS = [
    ("A pangolin named Bartholomew was crowned king of the valley that morning.", "Bartholomew"),
    ("Then a lighthouse made of green glass rose out of the sea near the town.", "lighthouse"),
    ("Everyone agreed that the stolen violin had been hidden inside a giant pumpkin.", "violin"),
    ("At noon a zeppelin full of oranges landed in the middle of the market.", "zeppelin"),
    ("The old astronomer declared that the comet would return in exactly nine days.", "astronomer"),
    ("A walrus wearing a top hat opened a bakery beside the river.", "walrus"),
    ("The children discovered a tunnel of crystal running under the whole city.", "crystal"),
    ("That winter the volcano on the island began to sing like a choir.", "volcano"),
    ("A dragon made of paper guarded the library door every night.", "dragon"),
]


def plant(text: str, sentences: list[str], depths: list[float]) -> str:
    """`text` with each sentence inserted as its own paragraph at the paragraph break nearest
    depth x len(text) (characters)."""
    cuts = []
    for depth in depths:
        at = int(depth * len(text))
        before, after = text.rfind("\n\n", 0, at), text.find("\n\n", at)
        candidates = [c for c in (before, after) if c >= 0]
        cuts.append(min(candidates, key=lambda c: abs(c - at)) if candidates else at)
    out, last = [], 0
    for cut, sentence in sorted(zip(cuts, sentences)):
        out += [text[last:cut], f"\n\n{sentence}"]
        last = cut
    out.append(text[last:])
    return "".join(out)


def base_text(name: str) -> str:
    return "\n\n".join((TEXTS / f).read_text(encoding="utf-8").strip() for f in DOCUMENTS[name])


def pass_key(name: str, depth: float) -> str:
    """A 5-digit key of its own for each document (seeded: the same on every run)."""
    return str(random.Random(f"{name}@{depth}").randrange(10_000, 100_000))


def qa_corpus(depths: list[float]) -> tuple[pa.Table, dict]:
    """One document per (text, depth), each with one pass key at that depth."""
    ids, texts, questions, truth = [], [], [], {}
    for name in DOCUMENTS:
        base = base_text(name)
        for depth in depths:
            key = pass_key(name, depth)
            ids.append(f"{name}@{depth:g}")
            texts.append(plant(base, [f"The pass key is {key}. Remember it. {key} is the pass key."], [depth]))
            questions.append(["What is the pass key?"])
            truth[ids[-1]] = [(depth, key)]
    return pa.table({"id": ids, "text": texts, "questions": questions}), truth


def doors_corpus(depths: list[float]) -> tuple[pa.Table, dict]:
    """One document per text with a key per door, one door per depth, one question per door."""
    ids, texts, questions, truth = [], [], [], {}
    for name in DOCUMENTS:
        facts = [f"The pass key of the {DOORS[i]} door is {KEYS[i]}. Remember it. {KEYS[i]} is the pass key of "
                 f"the {DOORS[i]} door." for i in range(len(depths))]
        ids.append(name)
        texts.append(plant(base_text(name), facts, depths))
        questions.append([f"What is the pass key of the {DOORS[i]} door?" for i in range(len(depths))])
        truth[name] = [(depths[i], KEYS[i]) for i in range(len(depths))]
    return pa.table({"id": ids, "text": texts, "questions": questions}), truth


def summary_corpus(depths: list[float]) -> tuple[pa.Table, dict]:
    ids, texts, truth = [], [], {}
    for name in DOCUMENTS:
        facts = STORY_FACTS[: len(depths)]
        ids.append(name)
        texts.append(plant(base_text(name), [s for s, _ in facts], depths))
        truth[name] = [(depths[i], facts[i][1]) for i in range(len(depths))]
    return pa.table({"id": ids, "text": texts}), truth


def run_job(task: str, corpus: Path, output: Path, policy: str, args) -> float:
    command = [sys.executable, "-m", f"jobs.{task}", "--input", str(corpus), "--output", str(output),
               "--max-input-tokens", str(args.budget), *POLICY_FLAGS[policy], "--no-progress",
               "--max-new-tokens", str(args.qa_new_tokens if task == "qa" else args.summary_new_tokens)]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{task} ({policy}) failed with exit {done.returncode}:\n{done.stderr[-3000:]}")
    print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "", flush=True)
    return seconds


def read_rows(output: Path) -> list[dict]:
    return pq.read_table(output, columns=[
        "id", "question_index", "output", "status", "prompt_tokens", "output_tokens", "truncated_tokens", "sections",
        "levels", "calls", "section_outputs"]).to_pylist()


def cost(rows: list[dict], output: Path, wall: float) -> dict:
    """What the engine did for the job, from its _metrics.json: prompt tokens sent (a QA section's
    prefix once for all its questions), tokens generated, engine calls, device-seconds (busy time
    of the forwards summed over ranks; CPU wall time of the forwards on CPU) and the job's wall
    clock. Rows' own prefill_s + decode_s are latencies shared with the rows batched alongside:
    summed they would count the same second many times."""
    metrics = json.loads((output / "_metrics.json").read_text())
    return {
        "rows": len(rows),
        "errors": sum(r["status"] != "ok" for r in rows),
        "prompt_tokens": metrics["tokens"]["prompt"],
        "output_tokens": metrics["tokens"]["output"],
        "calls": metrics["engine_calls"],
        "device_s": round(metrics["device"]["busy_seconds_all_ranks"], 1),
        "job_wall_s": round(metrics["wall_s"], 1),
        "wall_s": round(wall, 1),
    }


def score_qa(rows: list[dict], truth: dict) -> list[dict]:
    scored = []
    for row in rows:
        depth, key = truth[row["id"]][row["question_index"]]
        found_by_map = any(key in (s["output"] or "") for s in row["section_outputs"] or [] if s["level"] == 0)
        scored.append({"id": row["id"], "depth": depth, "correct": key in (row["output"] or ""),
                       "found_by_map": found_by_map, "output": row["output"]})
    return scored


def score_summaries(rows: list[dict], truth: dict) -> list[dict]:
    scored = []
    for row in rows:
        sections = " ".join(s["output"] or "" for s in row["section_outputs"] or [] if s["level"] == 0).lower()
        for depth, word in truth[row["id"]]:
            scored.append({"id": row["id"], "depth": depth, "word": word,
                           "in_summary": word.lower() in (row["output"] or "").lower(),
                           "in_section_summary": word.lower() in sections})
    return scored


def parts_named(summary: str | None, name: str) -> list[str]:
    """The source texts of document `name` that `summary` names (PART_NAMES), in document order."""
    text = (summary or "").lower()
    return [f.removesuffix(".txt") for f in DOCUMENTS[name] if any(word in text for word in PART_NAMES[f])]


def by_depth(scored: list[dict], field: str, depths: list[float]) -> dict:
    table = {}
    for depth in depths:
        hits = [s[field] for s in scored if s["depth"] == depth]
        table[str(depth)] = f"{sum(hits)}/{len(hits)}"
    total = [s[field] for s in scored]
    table["all"] = f"{sum(total)}/{len(total)}"
    return table


def _label(policy: str, task: str) -> str:
    """A policy's name in the tables: hierarchical QA with its --qa-combine."""
    if task == "summarize" or not policy.startswith("hierarchical"):
        return policy
    return "hierarchical, --qa-combine " + ("confidence" if policy.endswith("confidence") else "reduce")


def markdown(results: dict, depths: list[float]) -> str:
    head = "| policy | " + " | ".join(f"{d:g}" for d in depths) + " | all | prompt tokens sent | generated | engine calls | device s | wall s |"
    rule = "|---" * (len(depths) + 7) + "|"
    lines = []
    for task, title, fields in (("qa", "QA: one planted pass key per document, answered, by depth",
                                 [("correct", "")]),
                                ("qa_doors", "QA, five doors' pass keys in one document: the right door's key "
                                 "answered, by depth", [("correct", "")]),
                                ("summarize", "Summaries: planted facts in the final summary, by depth",
                                 [("in_summary", "")])):
        if task not in results:
            continue
        lines += [f"**{title}** (budget {results['budget']} tokens; documents of "
                  f"{', '.join(str(n) for n in results['document_tokens'])} tokens)", "", head, rule]
        mapped = None
        for policy in sorted(results[task], key=list(POLICY_FLAGS).index):
            entry = results[task][policy]
            for field, _ in fields:
                row = entry["by_depth"][field]
                c = entry["cost"]
                lines.append(f"| {_label(policy, task)} | " + " | ".join(row[str(d)] for d in depths) +
                             f" | {row['all']} | {c['prompt_tokens']:,} | {c['output_tokens']:,} | {c['calls']} | "
                             f"{c['device_s']} | {c['wall_s']} |")
            extra = "in_section_summary" if task == "summarize" else "found_by_map"
            if extra in entry["by_depth"] and mapped is None:  # the map step: the same in every hierarchical run
                row = entry["by_depth"][extra]
                what = ("hierarchical: in a section summary" if task == "summarize" else
                        "hierarchical, map step: the section holding it found it")
                mapped = f"| {what} | " + " | ".join(row[str(d)] for d in depths) + f" | {row['all']} |" + " |" * 5
        if mapped is not None:
            lines.append(mapped)
        lines.append("")
        if task == "summarize" and any(e.get("parts_named") for e in results[task].values()):
            lines += ["**Summaries: the source texts each final summary speaks of** (a name only that text uses; "
                      "the first text is the document's head, the last its tail)", "",
                      "| policy | " + " | ".join(DOCUMENTS) + " |", "|---" * (len(DOCUMENTS) + 1) + "|"]
            for policy, entry in sorted(results[task].items(), key=lambda item: list(POLICY_FLAGS).index(item[0])):
                named = entry.get("parts_named") or {}
                lines.append(f"| {policy} | " + " | ".join(
                    f"{len(named.get(n, []))}/{len(DOCUMENTS[n])}: {', '.join(named.get(n, [])) or '-'}"
                    for n in DOCUMENTS) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["qa", "summarize"], choices=["qa", "summarize"])
    parser.add_argument("--policies", nargs="+", choices=list(POLICY_FLAGS),
                        default=["middle", "hierarchical", "hierarchical-confidence"],
                        help="hierarchical-confidence: QA only (summaries have no --qa-combine)")
    parser.add_argument("--qa-corpus", choices=["one-key", "doors"], default="one-key",
                        help="one-key: one pass key per document (default); doors: five doors' keys in one document")
    parser.add_argument("--depths", nargs="+", type=float, default=DEPTHS)
    parser.add_argument("--budget", type=int, default=1024, help="--max-input-tokens of the jobs (default 1024)")
    parser.add_argument("--qa-new-tokens", type=int, default=24)
    parser.add_argument("--summary-new-tokens", type=int, default=96)
    parser.add_argument("--out", default=str(RESULTS / "long_documents"), help="results path without extension")
    args = parser.parse_args(argv)
    if len(args.depths) > len(DOORS):
        parser.error(f"at most {len(DOORS)} depths")

    from pipeline.config.model import ModelSpec
    from pipeline.engine.models import load_tokenizer

    tokenizer = load_tokenizer(ModelSpec())
    command = "python benchmarks/long_documents.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"budget": args.budget, "depths": args.depths, "model": "smollm2 (embedded)",
               "document_tokens": [len(tokenizer(base_text(n))["input_ids"]) for n in DOCUMENTS]}
    earlier = Path(args.out).with_suffix(".json")
    if earlier.exists():
        # A run of some tasks or policies adds to the results of earlier runs with the same budget
        # and depths (each entry keeps the command that measured it); other results are replaced.
        kept = json.loads(earlier.read_text())
        if all(kept.get(k) == results[k] for k in ("budget", "depths", "document_tokens")):
            results = kept
    results.pop("command", None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or None
    with tempfile.TemporaryDirectory(prefix="long-docs-") as tmp:
        tmp = Path(tmp)
        for task in args.tasks:
            if task == "qa":
                table, truth = (qa_corpus if args.qa_corpus == "one-key" else doors_corpus)(args.depths)
            else:
                table, truth = summary_corpus(args.depths)
            corpus = tmp / f"{task}.parquet"
            pq.write_table(table, corpus)
            entry_name = "qa_doors" if task == "qa" and args.qa_corpus == "doors" else task
            results.setdefault(entry_name, {})
            for policy in args.policies:
                if task == "summarize" and policy == "hierarchical-confidence":
                    continue
                output = tmp / f"{task}-{policy}"
                wall = run_job(task, corpus, output, policy, args)
                rows = read_rows(output)
                if task == "qa":
                    scored = score_qa(rows, truth)
                    fields = ["correct"] + (["found_by_map"] if policy.startswith("hierarchical") else [])
                else:
                    scored = score_summaries(rows, truth)
                    fields = ["in_summary"] + (["in_section_summary"] if policy == "hierarchical" else [])
                results[entry_name][policy] = {
                    "command": command,
                    "commit": commit,
                    "cost": cost(rows, output, wall),
                    "by_depth": {f: by_depth(scored, f, args.depths) for f in fields},
                    "rows": scored if task == "qa" else [dict(s, summary=None) for s in scored],
                    "outputs": {r["id"]: r["output"] for r in rows} if task == "summarize" else None,
                    "parts_named": ({r["id"]: parts_named(r["output"], r["id"]) for r in rows}
                                    if task == "summarize" else None),
                    "sections": {r["id"]: [r["sections"], r["levels"]] for r in rows},
                }
                print(json.dumps({entry_name: {policy: results[entry_name][policy]["by_depth"]}}), flush=True)
                write_results(results, args)  # after every job: an interrupted run keeps what it measured
    print(markdown(results, args.depths))
    print(f"wrote {write_results(results, args)}")


def write_results(results: dict, args) -> str:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results, args.depths) + "\n")
    return f"{out.with_suffix('.json')} and {out.with_suffix('.md')}"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

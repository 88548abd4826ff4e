"""Prints a job's output rows and the headline metrics.

    .venv/bin/python examples/show_output.py out/quickstart
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pyarrow.dataset as ds


def main(output_dir: str) -> None:
    table = ds.dataset(output_dir, format="parquet").to_table(columns=[
        "id", "question", "status", "error_type", "prompt_tokens", "truncated_tokens", "output_tokens",
        "latency_s", "output", "error_message"])
    for row in sorted(table.to_pylist(), key=lambda r: (str(r["id"]), r["question"] or "")):
        head = f"{row['id']}  [{row['status']}]"
        if row["question"]:
            head += f"  Q: {row['question']}"
        if row["status"] == "ok":
            head += (f"  prompt {row['prompt_tokens']} tok (dropped {row['truncated_tokens']}), "
                     f"{row['output_tokens']} new tok, {row['latency_s']:.1f} s")
            body = row["output"]
        else:
            body = f"{row['error_type']}: {row['error_message']}"
        print(head)
        print(textwrap.indent(textwrap.fill(" ".join(body.split()), 100), "    "))
    path = os.path.join(output_dir, "_metrics.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        d, t = m["documents"], m["tokens"]
        print(f"\n{m['task']} job {m['job_id']}: {m['status']}, wall {m['wall_s']:.0f} s "
              f"(startup {m['startup_s'] or 0:.0f} s); documents ok {d['ok']}, error {d['error']}, "
              f"already committed {d['already_committed']}; tokens in {t['prompt']}, out {t['output']} "
              f"({t['output_per_s']} out tok/s); peak memory {(m['peak_memory']['max_bytes'] or 0) / 2**30:.2f} GiB "
              f"({m['peak_memory']['kind']})")
        print(f"metrics: {path}")
        if os.path.exists(os.path.join(output_dir, "_metrics.png")):
            print(f"plot:    {os.path.join(output_dir, '_metrics.png')}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: show_output.py OUTPUT_DIR")
    main(sys.argv[1])

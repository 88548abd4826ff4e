"""Print a job's output: every row (id, status, lengths, timings, output) and the job's metrics.

    python -m jobs.show out/quickstart
    python -m jobs.show /tmp/dca-answers --id kjv-ruth         # one document's rows
    python -m jobs.show /tmp/dca-nightly                        # every run_date= partition
    python -m jobs.show out/quickstart --errors                 # error rows only

Rows come in corpus order (source file, row, question). Lengths are tokens: the prompt sent to
the model, the document tokens dropped to fit --max-input-tokens, the tokens generated; a prompt
longer than DCA's pretraining_length P (the model's trained context) is marked "past P", where
the plain model would be off its training distribution. Timings are the engine's: prefill (time
to first token), decode, and the request's wall clock. Reads only the committed parts and
_metrics.json: safe on the output of a job that is still running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap

ROW_COLUMNS = [
    "id", "source_file", "source_row", "task", "question_index", "question", "output", "status", "error_type",
    "error_message", "prompt_tokens", "output_tokens", "truncated_tokens", "prefill_s", "decode_s", "latency_s",
    "gpu_time_s", "peak_memory_bytes", "memory_kind", "attempts", "dca_enabled", "dca_pretraining_length",
    "dca_chunk_size", "dca_local_window", "dca_temperature_alpha",
]


# Code points that move the cursor, recolour or retitle a terminal, or reorder what it shows: C0
# and C1 controls (ESC, CR, BEL, ...), DEL, line/paragraph separators and the bidi embedding,
# override and isolate controls (a "Trojan Source" id shows text in another order than it has).
_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
_UNSAFE = set(range(0x20)) | set(range(0x7F, 0xA0)) | _BIDI | {0x2028, 0x2029}
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}


def _escape_char(code: int) -> str:
    return _NAMED.get(code) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


_ESCAPES = {code: _escape_char(code) for code in _UNSAFE}
# In an output's body, line breaks and tabs are layout (the body is re-wrapped): kept as whitespace.
_BODY_ESCAPES = {code: text for code, text in _ESCAPES.items() if code not in (0x09, 0x0A)}


def safe(value) -> str:
    """`value` as text a terminal shows as it is: every control character and bidi control
    escaped (\\x1b, \\r, \\u202e ...). Ids, questions, messages and paths come from the data,
    and an id holding `ESC [ 2 J` must not clear the operator's screen."""
    return str(value).translate(_ESCAPES)


def _n(value) -> str:
    return "?" if value is None else f"{value:,}"


def _s(value) -> str:
    return "?" if value is None else f"{value:.1f} s"


def _gib(value) -> str:
    return "?" if value is None else f"{value / 2**30:.2f} GiB"


def row_header(row: dict) -> str:
    """One line: id, status, lengths and timings of an output row."""
    head = f"{safe(row['id']) if row['id'] is not None else '(null id)'}  [{safe(row['status'])}]"
    if row.get("question_index") is not None:
        head += f"  Q{row['question_index']}: {safe(row['question'])}"
    parts = []
    if row.get("prompt_tokens") is not None:
        prompt = f"prompt {_n(row['prompt_tokens'])} tok"
        p = row.get("dca_pretraining_length")
        if row.get("dca_enabled") and p and row["prompt_tokens"] > p:
            prompt += f" (past P={_n(p)})"
        if row.get("truncated_tokens"):
            prompt += f", {_n(row['truncated_tokens'])} dropped"
        parts.append(prompt)
    if row["status"] == "ok":
        parts.append(f"{_n(row.get('output_tokens'))} new tok")
        timing = f"prefill {_s(row.get('prefill_s'))}, decode {_s(row.get('decode_s'))}, total {_s(row.get('latency_s'))}"
        if row.get("gpu_time_s") is not None:
            timing += f", GPU {_s(row['gpu_time_s'])}"
        parts.append(timing)
        if (row.get("attempts") or 1) > 1:
            parts.append(f"{row['attempts']} attempts")
    return head + ("  " + "; ".join(parts) if parts else "")


def row_body(row: dict, width: int) -> str:
    text = row["output"] if row["status"] == "ok" else f"{row['error_type']}: {row['error_message']}"
    # Controls escaped first (CR, ESC ... become visible text); then line breaks and runs of
    # spaces are one space, and the text is wrapped to the width.
    text = " ".join((text or "").translate(_BODY_ESCAPES).split()) or "(empty)"
    return textwrap.indent(textwrap.fill(text, max(width - 4, 20)), "    ")


def dca_line(rows: list[dict], config: dict | None) -> str:
    first = next((r for r in rows if r.get("dca_enabled") is not None), None)
    prefill = (config or {}).get("prefill_block", "?")
    prefill = "one shot" if prefill is None else f"{prefill}"
    kv = (config or {}).get("kv_cache_dtype") or "auto"
    if first is None:
        return ""
    if not first["dca_enabled"]:
        return f"DCA off; prefill block {prefill}, KV cache {kv}"
    p, s, w = first["dca_pretraining_length"], first["dca_chunk_size"], first["dca_local_window"]
    return (f"DCA on: pretraining_length P={_n(p)}, chunk_size S={_n(s)}, local_window W={_n(w)}, "
            f"chunk_len L=S-W={_n(s - w) if s and w else '?'}, temperature_alpha {first['dca_temperature_alpha']:g}\n"
            f"  engine: prefill block {prefill}, KV cache {kv}")


def metrics_lines(m: dict) -> list[str]:
    d, t = m["documents"], m["tokens"]
    lines = [
        f"{safe(m['task'])} job {safe(m['job_id'])}: {safe(m['status'])}"
        + (f" ({safe(m['message'])})" if m.get("message") else ""),
        f"  wall {m['wall_s']:.0f} s, of which start-up {m.get('startup_s') or 0:.0f} s (checks, tokenizer, Ray, "
        f"model loading)",
        f"  documents: {d['input_rows']} in the input; this run ok {d['ok']}, error {d['error']}, skipped "
        f"{d['skipped']}, already committed {d['already_committed']}, truncated {d['truncated']}",
        f"  tokens: prompt {_n(t['prompt'])}, output {_n(t['output'])}, truncated {_n(t['truncated'])}; "
        f"{t.get('prompt_per_s')} prompt tok/s, {t.get('output_per_s')} output tok/s after start-up",
    ]
    dev, peak = m.get("device") or {}, m.get("peak_memory") or {}
    if dev.get("gpu_seconds_all_ranks") is not None:
        lines.append(f"  device: {dev['gpu_seconds_all_ranks']:.1f} GPU-seconds (all ranks)")
    elif dev.get("cpu_seconds_all_ranks") is not None:
        lines.append(f"  device: CPU, {dev['cpu_seconds_all_ranks']:.1f} s x ranks of requests (no GPU time)")
    if peak.get("max_bytes") is not None:
        lines.append(f"  peak memory: {_gib(peak['max_bytes'])} ({peak.get('kind')}, max over ranks)")
    if m.get("attention_backend"):
        from pipeline.engine.attention_record import describe

        lines.append("  " + describe(m["attention_backend"]))
    errors = (m.get("rows") or {}).get("error_types") or {}
    if errors:
        lines.append("  errors: " + ", ".join(f"{safe(k)} x{v}" for k, v in sorted(errors.items())))
    buckets = m.get("latency_by_prompt_tokens") or []
    if buckets:
        lines.append("  latency by prompt length (p50 / p95):")
        for b in buckets:
            lines.append(f"    {b['prompt_tokens']:>9} tokens: {b['rows']:>4} row(s), total {_s(b['latency_p50_s'])} / "
                         f"{_s(b['latency_p95_s'])}, prefill {_s(b['prefill_p50_s'])} / {_s(b['prefill_p95_s'])}")
    return lines


def show(output_dir: str, *, ids: list[str] | None = None, errors_only: bool = False, metrics: bool = True,
         width: int | None = None, out=None) -> int:
    """Prints one job output directory; returns the number of rows printed."""
    from pipeline.data.writer import committed_parts, read_output

    out = out or sys.stdout
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 110)
    if not committed_parts(output_dir):
        raise FileNotFoundError(f"{output_dir} holds no committed output (part-*.parquet): is it a job's --output?")
    rows = read_output(output_dir, columns=ROW_COLUMNS).to_pylist()
    rows.sort(key=lambda r: (r["source_file"], r["source_row"], -1 if r["question_index"] is None else r["question_index"]))
    # --id is text; an output of integer ids keeps them as integers: compared as their digits.
    wanted = {str(i) for i in ids} if ids else None
    shown = [r for r in rows if (not wanted or (r["id"] is not None and str(r["id"]) in wanted))
             and (not errors_only or r["status"] != "ok")]
    for row in shown:
        print(row_header(row), file=out)
        print(row_body(row, width), file=out)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"\n{len(rows)} row(s) in {safe(output_dir)}: ok {ok}, error {len(rows) - ok}"
          + (f"; {len(shown)} shown" if len(shown) != len(rows) else ""), file=out)
    path = os.path.join(output_dir, "_metrics.json")
    config = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        config = m.get("config")
        if metrics:
            print("\n" + "\n".join(safe(line) for line in metrics_lines(m)), file=out)
    line = dca_line(rows, config)
    if line and metrics:
        print("  " + line, file=out)
    if metrics:
        plot = os.path.join(output_dir, "_metrics.png")
        for name, file in (("metrics", path), ("plot", plot)):
            if os.path.exists(file):
                print(f"  {name}: {safe(file)}", file=out)
    return len(shown)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.show", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("output", help="a job's --output directory (or a nightly output root)")
    p.add_argument("--id", action="append", dest="ids", metavar="ID", help="only this document id (repeatable)")
    p.add_argument("--errors", action="store_true", help="only error rows")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", help="rows only")
    p.add_argument("--width", type=int, help="wrap outputs at this many columns (default: the terminal's)")
    args = p.parse_args(argv)
    directory = os.path.abspath(args.output)
    if not os.path.isdir(directory):
        print(f"error: {safe(args.output)} is not a directory", file=sys.stderr)
        return 2
    from pipeline.data.writer import committed_parts

    partitions = [] if committed_parts(directory) else sorted(
        name for name in os.listdir(directory) if name.startswith("run_date=")
        and os.path.isdir(os.path.join(directory, name)))
    try:
        if not partitions:
            show(directory, ids=args.ids, errors_only=args.errors, metrics=args.metrics, width=args.width)
        for i, name in enumerate(partitions):  # a nightly root: each date's run in turn
            print(f"{'' if i == 0 else chr(10)}== {safe(name)}", flush=True)
            show(os.path.join(directory, name), ids=args.ids, errors_only=args.errors, metrics=args.metrics,
                 width=args.width)
    except BrokenPipeError:  # `| head`
        return 0
    except (OSError, ValueError) as e:  # FileNotFoundError included
        print(f"error: {safe(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Nightly start-up at corpus scale: the skip decision BEFORE (every earlier partition read into a
Python set, as pipeline.job.summarised_before did) and AFTER (pipeline.data.nightly_record).

    .venv/bin/python benchmarks/nightly_startup.py                       # 10M-row history + a 1M one
    .venv/bin/python benchmarks/nightly_startup.py --rows 1000000 --scales 100000   # quick

HISTORY. `--rows` (id, content_hash) rows over `--partitions` nightly partitions
(OUTPUT_ROOT/run_date=YYYY-MM-DD/), written directly with pyarrow in the layout of
pipeline.output.OutputWriter (not through it: 10M rows through its per-row dicts would take an
hour): the output schema (OUTPUT_SCHEMA, every column; tiny text, "s"), zstd parts of
`--part-rows` rows (the writer's default 512: ~54 parts a night), the empty part-00000 a fresh
output starts with, and a _manifest.json of the writer's format. Nine in ten rows are new
documents, one in ten a changed version of an earlier one; 1% are error rows; the first sixth of
the nights ran under an older config hash. The content hash is the sha256 of the document's text.
Generated once under --data (default /tmp/nightly-startup-bench, outside the repo) and reused.

THE NIGHT. `--night` documents (default 50,000): half of them summarised OK before under tonight's
config (skipped), the rest new documents, changed documents, and documents whose only earlier
rows are errors or of the older config (not skipped). Every mode must give the same decision
(checked: the same mask, and exactly the expected number skipped).

MEASUREMENTS, each in a fresh subprocess (nothing cached in the process; the OS page cache is
warm for every mode alike: the history was just written or read), the whole sequence `--repeats`
times (the machine is shared: the table shows the fastest wall time of the repeats and the largest
memory). Wall time of the timed part; memory as peak RSS: /proc/self/status VmHWM over the timed
part (its window reset with /proc/self/clear_refs just before it) minus VmRSS at its start, after
imports and after loading the night's keys. RSS counts the record's memory-mapped pages that the
probe touched (file-backed, shared with the page cache).
- before: summarised_before (the removed code, verbatim below) + the set lookups of the night;
- after_first_build: no record yet (existing outputs): sync_record builds it from every
  partition, then the probe;
- after_steady: the record is current (a normal night): sync_record checks it against the
  listing (list + stat every part, no row read), then the vectorised probe; also both again five
  times in the same process (warm, the fastest; outside the timed part and the memory window),
  which shows how they scale with the history without a fresh process's first-call costs;
- after_night_update: what a night adds after its job (a new partition of the night's new and
  changed documents appended as a delta run);
- after_compaction: the merge of the runs into one base (every `max_delta_runs` nights);
- prepass: the wired-in path end to end: pipeline.io.iter_documents over the night's Parquet
  input (reading and sha256 of every text) and NightlyRecord.summarised_pairs. The BEFORE path
  did not read the input at start-up (its set lookups happened during the run's own reading).

Prints a table and writes benchmarks/results/nightly_startup.json.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

CONFIG_NOW = "3f9a1c2e7b4d8a60"  # 16 hex digits, as pipeline.job.config_hash
CONFIG_OLD = "b71e04d95c3a2f18"
FIRST_DATE = datetime.date(2025, 1, 1)
MODES = ("before", "after_first_build", "after_steady", "after_night_update", "after_compaction", "prepass")


def text_of(doc: int, version: int) -> str:
    return f"text of doc-{doc:09d} v{version}"


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def doc_id(doc: int) -> str:
    return f"doc-{doc:09d}"


def date_of(partition: int) -> str:
    return (FIRST_DATE + datetime.timedelta(days=partition)).isoformat()


# ------------------------------------------------------------------------------- the history


def _partition_table(docs: np.ndarray, versions: np.ndarray, statuses: np.ndarray, config: str, date: str) -> pa.Table:
    from pipeline.data.schema import OUTPUT_SCHEMA

    n = len(docs)
    ok = statuses == "ok"
    columns = {
        "id": pa.array([doc_id(d) for d in docs.tolist()], pa.string()),
        "source_file": pa.array(["corpus.parquet"] * n, pa.string()),
        "source_row": pa.array(np.arange(n, dtype=np.int64)),
        "task": pa.array(["summarize"] * n, pa.string()),
        "output": pa.array(np.where(ok, "s", None).tolist(), pa.string()),
        "status": pa.array(statuses.tolist(), pa.string()),
        "error_type": pa.array(np.where(ok, None, "internal_error").tolist(), pa.string()),
        "content_hash": pa.array([content_hash(text_of(d, v)) for d, v in zip(docs.tolist(), versions.tolist())],
                                 pa.string()),
        "config_hash": pa.array([config] * n, pa.string()),
        "job_id": pa.array([f"nightly-bench-{date}"] * n, pa.string()),
    }
    arrays = [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in OUTPUT_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def write_partition(root: Path, date: str, table: pa.Table, part_rows: int) -> int:
    """One partition in OutputWriter's layout: part-00000 empty, then parts of part_rows rows."""
    from pipeline.data.schema import OUTPUT_SCHEMA
    from pipeline.data.writer import MANIFEST_FORMAT

    directory = root / f"run_date={date}"
    directory.mkdir(parents=True)
    parts = [OUTPUT_SCHEMA.empty_table()] + [table.slice(i, part_rows) for i in range(0, table.num_rows, part_rows)]
    listed = []
    for i, part in enumerate(parts):
        name = f"part-{i:05d}.parquet"
        pq.write_table(part, directory / name, compression="zstd")
        listed.append({"file": name, "rows": part.num_rows, "documents": part.num_rows})
    manifest = {"format": MANIFEST_FORMAT, "job_id": f"nightly-bench-{date}", "fingerprint": f"bench-{date}",
                "config": {}, "parts": listed, "complete": True, "runs": 1, "dataflow": "driver"}
    (directory / "_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return len(parts)


def build_history(root: Path, *, rows: int, partitions: int, part_rows: int, night: int, seed: int) -> dict:
    """Writes the history and the night's input (keys + a Parquet corpus); returns its facts."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    versions = np.zeros(rows, dtype=np.int64)  # current version of each document id
    # Per history row: document, version, status, config (to choose the night from).
    row_doc = np.empty(rows, dtype=np.int64)
    row_version = np.empty(rows, dtype=np.int64)
    row_ok_now = np.zeros(rows, dtype=bool)
    row_other = np.zeros(rows, dtype=bool)  # error rows, or rows of the older config
    next_doc, at, files = 0, 0, 0
    old_config_until = partitions // 6
    per = np.full(partitions, rows // partitions)
    per[: rows % partitions] += 1
    for p in range(partitions):
        n = int(per[p])
        changed = rng.random(n) < 0.1 if next_doc else np.zeros(n, dtype=bool)
        changed_docs = np.unique(rng.integers(0, max(next_doc, 1), size=int(changed.sum())))
        new = n - len(changed_docs)
        docs = np.concatenate([changed_docs, np.arange(next_doc, next_doc + new)])
        next_doc += new
        versions[changed_docs] += 1
        doc_versions = versions[docs]
        statuses = np.where(rng.random(n) < 0.01, "error", "ok")
        config = CONFIG_OLD if p < old_config_until else CONFIG_NOW
        table = _partition_table(docs, doc_versions, statuses, config, date_of(p))
        files += write_partition(root, date_of(p), table, part_rows)
        row_doc[at:at + n], row_version[at:at + n] = docs, doc_versions
        row_ok_now[at:at + n] = (statuses == "ok") & (config == CONFIG_NOW)
        row_other[at:at + n] = ~row_ok_now[at:at + n]
        at += n
    # The night: half summarised OK under tonight's config; the rest new, changed, or only ever
    # seen as errors / under the older config. Every document id once.
    half = night // 2
    skipped_rows = rng.choice(np.flatnonzero(row_ok_now), size=min(3 * half, int(row_ok_now.sum())), replace=False)
    _, first = np.unique(row_doc[skipped_rows], return_index=True)
    skipped_rows = skipped_rows[np.sort(first)][:half]
    taken = set(row_doc[skipped_rows].tolist())
    other_rows = [r for r in rng.choice(np.flatnonzero(row_other), size=4 * (night // 10), replace=False).tolist()
                  if row_doc[r] not in taken and not taken.add(row_doc[r])][: night // 10]
    changed_docs = [d for d in rng.choice(next_doc, size=4 * (night // 5), replace=False).tolist()
                    if d not in taken and not taken.add(d)][: night // 5]
    new_count = night - len(skipped_rows) - len(other_rows) - len(changed_docs)
    keys = ([(int(row_doc[r]), int(row_version[r])) for r in skipped_rows]
            + [(int(row_doc[r]), int(row_version[r])) for r in other_rows]
            + [(d, int(versions[d]) + 1) for d in changed_docs]
            + [(d, 0) for d in range(next_doc, next_doc + new_count)])
    order = rng.permutation(len(keys))
    keys = [keys[i] for i in order]
    texts = [text_of(d, v) for d, v in keys]
    night_dir = root.parent / "night"
    (night_dir / "input").mkdir(parents=True)
    pq.write_table(pa.table({"id": [doc_id(d) for d, _ in keys], "text": texts}), night_dir / "input" / "corpus.parquet")
    pq.write_table(pa.table({"id": [doc_id(d) for d, _ in keys], "content_hash": [content_hash(t) for t in texts]}),
                   night_dir / "keys.parquet")
    # Tonight's own partition (for the update measurement): its new and changed documents, OK.
    not_skipped = np.ones(len(keys), dtype=bool)
    not_skipped[np.argsort(order)[: len(skipped_rows)]] = False
    tonight = np.flatnonzero(not_skipped)
    np.savez(night_dir / "tonight.npz", docs=np.array([keys[i][0] for i in tonight]),
             versions=np.array([keys[i][1] for i in tonight]))
    return {"rows": rows, "partitions": partitions, "part_files": files, "part_rows": part_rows,
            "documents": int(next_doc), "night_documents": len(keys), "expected_skipped": len(skipped_rows),
            "older_config_partitions": old_config_until, "seed": seed}


def history(data: Path, *, rows: int, partitions: int, part_rows: int, night: int, seed: int) -> tuple[Path, dict]:
    """The generated history for these parameters (built once, reused)."""
    params = {"rows": rows, "partitions": partitions, "part_rows": part_rows, "night": night, "seed": seed}
    base = data / f"rows{rows}-p{partitions}-pr{part_rows}-n{night}-s{seed}"
    facts_path = base / "facts.json"
    if facts_path.exists():
        facts = json.loads(facts_path.read_text())
        if facts.get("params") == params:
            return base / "root", facts
    shutil.rmtree(base, ignore_errors=True)
    start = time.monotonic()
    facts = build_history(base / "root", rows=rows, partitions=partitions, part_rows=part_rows, night=night, seed=seed)
    facts.update(params=params, generated_s=round(time.monotonic() - start, 1))
    facts_path.write_text(json.dumps(facts, indent=2))
    return base / "root", facts


def reset(root: Path, partitions: int) -> None:
    """Back to the generated history: no record, no partitions added by earlier measurements."""
    shutil.rmtree(root / "_nightly_record", ignore_errors=True)
    for p in range(partitions, partitions + 3):
        shutil.rmtree(root / f"run_date={date_of(p)}", ignore_errors=True)


# ------------------------------------------------------------------------------- BEFORE


def summarised_before(output_root: str, run_date: str, cfg_hash: str) -> set[tuple[str, str]]:
    """(id, content_hash) of documents summarised OK in earlier partitions with this config hash.

    Verbatim the code of pipeline.job.summarised_before before the nightly record replaced it."""
    import pyarrow.compute as pc

    from pipeline.data.writer import committed_parts, read_output

    done: set[tuple[str, str]] = set()
    if not os.path.isdir(output_root):
        return done
    for name in sorted(os.listdir(output_root)):
        if not name.startswith("run_date=") or name >= f"run_date={run_date}":
            continue
        directory = os.path.join(output_root, name)
        if not committed_parts(directory):
            continue
        table = read_output(directory, columns=["id", "content_hash", "config_hash", "status"])
        keep = pc.and_(pc.equal(table["status"], "ok"), pc.equal(table["config_hash"], cfg_hash))
        table = table.filter(keep)
        done.update(zip(table["id"].to_pylist(), table["content_hash"].to_pylist()))
    return done


# ------------------------------------------------------------------------------- one measurement


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Starts a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM to VmRSS), so
    that what setup allocated before the timed part (imports, the night's keys) is not counted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(mode: str, root: Path, partitions: int) -> dict:
    """Runs in a fresh process: the timed part of one mode, its peak RSS over its start."""
    from pipeline.data.nightly_record import RecordSettings, sync_record

    night_dir = root.parent / "night"
    keys = pq.read_table(night_dir / "keys.parquet")
    ids, hashes = keys["id"].to_pylist(), keys["content_hash"].to_pylist()
    tonight = date_of(partitions)
    if mode == "after_night_update":
        saved = np.load(night_dir / "tonight.npz")
        table = _partition_table(saved["docs"], saved["versions"], np.array(["ok"] * len(saved["docs"])),
                                 CONFIG_NOW, tonight)
        write_partition(root, tonight, table, 512)
    if mode == "after_compaction":  # two more nights appended: three runs to merge
        for extra in (1, 2):
            table = _partition_table(np.array([10**8 + extra]), np.array([0]), np.array(["ok"]), CONFIG_NOW,
                                     date_of(partitions + extra))
            write_partition(root, date_of(partitions + extra), table, 512)
            sync_record(str(root))
    import gc

    gc.collect()
    window = _reset_peak()
    rss_start = _status_kib("VmRSS") * 1024
    anon_start, file_start = _status_kib("RssAnon") * 1024, _status_kib("RssFile") * 1024
    start = time.perf_counter()
    extra = {}
    if mode == "before":
        done = summarised_before(str(root), tonight, CONFIG_NOW)
        mask = np.fromiter(((i, h) in done for i, h in zip(ids, hashes)), dtype=bool, count=len(ids))
        extra["set_size"] = len(done)
    elif mode == "prepass":
        from pipeline.data.input import InputSpec, check_input, iter_documents

        record = sync_record(str(root))
        plan = check_input(InputSpec(path=str(night_dir / "input"), id_column="id", text_column="text"))
        done = record.summarised_pairs(((d.id, d.content_hash) for d in iter_documents(plan)),
                                       config_hash=CONFIG_NOW, run_date=tonight)
        mask = np.fromiter(((i, h) in done for i, h in zip(ids, hashes)), dtype=bool, count=len(ids))
        extra["sync_action"] = record.report.action
    elif mode == "after_compaction":
        record = sync_record(str(root), compact=True, settings=RecordSettings(max_delta_runs=1))
        extra.update(sync_action=record.report.action, runs=record.report.runs)
        mask = None
    elif mode == "after_night_update":
        record = sync_record(str(root))
        extra.update(sync_action=record.report.action, rows_read=record.report.rows_read, runs=record.report.runs)
        mask = None
    else:
        record = sync_record(str(root))
        synced = time.perf_counter()
        mask = record.summarised(ids, hashes, config_hash=CONFIG_NOW, run_date=tonight)
        extra.update(sync_action=record.report.action, sync_s=round(synced - start, 4),
                     probe_s=round(time.perf_counter() - synced, 4), entries=record.entries,
                     runs=record.report.runs, rows_read=record.report.rows_read)
    wall = time.perf_counter() - start
    # What the process holds at the end of the timed part (the record still mapped): anonymous
    # memory (allocations) and file-backed pages (the record's pages the probe touched).
    extra.update(anon_growth_bytes=max(_status_kib("RssAnon") * 1024 - anon_start, 0),
                 file_growth_bytes=max(_status_kib("RssFile") * 1024 - file_start, 0))
    # VmHWM since the reset (else the process's whole life: an upper bound, said in the result).
    peak = _status_kib("VmHWM") * 1024
    if mode == "after_steady":  # the same again, warm (first-call costs gone): how it scales with N
        timings = []
        for _ in range(5):
            t0 = time.perf_counter()
            again = sync_record(str(root))
            t1 = time.perf_counter()
            again.summarised(ids, hashes, config_hash=CONFIG_NOW, run_date=tonight)
            timings.append((t1 - t0, time.perf_counter() - t1))
        extra.update(warm_sync_s=round(min(t[0] for t in timings), 4), warm_probe_s=round(min(t[1] for t in timings), 4))
    result = {"mode": mode, "wall_s": round(wall, 4), "rss_before_bytes": rss_start, "peak_rss_bytes": peak,
              "peak_rss_over_start_bytes": max(peak - rss_start, 0), "peak_window": "timed part" if window else
              "whole process (clear_refs not writable)", **extra}
    if mask is not None:
        result.update(skipped=int(mask.sum()), mask_sha256=hashlib.sha256(np.packbits(mask).tobytes()).hexdigest())
    return result


def run_mode(mode: str, root: Path, partitions: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", mode, "--root", str(root),
                          "--partitions", str(partitions)], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"measurement {mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- main


def _mib(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="history rows (the main scale)")
    parser.add_argument("--scales", type=int, nargs="*", default=[1_000_000],
                        help="further history sizes, same partitions, for how the after-time scales")
    parser.add_argument("--partitions", type=int, default=365)
    parser.add_argument("--part-rows", type=int, default=512, help="rows per part file (OutputWriter's default)")
    parser.add_argument("--night", type=int, default=50_000, help="documents in the night's input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="times the whole sequence of modes is measured")
    parser.add_argument("--data", default="/tmp/nightly-startup-bench", help="where the history is generated")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "nightly_startup.json"))
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.root), args.partitions)))
        return

    started = time.monotonic()
    results = {"command": "benchmarks/nightly_startup.py " + " ".join(sys.argv[1:]),
               "machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpus": os.cpu_count(), "numpy": np.__version__, "pyarrow": pa.__version__},
               "memory_measure": "peak RSS over the timed part of a fresh subprocess (VmHWM after a clear_refs "
                                 "reset) minus its VmRSS at the start of that part; includes the record's "
                                 "memory-mapped pages it touched",
               "repeats": args.repeats,
               "histories": []}
    for rows in sorted({args.rows, *args.scales}, reverse=True):
        root, facts = history(Path(args.data), rows=rows, partitions=args.partitions, part_rows=args.part_rows,
                              night=args.night, seed=args.seed)
        print(f"history: {rows:,} rows over {args.partitions} partitions ({facts['part_files']:,} part files) "
              f"in {root}" + (f", generated in {facts['generated_s']} s" if "generated_s" in facts else ""),
              flush=True)
        repeats = []
        for repeat in range(args.repeats):
            reset(root, args.partitions)
            measured = {}
            for mode in MODES:  # in this order: each mode finds the record the one before left
                measured[mode] = run_mode(mode, root, args.partitions)
                print(f"  [{repeat + 1}/{args.repeats}] {mode:20s} {measured[mode]['wall_s']:9.3f} s  "
                      f"peak RSS +{_mib(measured[mode]['peak_rss_over_start_bytes'])} MiB", flush=True)
            decisions = {m: (r["skipped"], r["mask_sha256"]) for m, r in measured.items() if "mask_sha256" in r}
            if len(set(decisions.values())) != 1 or measured["before"]["skipped"] != facts["expected_skipped"]:
                raise SystemExit(f"the modes disagree: {decisions}, expected {facts['expected_skipped']} skipped")
            repeats.append(measured)
        reset(root, args.partitions)
        summary = {}
        for mode in MODES:
            runs = [r[mode] for r in repeats]
            fastest = min(runs, key=lambda r: r["wall_s"])
            summary[mode] = {**fastest, "wall_s_repeats": [r["wall_s"] for r in runs],
                             "peak_rss_over_start_bytes": max(r["peak_rss_over_start_bytes"] for r in runs)}
        results["histories"].append({"facts": facts, "measurements": summary, "decisions_agree": True,
                                     "skipped": summary["before"]["skipped"]})
    results["total_s"] = round(time.monotonic() - started, 1)

    print()
    print(f"Nightly start-up: skip decision for a night of {args.night:,} documents (half already summarised); "
          f"fastest wall time of {args.repeats} and peak RSS over the timed part (fresh process each)")
    header = f"{'history rows':>13} {'mode':22} {'wall s':>9} {'peak RSS MiB':>13}  notes"
    print(header)
    print("-" * len(header))
    for entry in results["histories"]:
        for mode, r in entry["measurements"].items():
            notes = []
            if "sync_action" in r:
                notes.append(f"record {r['sync_action']}")
            if "sync_s" in r:
                notes.append(f"sync {r['sync_s']:.3f} s + probe {r['probe_s']:.3f} s")
            if "warm_probe_s" in r:
                notes.append(f"warm: sync {r['warm_sync_s']:.3f} s + probe {r['warm_probe_s']:.3f} s")
            notes.append(f"held at end: +{_mib(r['anon_growth_bytes'])} MiB anon, "
                         f"+{_mib(r['file_growth_bytes'])} MiB file-backed")
            if "set_size" in r:
                notes.append(f"set of {r['set_size']:,}")
            if r.get("rows_read"):
                notes.append(f"{r['rows_read']:,} rows read")
            print(f"{entry['facts']['rows']:>13,} {mode:22} {r['wall_s']:9.3f} "
                  f"{_mib(r['peak_rss_over_start_bytes']):>13}  {'; '.join(notes)}")
    main_entry = results["histories"][0]["measurements"]
    results["ratios"] = {
        "before_over_after_steady_wall": round(main_entry["before"]["wall_s"] / main_entry["after_steady"]["wall_s"], 1),
        "before_over_after_first_build_wall": round(
            main_entry["before"]["wall_s"] / main_entry["after_first_build"]["wall_s"], 2),
    }
    if len(results["histories"]) > 1:
        small = results["histories"][-1]
        results["scaling"] = {
            "rows": [h["facts"]["rows"] for h in results["histories"]],
            "after_steady_wall_s": [h["measurements"]["after_steady"]["wall_s"] for h in results["histories"]],
            "after_steady_probe_s": [h["measurements"]["after_steady"]["probe_s"] for h in results["histories"]],
            "before_wall_s": [h["measurements"]["before"]["wall_s"] for h in results["histories"]],
            "after_first_build_wall_s": [h["measurements"]["after_first_build"]["wall_s"]
                                         for h in results["histories"]],
        }
        print(f"\nafter_steady: {small['measurements']['after_steady']['wall_s']:.3f} s at {small['facts']['rows']:,} "
              f"rows, {main_entry['after_steady']['wall_s']:.3f} s at {results['histories'][0]['facts']['rows']:,}")
    print(f"before / after (steady): {results['ratios']['before_over_after_steady_wall']}x wall time; "
          f"whole benchmark {results['total_s']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

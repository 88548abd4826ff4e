"""Compiles every DCA Triton kernel variant for sm_80 (A100) and sm_90a (H100) on this CPU machine.

    .venv/bin/python benchmarks/kernel_compile.py               # writes benchmarks/results/kernel_compile.json
    .venv/bin/python benchmarks/kernel_compile.py --targets sm_80 --geometries llama2-70b-tp2
    .venv/bin/python benchmarks/kernel_compile.py --before --families --geometries llama2-70b-tp2 \
        --output benchmarks/results/kernel_compile_before.json
        # the kernels of commit d01be6f (before issue 18's fixes), through an adapter that records
        # their launches the way the current module does natively; one variant per family (that
        # module specialised every size argument: 131 binaries per target at the 70B shapes alone)

No GPU needed: the real Triton compiler and the ptxas binaries inside the triton wheel, with a
driver stand-in (dca/compile_check.py says how). Prints one line per variant and a summary; exits 1
when a variant does not compile, needs more shared memory than the target has, or collapsed (<= 32
registers with > 8 KiB of spills); exits 2 when triton is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, whatever the caller's environment says
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEFORE_REV = "d01be6f"  # main before issue 18: the kernels the review compiled

# Appended to the old module's source: implements `recording` / `recording_use` (the interface
# dca/compile_check.py enumerates with) by wrapping its kernels and tile choices.
_LEGACY_ADAPTER = '''

# --- added by benchmarks/kernel_compile.py --before: launch recording for the compile check ---
import contextlib as _contextlib

_REC = dict(sink=None, use="", sms=0)


class _Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _REC["sink"](self.kernel, args, kwargs, _REC["use"])
        return launch


@_contextlib.contextmanager
def recording(arch, sm_count, sink):
    saved = {n: globals()[n] for n in ("_prefill_kernel", "_decode_kernel", "_decode_reduce_kernel", "_store_kernel",
                                       "_tile_choices", "_launch_with_fallback", "_num_splits")}
    tile_choices = saved["_tile_choices"]

    def all_tiles(kind, device, dtype, launch):
        result = None
        for tiles in tile_choices(kind, torch.device("cuda"), dtype):
            result = launch(tiles)
        return result

    def splits(q, batch_heads, capacity, block_n):
        blocks = max(1, triton.cdiv(capacity, block_n))
        return max(1, min(blocks, triton.cdiv(2 * _REC["sms"], batch_heads), 256))

    try:
        for n in ("_prefill_kernel", "_decode_kernel", "_decode_reduce_kernel", "_store_kernel"):
            globals()[n] = _Recorder(saved[n])
        globals()["_tile_choices"] = lambda kind, device, dtype: tile_choices(kind, torch.device("cuda"), dtype)
        globals()["_launch_with_fallback"] = all_tiles
        globals()["_num_splits"] = splits
        _REC.update(sink=sink, sms=sm_count)
        yield
    finally:
        globals().update(saved)
        _REC.update(sink=None)


@_contextlib.contextmanager
def recording_use(use):
    _REC["use"] = use
    yield
'''


def legacy_module(rev: str) -> tuple[str, str]:
    """Writes dca/triton_kernels.py of `rev` plus the recording adapter as an importable module."""
    source = subprocess.run(["git", "show", f"{rev}:dca/triton_kernels.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    folder = tempfile.mkdtemp(prefix="dca-kernels-before-")
    name = f"dca_triton_kernels_{rev}"
    Path(folder, f"{name}.py").write_text(source + _LEGACY_ADAPTER)
    sys.path.insert(0, folder)
    return name, folder


def print_table(report: dict) -> None:
    print("\n| target | variant | regs | spill st/ld B | stack B | smem KB | compile s (cpu) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in report["rows"]:
        if not r.get("ok"):
            print(f"| {r['target']} | {r['label']} | FAILED: {r.get('error', '')[:120]} | | | | |")
            continue
        print(f"| {r['target']} | {r['label']} | {r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} | "
              f"{r['stack_frame_bytes']} | {r['shared_bytes'] / 1024:.1f} | {r['compile_cpu_s']:.1f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="*", default=["sm_80", "sm_90a"])
    p.add_argument("--geometries", nargs="*", default=None, help="names from dca.compile_check.GEOMETRIES")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core)")
    p.add_argument("--before", action="store_true", help=f"the kernels of commit {BEFORE_REV}")
    p.add_argument("--families", action="store_true",
                   help="one variant per (kernel, dtypes, constexprs, warps, stages), not per integer specialisation")
    p.add_argument("--output", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("kernel_compile: triton is not installed (pip install triton, or the project's test extra)", file=sys.stderr)
        return 2
    from dca import compile_check

    unknown = [t for t in args.targets if t not in compile_check.TARGETS]
    names = {g.name: g for g in compile_check.GEOMETRIES}
    unknown += [g for g in args.geometries or () if g not in names]
    if unknown:
        print(f"kernel_compile: unknown target or geometry {unknown}; targets {list(compile_check.TARGETS)}, "
              f"geometries {list(names)}", file=sys.stderr)
        return 2
    geometries = tuple(names[g] for g in args.geometries) if args.geometries else compile_check.GEOMETRIES
    module, extra = "dca.triton_kernels", []
    if args.before:
        module, folder = legacy_module(BEFORE_REV)
        extra = [folder]
        geometries = tuple(dataclasses.replace(g, packed=False) for g in geometries)
    output = Path(args.output or ROOT / "benchmarks" / "results" / "kernel_compile.json")

    def progress(row, done, total):
        if not args.quiet:
            status = (f"{row['registers']:3d} regs, spills {row['spill_store_bytes']}/{row['spill_load_bytes']} B, "
                      f"smem {row['shared_bytes'] / 1024:.0f} KB" if row.get("ok") else "FAILED")
            print(f"[{done}/{total}] {row['target']} {row['label']}: {status} ({row.get('compile_cpu_s', 0):.1f} s cpu)",
                  flush=True)

    started = time.time()
    report = compile_check.run_check(tuple(args.targets), geometries, args.workers, module, extra, progress=progress,
                                     families_only=args.families)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=commit + ("-dirty" if dirty else ""), kernels=BEFORE_REV if args.before else "working tree",
        command=" ".join(["benchmarks/kernel_compile.py", *(argv if argv is not None else sys.argv[1:])]),
        cpu_count=os.cpu_count(), load_average_at_start=os.getloadavg(), **report,
    )
    report["problems"] = compile_check.problems(report)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    if not args.quiet:
        print_table(report)
    print(f"\n{sum(report['variants_per_target'].values())} variants ({report['variants_per_target']}), "
          f"{report['wall_s']:.0f} s wall with {report['workers']} workers, {report['compile_cpu_s']:.0f} s of compile "
          f"CPU; triton {report['triton']}; wrote {output} ({time.time() - started:.0f} s)")
    for line in report["problems"]:
        print("PROBLEM:", line)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

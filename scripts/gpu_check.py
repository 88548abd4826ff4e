"""The prepared GPU check: one command, one JSON, under 8 minutes on one H100; stops at the first
failure.

    PYTHONPATH=. python scripts/gpu_check.py                 # writes benchmarks/results/gpu_check.json
    PYTHONPATH=. python scripts/gpu_check.py --cpu-smoke --output /tmp/gpu_check_smoke.json
        # every step that can run without a GPU, on tiny shapes, the kernels in Triton's
        # interpreter (tests/dca/test_gpu_check_smoke.py): proves the script, not the GPU

Needs only torch (CUDA), triton and transformers (no Ray, DeepSpeed or flash-attn: one process).
Steps, in order (each a record in the JSON: status ok / failed / skipped, seconds, details):

1. versions     driver, CUDA runtime, torch, Triton, the ptxas Triton uses for this GPU, the GPU
                (name, compute capability, SMs, shared memory per block)
2. trivial      one trivial Triton kernel compiled, loaded and run (a driver that cannot load
                Triton's cubins fails here, before anything else)
3. warmup       every kernel variant the product launches at the Llama-2-70B per-rank shapes (32
                query heads, 4 KV heads, head_dim 128, a 100k-slot cache, batch 8; bf16, fp16,
                fp32; int8 KV; every tile of this GPU's lists), compiled in parallel by
                dca/compile_check.py for this GPU's target, then loaded here: registers and
                spills as the driver reports them, shared memory
4. correctness  odd cases against the float64 reference (tests/dca/reference.py): chunk length
                40, left-padded rows, a row with no real tokens, 1/3/16/40/300 queries, bf16,
                fp16, fp32, int8 KV (stored by the store kernel: equal to kv_quant bit for bit),
                packed rows in one launch (decode rows split and merged in the launch); every
                output finite
5. selfcheck    the start-up self-check of dca.backends / dca.selfcheck when that module exists
                (skipped with a note otherwise)
6. cuda_graph   decode steps with torch.cuda.set_sync_debug_mode("error") (any host sync
                raises), then replayed from a CUDA graph, equal to the eager steps
7. tile_sweep   the prefill tile candidates at 32k tokens (benchmarks/gpu_bench.py)
8. timings      benchmarks/gpu_bench.py (prefill, attention and decode, plain vs DCA)

Exit code: 0 all steps ok or skipped, 1 a step failed, 2 a usage or environment error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Correctness cases: L = 40 (chunk boundaries off every tile grid), three rows: one full, one
# left-padded by 37 slots, one of pads only.
CHECK_DCA = dict(pretraining_length=64, chunk_size=48, local_window=8)
QUERIES = (1, 3, 16, 40, 300)
SMOKE_QUERIES = (1, 3, 16, 40)
# Errors relative to the largest reference value: 8 unit roundoffs of half types (the query
# rotation, probabilities and output are rounded once each), 1e-5 for float32 (tests hold it).
TOLERANCE = {"bfloat16": 8 * 2.0**-8, "float16": 8 * 2.0**-11, "float32": 1e-5}


class Check:
    """Runs the steps in order, records each, stops at the first failure."""

    def __init__(self, smoke: bool, output: Path):
        self.smoke, self.output = smoke, output
        self.results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "mode": "cpu-smoke (Triton interpreter, tiny shapes)" if smoke else "gpu",
                        "steps": [], "passed": None}
        self.context: dict = {}

    def run(self, steps) -> bool:
        start = time.perf_counter()
        for name, step in steps:
            t0 = time.perf_counter()
            record = {"step": name}
            print(f"--- {name}", flush=True)
            try:
                detail = step(self)
                status = "skipped" if isinstance(detail, dict) and detail.get("skipped") else "ok"
                record.update(status=status, details=detail)
            except Exception as error:  # noqa: BLE001 - the check reports, then stops
                record.update(status="failed", error=f"{type(error).__name__}: {error}"[:3000],
                              traceback=traceback.format_exc()[-4000:])
            record["seconds"] = round(time.perf_counter() - t0, 2)
            self.results["steps"].append(record)
            print(json.dumps({k: record[k] for k in ("step", "status", "seconds")} |
                             ({"error": record["error"][:500]} if "error" in record else {})), flush=True)
            self.save(time.perf_counter() - start)
            if record["status"] == "failed":
                self.results["passed"] = False
                self.results["stopped_at"] = name
                self.save(time.perf_counter() - start)
                return False
        self.results["passed"] = True
        self.save(time.perf_counter() - start)
        return True

    def save(self, seconds: float) -> None:
        self.results["seconds"] = round(seconds, 1)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(json.dumps(self.results, indent=1, default=str) + "\n")


# --- 1. versions ---------------------------------------------------------------------------------


def step_versions(check: Check) -> dict:
    import torch
    import triton

    from dca import compile_check

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "triton": triton.__version__, "ptxas": compile_check.ptxas_versions()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    if check.smoke:
        out["gpu"] = None
        return out
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    out["gpu"] = dict(name=props.name, capability=f"{major}.{minor}", sms=props.multi_processor_count,
                      memory_gib=round(props.total_memory / 2**30, 1),
                      shared_memory_per_block_optin=getattr(props, "shared_memory_per_block_optin", None))
    driver = torch._C._cuda_getDriverVersion() if hasattr(torch._C, "_cuda_getDriverVersion") else None
    out["driver_cuda_version"] = f"{driver // 1000}.{driver % 1000 // 10}" if driver else None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        out["driver"] = None
    target = "sm_90a" if major >= 9 else "sm_80"
    release = out["ptxas"].get(target, {}).get("release")
    if release and out["driver_cuda_version"]:
        newer = tuple(map(int, release.split(".")[:2])) > tuple(map(int, out["driver_cuda_version"].split(".")))
        out["note"] = (f"Triton assembles for this GPU with the CUDA {release} ptxas; the driver supports CUDA "
                       f"{out['driver_cuda_version']}" + (": the driver may refuse those cubins (the next step tells)"
                                                          if newer else ": new enough"))
    check.context["capability"] = major * 10 + minor
    return out


# --- 2. one trivial kernel -----------------------------------------------------------------------


def step_trivial(check: Check) -> dict:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, tl.load(X + offs) + 1.0)

    device = "cpu" if check.smoke else "cuda"
    x = torch.arange(1024, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    add_one[(1,)](x, y, N=1024)
    if not torch.equal(y.cpu(), (x + 1).cpu()):
        raise AssertionError("the trivial kernel computed a wrong result")
    return {"result": "x + 1 exact", "device": device}


# --- 3. warm-up of every variant -----------------------------------------------------------------


def step_warmup(check: Check) -> dict:
    """Compile every variant for this GPU in parallel (real compiler, a shared Triton cache), then
    load each one here through the driver."""
    import dataclasses

    from dca import compile_check

    geometry = compile_check.GEOMETRIES[0]  # llama2-70b-tp2
    if check.smoke:  # the same code on the tiny test shapes, one dtype, compiled for sm_80 only
        tiny = dataclasses.replace(compile_check.GEOMETRIES[-1], combos=(("float16", "auto"),),
                                   prefill_queries=(20,), decode_queries=(1, 3))
        report = compile_check.run_check(("sm_80",), (tiny,), workers=2)
        return {"skipped": False, "note": "cpu smoke: compiled for sm_80 with the driver stand-in, not loaded",
                "variants": len(report["rows"]), "problems": compile_check.problems(report),
                "compile_wall_s": report["wall_s"]}
    import torch

    props = torch.cuda.get_device_properties(0)
    capability = check.context["capability"]
    target = compile_check.Target(
        name=f"sm_{capability}" + ("a" if capability == 90 else ""), arch=capability,
        smem_limit=getattr(props, "shared_memory_per_block_optin", 0) or compile_check.TARGETS["sm_80"].smem_limit,
        smem_source="this GPU (torch.cuda.get_device_properties)", sm_count=props.multi_processor_count, gpu=props.name)
    cache = tempfile.mkdtemp(prefix="dca-gpu-check-cache-")
    report = compile_check.run_check((target,), (geometry,), workers=os.cpu_count(), cache_dir=cache)
    problems = compile_check.problems(report)
    os.environ["TRITON_CACHE_DIR"] = cache  # the loads below find the binaries compiled above
    rows, failures = [], []
    for row in report["rows"]:
        loaded = compile_check.load_on_device(row)
        rows.append({"label": row["label"], "table_registers": row.get("registers"),
                     "table_spills": [row.get("spill_store_bytes"), row.get("spill_load_bytes")], **loaded})
        if not loaded.get("ok"):
            failures.append(f"{row['label']}: {loaded.get('error')}")
        elif row.get("registers") is not None and loaded["registers"] != row["registers"]:
            failures.append(f"{row['label']}: the driver reports {loaded['registers']} registers, ptxas said "
                            f"{row['registers']}")
    details = {"target": dataclasses.asdict(target), "variants": len(rows), "compile_wall_s": report["wall_s"],
               "rows": rows, "problems": problems}
    if problems or failures:
        raise AssertionError(f"{len(problems) + len(failures)} variants failed: " + "; ".join((problems + failures)[:10]))
    return details


# --- 4. correctness on odd cases -------------------------------------------------------------------


def _relative_error(got, ref) -> float:
    return float((got.double().cpu() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def step_correctness(check: Check) -> dict:
    import torch

    from dca import DCAConfig, triton_kernels
    from dca.kv_quant import quantize_int8
    from tests.dca.reference import reference_cache_attention

    config = DCAConfig(**CHECK_DCA)  # L = 40
    device = torch.device("cpu" if check.smoke else "cuda")
    hq, hkv, d = (4, 2, 16) if check.smoke else (8, 1, 128)  # group 8 as at 70B per rank
    dtypes = ("float32", "float16") if check.smoke else ("bfloat16", "float16", "float32")
    queries = SMOKE_QUERIES if check.smoke else QUERIES
    g = torch.Generator().manual_seed(0)
    angles = torch.arange(config.chunk_size + 1, dtype=torch.float64)[:, None] * torch.linspace(0.02, 1.0, d // 2,
                                                                                                dtype=torch.float64).repeat(2)
    rows, failures = [], []
    for tq in queries:
        seq_end = tq + 61  # 61 past tokens: several chunks of 40 before the queries
        capacity = seq_end + 7
        row_start = torch.tensor([0, 37, seq_end], dtype=torch.int32)  # full, left-padded, pads only
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
            for kv in ("auto", "int8"):
                q = torch.randn(3, hq, tq, d, generator=g).to(dtype)
                new_k = torch.randn(3, hkv, seq_end, d, generator=g).to(dtype)  # the tokens, keys not rotated
                new_v = torch.randn(3, hkv, seq_end, d, generator=g).to(dtype)
                int8 = kv == "int8"
                k = torch.zeros(3, hkv, capacity, d, dtype=torch.int8 if int8 else dtype, device=device)
                v = torch.zeros_like(k)
                ks = torch.zeros(3, hkv, capacity, device=device) if int8 else None
                vs = torch.zeros(3, hkv, capacity, device=device) if int8 else None
                dev = lambda t: t.to(device)  # noqa: E731
                triton_kernels.store(dev(new_k), dev(new_v), k, v, dev(cos), dev(sin), dev(row_start),
                                     torch.zeros(1, dtype=torch.int32, device=device), config.chunk_len, ks, vs)
                if int8:  # the store kernel's int8 equals kv_quant's, value for value
                    ref_v, ref_vs = quantize_int8(new_v)
                    if not (torch.equal(v[:, :, :seq_end].cpu(), ref_v) and torch.equal(vs[:, :, :seq_end].cpu(), ref_vs[..., 0])):
                        failures.append(f"tq={tq} {dtype_name}: int8 values stored differ from kv_quant.quantize_int8")
                scale = torch.tensor([d**-0.5, 1.3 * d**-0.5, d**-0.5])
                out = triton_kernels.attention(dev(q), k, v, dev(row_start), torch.tensor([seq_end], dtype=torch.int32,
                                               device=device), dev(scale), dev(cos), dev(sin), config, ks, vs)
                kc, vc = k.cpu(), v.cpu()
                ref = reference_cache_attention(q, kc, vc, row_start, seq_end, scale, cos, sin, config,
                                                None if ks is None else ks.cpu(), None if vs is None else vs.cpu())
                err = _relative_error(out, ref)
                finite = bool(torch.isfinite(out).all())
                pads_zero = not out[2].any()
                ok = finite and pads_zero and err <= TOLERANCE[dtype_name]
                rows.append({"queries": tq, "dtype": dtype_name, "kv": kv, "rel_err": err, "finite": finite,
                             "pad_row_zero": pads_zero, "ok": ok})
                if not ok:
                    failures.append(f"tq={tq} {dtype_name} kv={kv}: rel err {err:.2e} (tol {TOLERANCE[dtype_name]:.1e}), "
                                    f"finite {finite}, pad row zero {pads_zero}")
    rows += _packed_correctness(check, config, device, hq, hkv, d, dtypes, angles, failures)
    if failures:
        raise AssertionError("; ".join(failures[:8]))
    return {"cases": len(rows), "rows": rows, "config": CHECK_DCA, "heads": [hq, hkv, d]}


def _packed_correctness(check, config, device, hq, hkv, d, dtypes, angles, failures) -> list:
    """Packed rows in one launch: decode rows (split and merged inside the launch), prompt blocks,
    a row with nothing new, int8 caches, each row against the reference alone."""
    import torch

    from dca import triton_kernels
    from tests.dca.reference import reference_cache_attention

    q_len, past = [1, 1, 0, 37, 3], [2000 if not check.smoke else 86, 333, 12, 45, 90]
    q_start = [sum(q_len[:r]) for r in range(len(q_len))]
    rows_out = []
    g = torch.Generator().manual_seed(1)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        for kv in ("auto", "int8"):
            int8 = kv == "int8"
            caps = [p + n + 5 for p, n in zip(past, q_len)]
            keys, values, ks, vs = [], [], [], []
            for c in caps:
                if int8:
                    keys.append(torch.randint(-127, 128, (1, hkv, c, d), generator=g, dtype=torch.int8))
                    values.append(torch.randint(-127, 128, (1, hkv, c, d), generator=g, dtype=torch.int8))
                    ks.append(torch.rand(1, hkv, c, 1, generator=g) / 50)
                    vs.append(torch.rand(1, hkv, c, 1, generator=g) / 50)
                else:
                    keys.append(torch.randn(1, hkv, c, d, generator=g).to(dtype))
                    values.append(torch.randn(1, hkv, c, d, generator=g).to(dtype))
            q = torch.randn(1, hq, sum(q_len), d, generator=g).to(dtype)
            scale = [d**-0.5 * (1 + 0.1 * r) for r in range(len(q_len))]
            packed = triton_kernels.PackedRows.build(q_start, q_len, past, scale, device)
            caches = triton_kernels.RowCaches.from_tensors([t.to(device) for t in keys], [t.to(device) for t in values],
                                                           [t.to(device) for t in ks] if int8 else None,
                                                           [t.to(device) for t in vs] if int8 else None)
            out = triton_kernels.packed_attention(q.to(device), packed, caches, cos.to(device), sin.to(device), config).cpu()
            for r, (s, n, p) in enumerate(zip(q_start, q_len, past)):
                if not n:
                    continue
                ref = reference_cache_attention(q[:, :, s : s + n], keys[r], values[r], torch.zeros(1, dtype=torch.int32),
                                                p + n, torch.tensor([scale[r]]), cos, sin, config,
                                                ks[r][..., 0] if int8 else None, vs[r][..., 0] if int8 else None)
                err = _relative_error(out[:, :, s : s + n], ref)
                finite = bool(torch.isfinite(out[:, :, s : s + n]).all())
                ok = finite and err <= TOLERANCE[dtype_name]
                rows_out.append({"packed_row": r, "queries": n, "past": p, "dtype": dtype_name, "kv": kv,
                                 "rel_err": err, "finite": finite, "ok": ok})
                if not ok:
                    failures.append(f"packed row {r} ({n} new, {p} past) {dtype_name} kv={kv}: rel err {err:.2e}")
    return rows_out


# --- 5. the start-up self-check ------------------------------------------------------------------


def step_selfcheck(check: Check) -> dict:
    """dca.selfcheck.run on the Triton backend for each dtype and KV dtype, when it exists.

    The call site (one function) is all that needs wiring if that module's API changes."""
    try:
        from dca import backends, selfcheck
    except ImportError as error:
        return {"skipped": True, "note": f"dca.backends / dca.selfcheck not in this tree ({error}); nothing to run"}
    import torch

    device = torch.device("cpu" if check.smoke else "cuda")
    geometry = (4, 2, 16) if check.smoke else (32, 4, 128)
    inv = 1.0 / (10000.0 ** (torch.arange(0, geometry[2], 2, dtype=torch.float64) / geometry[2]))

    def rope_build(ids, dtype):  # the model's rotary table at integer ids (a Llama rope)
        f = ids.double().cpu()[:, None] * inv
        e = torch.cat([f, f], -1)
        return e.cos().to(dtype).to(ids.device), e.sin().to(dtype).to(ids.device)

    dtypes = (torch.float32, torch.float16) if check.smoke else (torch.bfloat16, torch.float16, torch.float32)
    rows = []
    for dtype in dtypes:
        for kv in ("auto", "int8"):
            try:
                backend = backends.create("triton", backends.BackendKey(device, dtype, kv))
                result = selfcheck.run(backend, geometry, rope_build)
            except (TypeError, AttributeError) as error:  # the module exists with another API: not wired
                return {"skipped": True, "note": f"dca.selfcheck present but its API differs: {error!r}; "
                                                 "wire scripts/gpu_check.py step_selfcheck"}
            rows.append({"dtype": str(dtype).removeprefix("torch."), "kv": kv, "passed": result.passed,
                         "reason": result.reason, "seconds": result.seconds})
    failed = [r for r in rows if not r["passed"]]
    if failed:
        raise AssertionError(f"self-check failed: {failed}")
    return {"rows": rows, "geometry": geometry}


# --- 6. CUDA graphs with sync debug ----------------------------------------------------------------


def step_cuda_graph(check: Check) -> dict:
    if check.smoke:
        return {"skipped": True, "note": "cpu smoke: CUDA graphs and sync debug need CUDA"}
    import torch
    from torch.testing import assert_close

    from dca import DCAConfig, apply_dca
    from dca.cache import StaticKVCache
    from dca.graphs import CapturedDecodeStep
    from dca.prefill import chunked_prefill
    from tests.dca.conftest import left_pad, tiny_model

    out = {}
    for kv in ("auto", "int8"):
        model = apply_dca(tiny_model(dtype=torch.bfloat16, heads=8, kv_heads=2, head_dim=64).cuda(),
                          DCAConfig(**CHECK_DCA, backend="triton"))
        batch, mask = left_pad([torch.randint(1, 101, (1, n)) for n in (150, 61)])
        batch, mask = batch.cuda(), mask.cuda()
        eager_cache, cache = StaticKVCache(max_tokens=200, kv_dtype=kv), StaticKVCache(max_tokens=200, kv_dtype=kv)
        for c in (eager_cache, cache):
            chunked_prefill(model, batch, c, block_size=40, attention_mask=mask)
        nxt = torch.randint(1, 101, (2, 8), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any GPU->host sync in a decode step raises
        try:
            eager = [model(nxt[:, t : t + 1], cache=eager_cache, use_cache=True).logits[:, -1].clone() for t in range(8)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        step = CapturedDecodeStep(model, cache)
        for t in range(8):
            assert_close(step(nxt[:, t : t + 1]).float(), eager[t].float(), rtol=0, atol=0)
        out[kv] = {"decode_steps": 8, "graph_equals_eager": True, "finite": bool(torch.isfinite(eager[-1]).all())}
    return out


# --- 7-8. tile sweep and timings (benchmarks/gpu_bench.py) -----------------------------------------


def step_tile_sweep(check: Check) -> dict:
    if check.smoke:
        return {"skipped": True, "note": "cpu smoke: the interpreter has one tile; timing tiles needs a GPU"}
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_bench

    from dca import DCAConfig

    results: dict = {}
    shape = gpu_bench.FULL
    gpu_bench.sweep_prefill_tiles(shape, DCAConfig(shape["pretraining"]), torch.device("cuda"),
                                  gpu_bench.Timer(torch.device("cuda")), results)
    check.context["sweep"] = results["prefill_tile_sweep"]
    return results["prefill_tile_sweep"]


def step_timings(check: Check) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_bench

    if check.smoke:
        bench = gpu_bench.main(["--smoke", "--skip-before", "--output", str(Path(tempfile.mkdtemp()) / "gpu_bench.json")])
    else:
        bench = gpu_bench.main(["--skip-before", "--no-sweep"])
    return {"output": "benchmarks/results/gpu_bench.json" if not check.smoke else "(smoke: temporary)",
            "summary": bench["summary"], "seconds": bench["seconds"]}


STEPS = [("versions", step_versions), ("trivial", step_trivial), ("warmup", step_warmup),
         ("correctness", step_correctness), ("selfcheck", step_selfcheck), ("cuda_graph", step_cuda_graph),
         ("tile_sweep", step_tile_sweep), ("timings", step_timings)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="run what can run without a GPU, on tiny shapes")
    p.add_argument("--output", default=None)
    p.add_argument("--steps", nargs="*", default=None, help=f"a subset, in order, of {[n for n, _ in STEPS]}")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before dca.triton_kernels is imported
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (use --cpu-smoke to check the script on CPU)", file=sys.stderr)
        return 2
    unknown = set(args.steps or ()) - {n for n, _ in STEPS}
    if unknown:
        print(f"gpu_check: unknown steps {sorted(unknown)}; steps are {[n for n, _ in STEPS]}", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        torch.set_num_threads(1)
    default = ROOT / "benchmarks" / "results" / ("gpu_check_smoke.json" if args.cpu_smoke else "gpu_check.json")
    check = Check(args.cpu_smoke, Path(args.output) if args.output else default)
    steps = [(n, s) for n, s in STEPS if args.steps is None or n in args.steps]
    passed = check.run(steps)
    print(f"gpu_check: {'passed' if passed else 'FAILED at ' + check.results['stopped_at']} "
          f"({check.results['seconds']:.0f} s); wrote {check.output}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""scripts/gpu_check.py without a GPU: --cpu-smoke runs every step that can run on CPU (tiny
shapes, the kernels in Triton's interpreter, the compile step with the driver stand-in) and skips
the CUDA-only ones with a note. Proves the script, not the GPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steps_run_in_order_and_the_first_failure_stops_the_check(tmp_path):
    gpu_check = _gpu_check_module()
    ran = []

    def step(name, fail=False, skip=False):
        def run(check):
            ran.append(name)
            if fail:
                raise AssertionError(f"{name} broke")
            return {"skipped": True, "note": "n/a"} if skip else {"value": 1}
        return name, run

    out = tmp_path / "check.json"
    check = gpu_check.Check(smoke=True, output=out)
    assert not check.run([step("a"), step("b", skip=True), step("c", fail=True), step("d")])
    assert ran == ["a", "b", "c"]
    result = json.loads(out.read_text())
    assert [(s["step"], s["status"]) for s in result["steps"]] == [("a", "ok"), ("b", "skipped"), ("c", "failed")]
    assert result["passed"] is False and result["stopped_at"] == "c" and "c broke" in result["steps"][2]["error"]


def test_the_timings_step_runs_gpu_bench_smoke_on_cpu(monkeypatch):
    """The last step calls benchmarks/gpu_bench.py (--smoke without a GPU); gpu_bench's own smoke
    run is tests/dca/test_gpu_bench_smoke.py, so the run below stops before it."""
    gpu_check = _gpu_check_module()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_bench

    calls = []
    monkeypatch.setattr(gpu_bench, "main", lambda argv: calls.append(argv) or {"summary": {}, "seconds": 0.0})
    check = gpu_check.Check(smoke=True, output=Path("/dev/null"))
    assert gpu_check.step_timings(check)["summary"] == {}
    assert calls and "--smoke" in calls[0] and "--output" in calls[0]
    check.smoke = False
    gpu_check.step_timings(check)
    assert "--smoke" not in calls[1] and "--no-sweep" in calls[1]  # the sweep ran as its own step


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_cpu_smoke_mode_runs_every_step_it_can(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    steps = ["versions", "trivial", "warmup", "correctness", "selfcheck", "cuda_graph", "tile_sweep"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-smoke", "--output", str(out),
                           "--steps", *steps], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    steps = {s["step"]: s for s in result["steps"]}
    assert list(steps) == ["versions", "trivial", "warmup", "correctness", "selfcheck", "cuda_graph", "tile_sweep"]
    assert result["passed"] is True
    for name in ("versions", "trivial", "warmup", "correctness"):
        assert steps[name]["status"] == "ok", steps[name]
    for name in ("cuda_graph", "tile_sweep"):
        assert steps[name]["status"] == "skipped" and steps[name]["details"]["note"]
    assert steps["versions"]["details"]["ptxas"]["sm_90a"]["release"]
    warm = steps["warmup"]["details"]
    assert warm["variants"] >= 4 and warm["problems"] == []
    cases = steps["correctness"]["details"]["rows"]
    assert {(r["queries"], r["dtype"], r["kv"]) for r in cases if "queries" in r and "packed_row" not in r} == {
        (q, d, kv) for q in (1, 3, 16, 40) for d in ("float32", "float16") for kv in ("auto", "int8")}
    assert all(r["ok"] and r["finite"] for r in cases) and any("packed_row" in r for r in cases)
    assert all(r["rel_err"] <= (1e-5 if r["dtype"] == "float32" else 8 * 2.0**-11) for r in cases)

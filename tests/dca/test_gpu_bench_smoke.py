"""benchmarks/gpu_bench.py runs end to end: --smoke, toy sizes on CPU through Triton's interpreter.

Its timings mean nothing; this keeps the GPU benchmark from rotting while no GPU is at hand.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_gpu_bench_smoke_mode(tmp_path):
    out = tmp_path / "gpu_bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--smoke", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and result["torch"] and result["triton"] and result["commit"]
    modes = {(part, row["mode"]) for part in ("attention", "prefill", "decode") for row in result[part] if "ms" in row}
    for part in ("attention", "prefill", "decode"):
        assert {(part, "plain"), (part, "dca_triton"), (part, "dca_torch_before")} <= modes
    assert {row["kv"] for row in result["decode"] if row["mode"] == "dca_triton"} == {"model dtype", "int8"}
    assert "prefill_ratio_64" in result["summary"] and "int8_over_bf16_decode_48_b2" in result["summary"]
    assert "| measure | value | target | met |" in proc.stdout

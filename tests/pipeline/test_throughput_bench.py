"""benchmarks/throughput.py runs end to end on a toy corpus (in process, tiny model): its table's
sums hold. Its timings mean nothing here; this keeps the benchmark from rotting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_throughput_benchmark_splits_prefill_and_decoding_and_compares_outputs(tmp_path):
    out = tmp_path / "throughput.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--model", "tiny", "--engine", "in_process",
               "--documents", "4", "--min-tokens", "100", "--max-tokens", "400", "--new-tokens", "8",
               "--new-tokens-max", "24", "--threads", "1", "--prefill-runs", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    from benchmarks.throughput import output_lengths

    lengths = output_lengths(4, 8, 24, 0)
    assert len(set(lengths)) > 1 and all(8 <= n <= 24 for n in lengths)
    assert result["identical_greedy_outputs"] == "4/4"
    for name in ("static", "continuous"):
        row = result["schedulers"][name]
        assert row["documents"] == 4 and row["failed"] == 0
        assert row["output_tokens"] == sum(lengths)  # ignore_eos: every document its own count
        assert row["prefill_wall_s"] + row["decode_wall_s"] == pytest.approx(row["wall_s"], abs=0.011)
        assert 0 < row["prefill_wall_s"] < row["wall_s"]
        assert 0 < row["device_seconds"] <= row["wall_s"] * 1.01  # one rank, busy at most the whole time
    assert result["speedup_bound_if_decoding_were_free"] == round(
        result["schedulers"]["static"]["wall_s"] / result["schedulers"]["continuous"]["prefill_wall_s"], 2)

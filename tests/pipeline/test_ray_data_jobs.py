"""The jobs on the Ray Data dataflow (--dataflow ray-data): the same rows as the driver dataflow,
exactly once across a crash and a resume, a failure budget with the same message, the output's
lock / --overwrite / dataflow checks, and a worker node removed mid-job (a private Cluster)."""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections import Counter

import pytest

from tests.jobs.conftest import TINY_DCA, tiny_chat_model, write_corpus  # noqa: F401 (fixture)

KEY = ("source_file", "source_row", "id", "question_index", "question", "output", "status", "error_type",
       "error_message", "prompt_tokens", "output_tokens", "truncated_tokens", "content_hash", "job_id")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _config(model, tmp_path, name: str, *, task="summarize", dataflow="ray-data", **kw):
    from pipeline.job import JobConfig
    from pipeline.models import ModelSpec

    values = dict(task=task, input_path=str(tmp_path / "corpus"), output_dir=str(tmp_path / name),
                  model_spec=ModelSpec(model=model, dca=TINY_DCA), max_input_tokens=150, max_new_tokens=5,
                  progress=False, max_error_fraction=1.0, device="cpu", cpus_per_rank=1, dataflow=dataflow,
                  unit_rows=4, job_id=f"{task}-test")
    values.update(kw)
    return JobConfig(**values)


def _rows(output_dir: str) -> list[tuple]:
    from pipeline.output import read_output

    return sorted((tuple(r[k] for k in KEY) for r in read_output(output_dir).to_pylist()),
                  key=lambda r: (r[0], r[1], -1 if r[3] is None else r[3]))


def test_units_read_the_rows_iter_documents_reads(tmp_path):
    """Every row, its checks and its duplicate-id error, read unit by unit as the driver reads it."""
    from pipeline.io import InputSpec, check_input, iter_documents, plan_units, read_unit, unit_duplicates

    write_corpus(str(tmp_path / "corpus"), 13, qa=True, files=2)
    plan = check_input(InputSpec(path=str(tmp_path / "corpus"), question_column="questions"))
    units = plan_units(plan, 3)
    assert [u.num_rows for u in units] == [3, 3, 3, 1, 3, 3, 3]  # 10 + 9 rows, one row group per file
    assert len({u.key for u in units}) == len(units) and [u.key for u in units] == sorted(u.key for u in units)
    duplicates = unit_duplicates(plan, units)
    assert sum(len(d) for d in duplicates.values()) == 1
    by_units = [doc for u in units for doc in read_unit(plan, u, duplicates.get(u.key))]
    expected = list(iter_documents(plan))
    assert by_units == expected
    assert Counter(d.error_type for d in by_units)["duplicate_id"] == 1


@pytest.mark.parametrize("task", ["summarize", "qa"])
def test_same_rows_as_the_driver_dataflow(ray_local, tiny_chat_model, tmp_path, task):
    import json

    from pipeline.job import run_job
    from pipeline.output import committed_parts, read_manifest

    write_corpus(str(tmp_path / "corpus"), 14, qa=task == "qa", max_words=100)
    extra = {"question_column": "questions"} if task == "qa" else {}
    driver = run_job(_config(tiny_chat_model, tmp_path, "driver", task=task, dataflow="driver", **extra))
    summary = run_job(_config(tiny_chat_model, tmp_path, "units", task=task, **extra))
    expected, rows = _rows(str(tmp_path / "driver")), _rows(str(tmp_path / "units"))
    assert rows == expected
    statuses = Counter(r[6] for r in rows)
    assert statuses["ok"] >= 14 and statuses["error"] >= 4
    assert sum(1 for r in rows if r[6] == "ok" and r[10]) > 0  # the tiny model generated something
    assert {r[7] for r in rows if r[6] == "error"} == {"invalid_input", "duplicate_id"}
    # One part per work unit of at most 4 rows (+ the empty schema part), named by the unit.
    parts = committed_parts(str(tmp_path / "units"))
    assert parts[0] == "part-00000.parquet" and len(parts) == 1 + 6 and all(p.startswith("part-u") for p in parts[1:])
    assert read_manifest(str(tmp_path / "units"))["dataflow"] == "ray-data"
    assert read_manifest(str(tmp_path / "units"))["complete"] is True
    # The metrics count the same documents and tokens as the driver's.
    for key in ("ok", "error"):
        assert summary["documents"][key] == driver["documents"][key]
    assert summary["tokens"]["prompt"] == driver["tokens"]["prompt"] > 0
    assert summary["tokens"]["output"] == driver["tokens"]["output"]
    metrics = json.loads((tmp_path / "units" / "_metrics.json").read_text())
    assert metrics["dataflow"] == "ray-data" and metrics["status"] == "complete"
    assert metrics["device"]["cpu_seconds_all_ranks"] > 0

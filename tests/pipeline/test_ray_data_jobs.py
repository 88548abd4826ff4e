"""The jobs on the Ray Data dataflow (--dataflow ray-data): the same rows as the driver dataflow,
exactly once across a crash and a resume, a failure budget with the same message, the output's
lock / --overwrite / dataflow checks, and a worker node removed mid-job (a private Cluster)."""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import warnings
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
    from pipeline.config.job import JobConfig
    from pipeline.config.model import ModelSpec

    values = dict(task=task, input_path=str(tmp_path / "corpus"), output_dir=str(tmp_path / name),
                  model_spec=ModelSpec(model=model, dca=TINY_DCA), max_input_tokens=150, max_new_tokens=5,
                  progress=False, max_error_fraction=1.0, device="cpu", cpus_per_rank=1, dataflow=dataflow,
                  unit_rows=4, job_id=f"{task}-test")
    values.update(kw)
    return JobConfig(**values)


def _rows(output_dir: str) -> list[tuple]:
    from pipeline.data.writer import read_output

    return sorted((tuple(r[k] for k in KEY) for r in read_output(output_dir).to_pylist()),
                  key=lambda r: (r[0], r[1], -1 if r[3] is None else r[3]))


def test_units_read_the_rows_iter_documents_reads(tmp_path):
    """Every row, its checks and its duplicate-id error, read unit by unit as the driver reads it."""
    from pipeline.data.input import InputSpec, check_input, iter_documents, plan_units, read_unit, unit_duplicates

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


def test_dataflow_settings_are_checked_up_front(tmp_path, capsys):
    """Bad dataflow settings are one-line usage errors (exit 2) before any Ray or model work."""
    from jobs.common import run_main
    from jobs.summarize import main
    from pipeline.config.job import JobConfig

    with pytest.raises(ValueError, match="dataflow must be one of driver, ray-data, got 'spark'"):
        JobConfig(task="summarize", input_path="x", output_dir="/tmp/x", dataflow="spark")
    write_corpus(str(tmp_path / "corpus"), 2, bad_rows=False)
    base = ["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"), "--dataflow", "ray-data"]
    for flag, value in (("--unit-rows", "0"), ("--prompt-actors", "-1")):
        with pytest.raises(SystemExit) as exit_info:
            run_main(lambda: main([*base, flag, value]))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {flag[2:].replace('-', '_')} must be a positive integer, got {value}"
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        main([*base[:-1], "spark"])
    assert exit_info.value.code == 2 and "invalid choice: 'spark'" in capsys.readouterr().err


@pytest.mark.parametrize("task", [pytest.param("summarize", marks=pytest.mark.slow), "qa"])
def test_same_rows_as_the_driver_dataflow(ray_local, tiny_chat_model, tmp_path, task):
    import json

    from pipeline.data.writer import committed_parts, read_manifest
    from pipeline.job import run_job

    write_corpus(str(tmp_path / "corpus"), 14, qa=task == "qa", max_words=100)
    extra = {"question_column": "questions"} if task == "qa" else {}
    driver = run_job(_config(tiny_chat_model, tmp_path, "driver", task=task, dataflow="driver", **extra))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_job(_config(tiny_chat_model, tmp_path, "units", task=task, **extra))
    # No deprecated Ray API from the project's own code (Ray 2.60: extra ray_remote_args).
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
            if issubclass(w.category, DeprecationWarning) and f"{os.sep}pipeline{os.sep}" in w.filename]
    assert not ours, ours
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


def _crashing_engine_stage(log_path: str, output_dir: str, crash_after: int | None) -> type:
    """The engine stage, logging the unit keys it answers to `log_path`; with crash_after, the call
    after that many answered units raises (once their parts are committed), failing the job.
    Defined in a function so Ray pickles it by value."""
    from pipeline.dataflows.units import UnitEngineStage

    class CrashingEngineStage(UnitEngineStage):
        def __call__(self, batch):
            import os
            import time

            calls = len(open(log_path).read().split()) if os.path.exists(log_path) else 0
            if crash_after is not None and calls >= crash_after:
                deadline = time.monotonic() + 60
                while sum(n.startswith("part-u") for n in os.listdir(output_dir)) < crash_after \
                        and time.monotonic() < deadline:
                    time.sleep(0.1)
                raise RuntimeError("injected engine crash")
            out = super().__call__(batch)
            with open(log_path, "a") as f:
                f.write(" ".join(batch.column("key").to_pylist()) + "\n")
            return out

    return CrashingEngineStage


def test_crash_then_resume_answers_every_row_once_without_redoing_units(ray_local, tiny_chat_model, tmp_path):
    from pipeline.data.input import InputSpec, check_input, plan_units
    from pipeline.data.writer import committed_unit_keys, read_manifest, unit_part_name
    from pipeline.job import run_job

    write_corpus(str(tmp_path / "corpus"), 20, qa=True, max_words=80)
    config = _config(tiny_chat_model, tmp_path, "out", task="qa", question_column="questions")
    out = config.output_dir
    first_log, second_log = str(tmp_path / "first.log"), str(tmp_path / "second.log")
    with pytest.raises(Exception, match="injected engine crash"):
        run_job(config, engine_stage=_crashing_engine_stage(first_log, out, crash_after=2))
    committed = committed_unit_keys(out)
    answered_first = set(open(first_log).read().split())
    assert committed == answered_first and len(committed) == 2
    assert read_manifest(out)["complete"] is False
    mtimes = {k: os.stat(os.path.join(out, unit_part_name(k))).st_mtime_ns for k in committed}

    summary = run_job(config, engine_stage=_crashing_engine_stage(second_log, out, crash_after=None))
    plan = check_input(InputSpec(path=config.input_path, question_column="questions"))
    units = {u.key: u for u in plan_units(plan, config.unit_rows)}
    answered_second = set(open(second_log).read().split())
    assert answered_second == set(units) - committed  # committed units were not redone
    assert {k: os.stat(os.path.join(out, unit_part_name(k))).st_mtime_ns for k in committed} == mtimes
    assert committed_unit_keys(out) == set(units)
    rows = _rows(out)
    keys = Counter((r[0], r[1], r[3]) for r in rows)
    assert set(keys.values()) == {1}  # every (input row, question) exactly once
    assert len({(r[0], r[1]) for r in rows}) == plan.num_rows
    assert summary["documents"]["already_committed"] == sum(units[k].num_rows for k in committed)
    assert summary["run"] == 2 and read_manifest(out)["complete"] is True


def test_a_changed_unit_rows_between_runs_loses_and_repeats_no_row(ray_local, tiny_chat_model, tmp_path):
    """Issue 22 item 12: a run killed with --unit-rows 5 and resumed with 10 lost the rows of the
    longer units whose first row a committed short unit shared (5 of 40 rows missing, "complete");
    a complete run with 10 rerun with 4 redid the rows (72 rows for 40). A resume works in rows:
    every row exactly once, whatever --unit-rows each run has, and no committed row redone."""
    from pipeline.data.writer import committed_unit_keys, read_manifest
    from pipeline.job import run_job

    write_corpus(str(tmp_path / "corpus"), 40, bad_rows=False, files=1, max_words=40)
    config = _config(tiny_chat_model, tmp_path, "out", unit_rows=5)
    out, log = config.output_dir, str(tmp_path / "answered.log")
    with pytest.raises(Exception, match="injected engine crash"):
        run_job(config, engine_stage=_crashing_engine_stage(log, out, crash_after=1))
    committed = committed_unit_keys(out)
    assert len(committed) >= 1 and read_manifest(out)["complete"] is False
    rows_before = len(_rows(out))
    assert 0 < rows_before < 40

    longer = run_job(dataclasses.replace(config, unit_rows=10))
    rows = _rows(out)
    keys = Counter((r[0], r[1], r[3]) for r in rows)
    assert len(keys) == 40 and set(keys.values()) == {1}  # none lost, none repeated
    assert longer["documents"]["already_committed"] == rows_before
    assert longer["documents"]["ok"] == 40 - rows_before and read_manifest(out)["complete"] is True

    shorter = run_job(dataclasses.replace(config, unit_rows=4))
    assert shorter["documents"]["already_committed"] == 40 and shorter["documents"]["ok"] == 0
    assert _rows(out) == rows


def _normalised(message: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", message)


@pytest.mark.slow
def test_failure_budget_trips_with_the_driver_message(ray_local, tiny_chat_model, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.common import run_main
    from jobs.summarize import main
    from pipeline.job import run_job
    from pipeline.runtime.stops import JobFailed

    (tmp_path / "corpus").mkdir()
    rows = [{"id": f"d{i:03d}", "text": None if i % 5 else "w5 w6 w7 w8"} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("text", pa.string())])),
                   tmp_path / "corpus" / "part0.parquet")
    with pytest.raises(JobFailed) as driver:
        run_job(_config(tiny_chat_model, tmp_path, "driver", dataflow="driver", max_error_fraction=0.1))
    args = ["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "units"), "--model", tiny_chat_model,
            "--dca-pretraining-length", "64", "--dca-chunk-size", "48", "--dca-local-window", "8",
            "--max-input-tokens", "150", "--max-new-tokens", "5", "--no-progress", "--device", "cpu",
            "--cpus-per-rank", "1", "--dataflow", "ray-data", "--unit-rows", "4", "--job-id", "summarize-test"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(args))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("job failed: "))
    message = line[len("job failed: "):]
    assert message.startswith("failure budget exceeded: ") and "documents read had invalid input" in message
    assert _normalised(message) == _normalised(str(driver.value))


def test_lock_overwrite_and_the_other_dataflow(ray_local, tiny_chat_model, tmp_path):
    from pipeline.data.writer import OutputError, OutputWriter, committed_parts, read_manifest, unit_part_name
    from pipeline.job import run_job

    write_corpus(str(tmp_path / "corpus"), 6, bad_rows=False, max_words=60)
    config = _config(tiny_chat_model, tmp_path, "out")
    # An output of the driver dataflow is refused in one line, and replaced with --overwrite.
    OutputWriter(config.output_dir, job_id="other", fingerprint="other", config={}).close(complete=True)
    with pytest.raises(OutputError) as refused:
        run_job(config)
    assert "written by the driver dataflow" in str(refused.value) and "\n" not in str(refused.value)
    summary = run_job(dataclasses.replace(config, overwrite=True))
    assert summary["documents"]["ok"] == 6
    # A unit's part is named by its file, row group, first and one-past-last row.
    assert committed_parts(config.output_dir) == ["part-00000.parquet",
                                                  unit_part_name("000000-000000-000000000-000000003"),
                                                  unit_part_name("000001-000000-000000000-000000003")]
    assert read_manifest(config.output_dir)["job_id"] == "summarize-test"
    # ... and the driver dataflow refuses this one.
    with pytest.raises(OutputError, match="written by the ray-data dataflow"):
        run_job(dataclasses.replace(config, dataflow="driver"))
    # The lock: a second writer is refused while the first holds the directory.
    import fcntl

    handle = open(os.path.join(config.output_dir, "_lock"), "a+")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(OutputError, match="being written by another job"):
            run_job(config)
    finally:
        handle.close()
    # A rerun of the complete job redoes nothing.
    mtimes = {p: os.stat(os.path.join(config.output_dir, p)).st_mtime_ns for p in committed_parts(config.output_dir)}
    again = run_job(config)
    assert again["documents"]["already_committed"] == 6 and again["documents"]["ok"] == 0
    assert {p: os.stat(os.path.join(config.output_dir, p)).st_mtime_ns
            for p in committed_parts(config.output_dir)} == mtimes


@pytest.mark.slow
def test_nightly_on_ray_data_skips_what_earlier_nights_summarised(ray_local, tiny_chat_model, tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.nightly import main
    from pipeline.data.writer import read_manifest, read_output

    corpus, root = tmp_path / "corpus", tmp_path / "summaries"
    write_corpus(str(corpus), 5, bad_rows=False, files=1, max_words=60)
    args = ["--input", str(corpus), "--output", str(root), "--model", tiny_chat_model,
            "--dca-pretraining-length", "64", "--dca-chunk-size", "48", "--dca-local-window", "8",
            "--max-input-tokens", "150", "--max-new-tokens", "5", "--no-progress", "--device", "cpu",
            "--cpus-per-rank", "1", "--unit-rows", "2"]
    # The first night on the driver dataflow (each date is its own output): what it summarised is
    # skipped by the next night on Ray Data all the same.
    main([*args, "--date", "2026-11-24", "--dataflow", "driver"])
    assert sorted(read_output(str(root / "run_date=2026-11-24"))["id"].to_pylist()) == [f"doc{i:04d}" for i in range(5)]
    table = pq.read_table(corpus / "part0.parquet").to_pylist()
    table[2]["text"] = "w5 w6 w7 changed text"
    table.append({"id": "new-doc", "text": "w9 w10 w11 w12"})
    pq.write_table(pa.Table.from_pylist(table), corpus / "part0.parquet")
    main([*args, "--date", "2026-11-25", "--dataflow", "ray-data"])
    second = root / "run_date=2026-11-25"
    assert sorted(read_output(str(second))["id"].to_pylist()) == ["doc0002", "new-doc"]
    metrics = json.loads((second / "_metrics.json").read_text())
    assert metrics["documents"]["skipped"] == 4 and metrics["documents"]["ok"] == 2
    assert read_manifest(str(second))["dataflow"] == "ray-data"


def test_a_worker_node_removed_mid_job_loses_and_duplicates_no_row(tiny_chat_model, tmp_path):
    """A head (no CPUs: the driver and the ledger) and two worker nodes, one replica (rank) on
    each; once both replicas have answered a unit, the node of a serving rank leaves, and the job
    still commits every row exactly once, all ok. Last in this module: it replaces the module's
    local Ray."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipeline.dataflows.units import UnitEngineStage
    from pipeline.job import run_job
    from tests.pipeline.test_ray_data import _free_port
    from tests.pipeline.test_ray_data_nodes import _gated, _remove_a_serving_node

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": _free_port()})
    workers = {cluster.add_node(num_cpus=3).node_id: None for _ in range(2)}
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        write_corpus(str(tmp_path / "corpus"), 32, bad_rows=False, min_words=40, max_words=100, files=4)
        gate = tmp_path / "gate"
        config = _config(tiny_chat_model, tmp_path, "out", replicas=2, ray_address=cluster.address)
        removed: list[str] = []
        # Once both replicas have answered a unit (each holds its next one until the node is gone).
        remover = threading.Thread(target=_remove_a_serving_node,
                                   args=(cluster, list_actors, workers, nodes, gate, removed, 2), daemon=True)
        remover.start()
        summary = run_job(config, engine_stage=_gated(UnitEngineStage, str(gate)))
        remover.join(timeout=60)
        assert len(removed) == 1
        rows = _rows(config.output_dir)
        keys = Counter((r[0], r[1]) for r in rows)
        assert len(keys) == 32 and set(keys.values()) == {1}
        assert Counter(r[2] for r in rows) == Counter({f"doc{i:04d}": 1 for i in range(32)})
        assert all(r[6] == "ok" for r in rows), [r[8] for r in rows if r[6] != "ok"][:3]
        assert summary["documents"]["ok"] == 32 and summary["status"] == "complete"
        assert len(list(tmp_path.glob("gate.first.*"))) >= 2  # both replicas (and any restarted one) answered

        # Every node saw the output and the input (one machine here); a path that some node cannot
        # see stops the job before any unit runs, naming the nodes.
        from pipeline.data.input import InputSpec, check_input
        from pipeline.data.writer import OutputError
        from pipeline.dataflows.units import check_shared_paths

        plan = check_input(InputSpec(path=str(tmp_path / "corpus")))
        check_shared_paths(config.output_dir, plan)
        with pytest.raises(OutputError, match=r"2 of 2 node\(s\) cannot see the output directory .*--dataflow driver"):
            check_shared_paths(config.output_dir, plan, marker=str(tmp_path / "not-there"))
    finally:
        ray.shutdown()
        cluster.shutdown()


HIERARCHICAL_KEY = KEY + ("sections", "levels", "calls", "section_outputs")


def test_hierarchical_rows_are_the_driver_dataflows(ray_local, tiny_chat_model, tmp_path):
    """Documents over the budget answered in sections (truncation hierarchical): the ray-data
    dataflow's rows, sections and section outputs are the driver dataflow's, through the real engine
    (summaries: combinations over levels; QA's sections are checked against the job in the processor's
    test)."""
    task = "summarize"
    from pipeline.data.writer import read_output
    from pipeline.job import run_job

    write_corpus(str(tmp_path / "corpus"), 8, qa=task == "qa", min_words=20, max_words=500)
    extra = {"question_column": "questions"} if task == "qa" else {}
    common = dict(task=task, truncation="hierarchical", max_input_tokens=100, **extra)
    driver = run_job(_config(tiny_chat_model, tmp_path, "driver", dataflow="driver", **common))
    units = run_job(_config(tiny_chat_model, tmp_path, "units", **common))

    logprobs = {}

    def rows(name):
        table = read_output(str(tmp_path / name)).to_pylist()
        # The section outputs' mean_logprob is a float of the forwards, whose rounding may differ
        # with what else shared them: compared to a tolerance, the rest exactly.
        logprobs[name] = {(r["id"], o["level"], o["index"]): o["mean_logprob"]
                          for r in table for o in r["section_outputs"] or []}
        for r in table:
            for o in r["section_outputs"] or []:
                o.pop("mean_logprob")
        return sorted((tuple(json_key(r[k]) for k in HIERARCHICAL_KEY) for r in table),
                      key=lambda r: (r[0], r[1], -1 if r[3] is None else r[3]))

    expected = rows("driver")
    assert rows("units") == expected
    assert logprobs["units"].keys() == logprobs["driver"].keys()
    assert any(value is not None for value in logprobs["driver"].values())
    for key, value in logprobs["driver"].items():  # None: an output of no tokens
        assert (logprobs["units"][key] is None) if value is None else (
            value < 0 and logprobs["units"][key] == pytest.approx(value, abs=1e-3))
    assert any(r[-4] and r[-4] > 1 for r in expected)  # some documents were split
    assert all(r[11] == 0 for r in expected if r[6] == "ok")  # nothing truncated
    assert units["documents"]["split"] == driver["documents"]["split"] > 0
    assert units["engine_calls"] == driver["engine_calls"]
    assert units["tokens"]["prompt"] == driver["tokens"]["prompt"]


def json_key(value):
    import json

    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value

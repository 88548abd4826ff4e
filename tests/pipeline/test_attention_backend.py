"""The DCA attention backend a job ran, and why: its start-up self-check and fallback in real job
runs, recorded in the manifest, _metrics.json and every output row (driver and ray-data
dataflows, the Ray Data processor); --dca-backend; an explicit backend that cannot run stops the
job at start (one line, exit 2).

The failures are injected as a GPU would produce them, into the Triton kernels the ranks
self-check (tests/pipeline/backend_faults.py, through pipeline.engine.worker's rank test hook):
each rank runs Triton's interpreter with the self-check forced (dca.selfcheck.FORCE_ON_CPU) and
"auto" resolving to Triton as on CUDA. Everything after is the production path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os

import pytest

from pipeline.engine.worker import RANK_TEST_HOOK_ENV
from tests.jobs.conftest import TINY_DCA, tiny_chat_model, write_corpus  # noqa: F401 (fixture)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs triton (its interpreter runs the kernels on CPU)")

DOCS = 5
# What each injected failure makes the self-check say (dca/selfcheck.py), in the fallback reason.
FAULTS = {
    "compile_error": "ptxas fatal : Unsupported .version 9.0",
    "wrong_result": "attention off by",
    "nan": "non-finite values",
}


def _start_ray(env: dict | None = None) -> None:
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env} if env else None)
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="module", autouse=True)
def no_ray_left():
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def ray_shared():
    """One private local Ray for the driver-dataflow tests (started at the first, kept for the
    next: a start costs seconds on a loaded machine). The hook reaches the ranks through the
    driver: pipeline.engine.replica forwards the driver's RANK_TEST_HOOK_ENV to them."""
    import ray

    if not ray.is_initialized():
        _start_ray()
    yield


@pytest.fixture
def hook(monkeypatch):
    def set_hook(name: str | None) -> None:
        if name is None:
            monkeypatch.delenv(RANK_TEST_HOOK_ENV, raising=False)
        else:
            monkeypatch.setenv(RANK_TEST_HOOK_ENV, f"tests.pipeline.backend_faults:{name}")

    return set_hook


@contextlib.contextmanager
def own_ray_with_hook(name: str):
    """A private local Ray whose every worker runs `tests.pipeline.backend_faults:<name>` at rank
    start-up: also the ranks that Ray Data actors start (they do not see the driver's env)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        _start_ray({RANK_TEST_HOOK_ENV: f"tests.pipeline.backend_faults:{name}"})
        yield
    finally:
        ray.shutdown()


def _config(model, tmp_path, *, dataflow="driver", backend=None, **kw):
    from pipeline.config.job import JobConfig
    from pipeline.config.model import ModelSpec

    dca = dict(TINY_DCA, **({"backend": backend} if backend else {}))
    values = dict(task="summarize", input_path=str(tmp_path / "corpus"), output_dir=str(tmp_path / "out"),
                  model_spec=ModelSpec(model=model, dca=dca), max_input_tokens=150, max_new_tokens=3,
                  progress=False, max_error_fraction=0.0, device="cpu", cpus_per_rank=1, dataflow=dataflow,
                  unit_rows=3, job_id="backend-test")
    values.update(kw)
    return JobConfig(**values)


def _records(output_dir: str):
    from pipeline.data.writer import read_manifest, read_output

    manifest = read_manifest(output_dir)
    with open(os.path.join(output_dir, "_metrics.json")) as f:
        metrics = json.load(f)
    return manifest, metrics, read_output(output_dir).to_pylist()


def _check_record(output_dir: str, *, ran: str, requested: str, reason: str | None, summary: dict):
    """Every document ok; manifest, _metrics.json and every row say `ran`, and why (`reason` in
    the fallback, or no fallback); the rank planned its memory for `ran`."""
    manifest, metrics, rows = _records(output_dir)
    assert summary["documents"]["ok"] == DOCS and summary["documents"]["error"] == 0
    assert len(rows) == DOCS and {r["status"] for r in rows} == {"ok"}
    for record in (manifest["attention_backend"], metrics["attention_backend"]):
        assert record["backend"] == ran and record["requested"] == requested and record["replicas_agree"]
        if reason is None:
            assert record["fallback"] is None
        else:
            assert record["fallback"].startswith("triton: step 1 (100 new tokens after 0): " if "ptxas" in reason
                                                 else "triton: step ") and reason in record["fallback"]
            assert "\n" not in record["fallback"]
        (replica,) = record["by_replica"].values()
        (rank,) = replica["ranks"]
        assert rank["dca"] and rank["ran"] == ran and rank["chosen"] == ("triton" if requested == "auto" else ran)
        assert rank["checked"] is (ran != "torch" or reason is not None)
        assert rank["fallback_reason"] == record["fallback"]
    assert manifest["attention_backend"] == metrics["attention_backend"]
    fallback = manifest["attention_backend"]["fallback"]
    assert {(r["attention_backend"], r["attention_backend_fallback"]) for r in rows} == {(ran, fallback)}
    (engine,) = metrics["engine"].values()
    assert engine["planned_attention_backend"] == ran
    return manifest, metrics, rows


@needs_triton
@pytest.mark.parametrize("fault", [f if f == "compile_error" else pytest.param(f, marks=pytest.mark.slow) for f in sorted(FAULTS)])
def test_driver_job_falls_back_and_records_why(ray_shared, hook, tiny_chat_model, tmp_path, fault):
    from pipeline.job import run_job

    write_corpus(str(tmp_path / "corpus"), DOCS, bad_rows=False, max_words=60)
    hook(fault)
    summary = run_job(_config(tiny_chat_model, tmp_path))
    _check_record(str(tmp_path / "out"), ran="torch", requested="auto", reason=FAULTS[fault], summary=summary)


@needs_triton
def test_driver_job_on_healthy_kernels_runs_triton(ray_shared, hook, tiny_chat_model, tmp_path):
    from pipeline.job import run_job

    write_corpus(str(tmp_path / "corpus"), DOCS, bad_rows=False, max_words=40)
    hook("healthy")
    summary = run_job(_config(tiny_chat_model, tmp_path))
    _, metrics, _ = _check_record(str(tmp_path / "out"), ran="triton", requested="auto", reason=None,
                                  summary=summary)
    (replica,) = metrics["attention_backend"]["by_replica"].values()
    assert replica["ranks"][0]["check_seconds"] > 0  # the check ran in that rank


@needs_triton
def test_explicit_triton_that_fails_its_check_stops_the_job_at_start(ray_shared, hook, tiny_chat_model, tmp_path,
                                                                    capsys):
    from jobs.common import run_main
    from jobs.summarize import main

    write_corpus(str(tmp_path / "corpus"), DOCS, bad_rows=False, max_words=60)
    argv = ["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"), "--model", tiny_chat_model,
            "--device", "cpu", "--dca-pretraining-length", "64", "--dca-chunk-size", "48", "--dca-local-window", "8",
            "--max-new-tokens", "3", "--no-progress", "--dca-backend", "triton"]
    hook("compile_error")
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]  # one line says why
    assert "'triton' failed its start-up self-check" in line
    assert "CompilationError" in line and FAULTS["compile_error"] in line and "--dca-backend" in line
    assert "Traceback" not in line


def test_explicit_backend_not_installed_here_stops_the_job_at_start(ray_shared, hook, tiny_chat_model, tmp_path,
                                                                   capsys):
    """--dca-backend flash on a CPU machine (flash-attn needs CUDA): one line, exit 2, no rows."""
    from jobs.common import run_main
    from jobs.summarize import main

    write_corpus(str(tmp_path / "corpus"), DOCS, bad_rows=False, max_words=60)
    argv = ["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"), "--model", tiny_chat_model,
            "--device", "cpu", "--dca-pretraining-length", "64", "--dca-chunk-size", "48", "--dca-local-window", "8",
            "--max-new-tokens", "3", "--no-progress", "--dca-backend", "flash"]
    hook(None)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "DCA backend 'flash' cannot run" in line and "flash-attn" in line and "--dca-backend" in line


@needs_triton
@pytest.mark.slow
def test_ray_data_job_falls_back_and_records_why(tiny_chat_model, tmp_path):
    from pipeline.job import run_job

    write_corpus(str(tmp_path / "corpus"), DOCS, bad_rows=False, max_words=60)
    with own_ray_with_hook("wrong_result"):
        summary = run_job(_config(tiny_chat_model, tmp_path, dataflow="ray-data"))
    _check_record(str(tmp_path / "out"), ran="torch", requested="auto", reason=FAULTS["wrong_result"],
                  summary=summary)


@needs_triton
@pytest.mark.slow
def test_processor_rows_record_the_fallback(tiny_chat_model, tmp_path):
    import ray

    from pipeline.config.processor import DCAProcessorConfig
    from pipeline.dataflows.processor import build_processor

    docs = [{"id": f"d{i}", "text": " ".join(f"w{3 + (i * 7 + j) % 100}" for j in range(30))} for i in range(DOCS)]
    docs.append({"id": "bad", "text": None})  # rejected before the engine: it carries the record too
    with own_ray_with_hook("nan"):
        config = DCAProcessorConfig(model=tiny_chat_model, dca=TINY_DCA, max_input_tokens=150, max_new_tokens=3,
                                    device="cpu", batch_size=4)
        rows = build_processor(config)(ray.data.from_items(docs)).take_all()
    assert len(rows) == DOCS + 1
    assert sorted(r["status"] for r in rows) == ["error"] + ["ok"] * DOCS
    assert {r["attention_backend"] for r in rows} == {"torch"}
    (fallback,) = {r["attention_backend_fallback"] for r in rows}
    assert fallback.startswith("triton: step ") and FAULTS["nan"] in fallback


# --- the record, without a cluster -----------------------------------------------------------------


def _rank(rank, ran, reason=None, requested="auto"):
    return {"rank": rank, "dca": True, "requested": requested, "chosen": "triton", "ran": ran,
            "fallback_reason": reason, "checked": True, "device": f"cuda:{rank}", "dtype": "bfloat16",
            "kv_dtype": "int8", "check_seconds": 1.0}


def test_replica_and_engine_records():
    from pipeline.engine.attention_record import columns_of, engine_record, engine_record_of_stats, replica_record

    healthy = replica_record([_rank(0, "triton"), _rank(1, "triton")])
    assert (healthy["backend"], healthy["fallback"], healthy["ranks_agree"]) == ("triton", None, True)
    why = "triton: step 4 (1 new token after 147): non-finite values in the output or the cache"
    fell = replica_record([_rank(0, "flash", why), _rank(1, "flash", why)])
    assert (fell["backend"], fell["fallback"]) == ("flash", why)  # said once for the replica
    mixed = replica_record([_rank(0, "triton"), _rank(1, "torch", why)])
    assert mixed["backend"] == "mixed" and not mixed["ranks_agree"]
    assert mixed["fallback"] == f"the ranks of this replica disagree: rank 0 ran 'triton', rank 1 ran 'torch'; rank 1: {why}"
    assert columns_of(fell) == {"attention_backend": "flash", "attention_backend_fallback": why}
    assert columns_of(None) == {"attention_backend": None, "attention_backend_fallback": None}

    same = engine_record({"r0": fell, "r1": fell, "r2": None})  # r2 never started
    assert (same["backend"], same["fallback"], same["requested"], sorted(same["by_replica"])) == ("flash", why, "auto",
                                                                                                 ["r0", "r1"])
    differ = engine_record({"r0": healthy, "r1": fell})
    assert differ["backend"] is None and differ["fallback"] is None and not differ["replicas_agree"]
    assert engine_record_of_stats({"a/r0": {"attention": healthy}, "a/r1": {"attention": healthy}})["backend"] == "triton"
    assert engine_record_of_stats({"r0": {"served": 3}}) is None and engine_record_of_stats(None) is None


def test_dca_backend_flag_and_config_hash(tmp_path):
    import argparse

    from jobs.common import add_common_flags, build_values, job_config_kwargs
    from pipeline.config.job import JobConfig, config_hash
    from pipeline.config.model import ModelSpec

    parser = argparse.ArgumentParser()
    add_common_flags(parser, task="summarize")
    args = parser.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--dca-backend", "triton"])
    assert job_config_kwargs(build_values(args))["model_spec"].dca["backend"] == "triton"
    with pytest.raises(SystemExit):
        parser.parse_args(["--input", "in", "--output", "out", "--dca-backend", "cutlass"])

    # How attention is computed is not what: a job stopped because its backend cannot run resumes
    # unchanged under another one (rows record which ran).
    def hashed(backend):
        spec = ModelSpec(model="m", dca={"pretraining_length": 64, "backend": backend})
        config = JobConfig(task="summarize", input_path="in", output_dir="/tmp/out", model_spec=spec)
        return config_hash(config, {"summarize": {}}, "chat", "fp")

    assert hashed("triton") == hashed("auto") == hashed("torch")
    spec = ModelSpec(model="m", dca={"pretraining_length": 32})
    other = JobConfig(task="summarize", input_path="in", output_dir="/tmp/out", model_spec=spec)
    assert config_hash(other, {"summarize": {}}, "chat", "fp") != hashed("auto")


def test_a_document_answered_in_sections_carries_the_backend_of_its_calls():
    from pipeline.data.long_documents import Outcome
    from pipeline.engine.requests import GenerationResult

    def result(backend, fallback=None):
        return GenerationResult(request_id="d", suffix_index=0, output="x", prompt_tokens=3, output_tokens=1,
                                attention_backend=backend, attention_backend_fallback=fallback)

    why = "triton: step 1 (100 new tokens after 0): non-finite values in the output or the cache"
    same = Outcome()
    for _ in range(3):
        same.add(result("torch", why))
    assert (same.attention_backend, same.attention_backend_fallback, same.calls) == ("torch", why, 3)
    mixed = Outcome()
    mixed.add(result("triton"))
    mixed.add(result(None))  # no replica's record (a stand-in pool): changes nothing
    assert (mixed.attention_backend, mixed.attention_backend_fallback) == ("triton", None)
    mixed.add(result("torch", why))
    assert mixed.attention_backend == "mixed" and "different attention backends" in mixed.attention_backend_fallback

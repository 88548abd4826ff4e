"""Command line: flag/config precedence, path rules under `ray job submit`, light driver imports."""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest

from jobs.common import add_common_flags, build_values, job_config_kwargs
from pipeline.config.job import JobConfig
from tests.jobs.conftest import PYTHON, REPO, job_env


def _values(argv, task="summarize"):
    parser = argparse.ArgumentParser()
    add_common_flags(parser, task=task)
    return build_values(parser.parse_args(argv))


def test_flags_override_config_file_and_paths_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_new_tokens: 12\nmax_input_tokens: 999\ndtype: float32\ndca: {pretraining_length: 64}\n"
                   "model_spec: {attn_implementation: eager}\nstop: [\"\\n\\n\"]\n")
    values = _values(["--input", "in", "--output", "out", "--config", str(cfg), "--max-input-tokens", "500"])
    config = JobConfig(task="summarize", **job_config_kwargs(values))
    assert config.input_path == str(tmp_path / "in") and config.output_dir == str(tmp_path / "out")
    assert (config.max_new_tokens, config.max_input_tokens) == (12, 500)
    assert config.model_spec.dtype == "float32" and config.model_spec.dca == {"pretraining_length": 64}
    assert config.model_spec.attn_implementation == "eager" and config.stop == ("\n\n",)
    off = JobConfig(task="qa", **job_config_kwargs(_values(["--input", "i", "--output", "o", "--no-dca"], "qa")))
    assert off.model_spec.dca is None and off.question_column == "questions"
    with pytest.raises(ValueError, match="missing --output"):
        _values(["--input", "in"])
    cfg.write_text("max_new_tokenz: 3\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_new_tokenz'\].*max_new_tokens"):
        job_config_kwargs(_values(["--input", "in", "--output", "out", "--config", str(cfg)]))


def test_relative_output_is_rejected_under_ray_job_submit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_x"}}))
    with pytest.raises(ValueError, match="relative.*absolute path"):
        _values(["--input", "examples/corpus", "--output", "out"])
    values = _values(["--input", "examples/corpus", "--output", "/abs/out"])
    assert values["input"] == str(tmp_path / "examples/corpus") and values["output"] == "/abs/out"


def test_driver_modules_import_no_torch(tmp_path):
    code = (
        "import sys, jobs.summarize, jobs.qa, jobs.nightly, jobs.common, pipeline.job, pipeline.data.input, "
        "pipeline.data.writer, pipeline.data.prompts, pipeline.metrics.job\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([PYTHON, "-c", code], cwd=REPO, env=job_env(tmp_path), check=True, timeout=120)


def test_dca_flags_use_the_dca_names_and_override_the_config_block(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dca: {pretraining_length: 64, local_window: 4}\ndca_chunk_size: 40\n")
    values = _values(["--input", "i", "--output", "o", "--config", str(cfg), "--dca-local-window", "8",
                      "--dca-temperature-alpha", "0.1"])
    config = JobConfig(task="summarize", **job_config_kwargs(values))
    assert config.model_spec.dca == {"pretraining_length": 64, "chunk_size": 40, "local_window": 8,
                                     "temperature_alpha": 0.1}
    with pytest.raises(ValueError, match="--no-dca turns DCA off"):
        job_config_kwargs(_values(["--input", "i", "--output", "o", "--no-dca", "--dca-chunk-size", "40"]))


def test_production_defaults_chunked_prefill_and_one_shot_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    config = JobConfig(task="summarize", **job_config_kwargs(_values(["--input", "i", "--output", "o"])))
    assert config.prefill_block == "auto" and config.kv_cache_dtype == "auto" and config.model_spec.dca == {}
    assert config.stop == ("\n\n",) and config.no_repeat_ngram_size > 0 and config.sampling().repetition_penalty > 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prefill_block: 512\n")
    one_shot = _values(["--input", "i", "--output", "o", "--config", str(cfg), "--prefill-block", "none"])
    assert JobConfig(task="qa", **job_config_kwargs(one_shot)).prefill_block is None
    from_file = JobConfig(task="qa", **job_config_kwargs(_values(["--input", "i", "--output", "o", "--config", str(cfg)])))
    assert from_file.prefill_block == 512
    with pytest.raises(SystemExit):
        _values(["--input", "i", "--output", "o", "--prefill-block", "sometimes"])
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        JobConfig(task="qa", input_path="i", output_dir="/o", kv_cache_dtype="fp8")


def test_planner_and_jobs_share_flag_names_and_defaults(capsys):
    from jobs import plan
    from pipeline.config.job import DEFAULT_PREFILL_BLOCK

    job_parser = argparse.ArgumentParser()
    add_common_flags(job_parser, task="summarize")
    job_flags = {o for a in job_parser._actions for o in a.option_strings}
    plan_args = plan.parse_args([])
    for flag in ("--model", "--tp", "--max-input-tokens", "--max-new-tokens", "--dtype", "--kv-cache-dtype",
                 "--prefill-block", "--device", "--dca-pretraining-length", "--dca-chunk-size", "--dca-local-window"):
        assert flag in job_flags, flag
        assert hasattr(plan_args, flag[2:].replace("-", "_")), flag
    defaults = JobConfig(task="summarize", input_path="i", output_dir="/o")
    assert plan_args.model == defaults.model_spec.model
    assert (plan_args.max_input_tokens, plan_args.max_new_tokens) == (defaults.max_input_tokens, defaults.max_new_tokens)
    assert plan_args.kv_cache_dtype == defaults.kv_cache_dtype
    assert plan_args.prefill_block == defaults.prefill_block == DEFAULT_PREFILL_BLOCK
    # The old planner names still work, with a warning.
    old = plan.parse_args(["--kv-dtype", "int8", "--prompt-tokens", "1000", "--new-tokens", "8"])
    assert (old.kv_cache_dtype, old.max_input_tokens, old.max_new_tokens) == ("int8", 1000, 8)
    assert "--kv-dtype is deprecated: use --kv-cache-dtype" in capsys.readouterr().err


def test_planner_chunk_len_follows_the_dca_flags(capsys):
    from jobs import plan

    assert plan.main(["--model", "smollm2", "--max-input-tokens", "20000"]) == 0
    assert "prefill block 5120 tokens (DCA chunk_len L)" in capsys.readouterr().out  # 3P/4 - P/8, P = 8192
    assert plan.main(["--model", "smollm2", "--max-input-tokens", "20000", "--dca-chunk-size", "4096",
                      "--dca-local-window", "512"]) == 0
    assert "prefill block 3584 tokens (DCA chunk_len L)" in capsys.readouterr().out
    assert plan.main(["--model", "smollm2", "--dca-local-window", "9000"]) == 2
    assert "local_window" in capsys.readouterr().err

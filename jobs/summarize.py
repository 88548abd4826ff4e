"""Summarise every document of a Parquet corpus.

    python -m jobs.summarize --input examples/corpus --output /tmp/summaries
    ray job submit --working-dir . -- python -m jobs.summarize --input examples/corpus --output /abs/dir

One output row per document (see docs/jobs.md "Output"). Rerunning the same command resumes.
"""

from __future__ import annotations

from jobs.common import run_main, task_main


def main(argv=None) -> None:
    task_main("summarize", __doc__, argv)


if __name__ == "__main__":
    run_main(main)

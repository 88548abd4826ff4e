"""Answer questions about every document of a Parquet corpus.

    python -m jobs.qa --input examples/qa --output /tmp/answers

The input has a `questions` column (list<string>) or a `question` column (string; pass
--question-column question). One output row per (document, question). All questions of a document
share one prefill of the document (KV-cache prefix reuse). Rerunning the same command resumes.
"""

from __future__ import annotations

from jobs.common import run_main, task_main


def main(argv=None) -> None:
    task_main("qa", __doc__, argv)


if __name__ == "__main__":
    run_main(main)

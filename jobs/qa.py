"""Answer questions about every document of a Parquet corpus.

    python -m jobs.qa --input examples/qa --output /tmp/answers

The input has a `questions` column (list<string>) or a `question` column (string; pass
--question-column question). One output row per (document, question). All questions of a document
share one prefill of the document (KV-cache prefix reuse). Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse

from jobs.common import add_common_flags, build_values, job_config_kwargs, report, run_main, setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.qa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser, task="qa")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from pipeline.job import JobConfig, run_job

    config = JobConfig(task="qa", **job_config_kwargs(build_values(args)))
    report(run_job(config))


if __name__ == "__main__":
    run_main(main)

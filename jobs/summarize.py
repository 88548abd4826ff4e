"""Summarise every document of a Parquet corpus.

    python -m jobs.summarize --input examples/corpus --output /tmp/summaries
    ray job submit --working-dir . -- python -m jobs.summarize --input examples/corpus --output /abs/dir

One output row per document (see README "Output"). Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse

from jobs.common import add_common_flags, build_values, job_config_kwargs, report, run_main, setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.summarize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser, task="summarize")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from pipeline.job import JobConfig, run_job

    config = JobConfig(task="summarize", **job_config_kwargs(build_values(args)))
    report(run_job(config))


if __name__ == "__main__":
    run_main(main)

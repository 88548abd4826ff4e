"""Nightly incremental summarisation of a corpus, one output partition per run date.

    python -m jobs.nightly --input /data/corpus --output /data/summaries
    # -> /data/summaries/run_date=YYYY-MM-DD/part-*.parquet (+ _manifest.json, _metrics.json)

A document already summarised in an earlier partition with the same content (sha256 of the text)
and the same model/prompt/generation config is skipped. The run of one corpus on one date has a
deterministic id, usable as the Ray submission id so the same night cannot be submitted twice:

    ray job submit --submission-id "$(python -m jobs.nightly --input /data/corpus --print-submission-id)" \\
        --working-dir . -- python -m jobs.nightly --input /data/corpus --output /data/summaries

Rerunning on the same date resumes that date's partition.
"""

from __future__ import annotations

import argparse
import datetime

from jobs.common import add_common_flags, build_values, job_config_kwargs, report, run_main, setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.nightly", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser, task="summarize")
    parser.add_argument("--date", dest="run_date",
                        help="run date YYYY-MM-DD (default: today, UTC; other ISO spellings such as 20261127 are "
                             "read as the same date)")
    parser.add_argument("--print-submission-id", action="store_true",
                        help="print the deterministic submission id of this corpus and date, and exit")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from pipeline.config.job import JobConfig
    from pipeline.job import nightly_submission_id, normalize_run_date, run_nightly

    # One spelling per night (2026-11-27, 20261127, ...): one partition, one submission id.
    run_date = normalize_run_date(args.run_date or datetime.datetime.now(datetime.timezone.utc).date())
    print_id = args.print_submission_id
    del args.run_date, args.print_submission_id

    values = build_values(args, required=("input",) if print_id else ("input", "output"))
    # The id comes from the input as written (not resolved): the same on the submitting machine
    # and inside `ray job submit`, where relative paths resolve in a copy of the working dir;
    # `corpus`, `corpus/` and `./corpus` give one id (nightly_submission_id normalises).
    submission_id = nightly_submission_id(values.pop("input_as_given"), run_date)
    if print_id:
        print(submission_id)
        return
    kwargs = job_config_kwargs(values)
    kwargs.setdefault("job_id", submission_id)
    output_root = kwargs.pop("output_dir")
    config = JobConfig(task="summarize", output_dir=output_root, **kwargs)
    report(run_nightly(config, output_root=output_root, run_date=run_date))


if __name__ == "__main__":
    run_main(main)

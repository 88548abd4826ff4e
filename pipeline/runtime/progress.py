"""The job's progress bar on stderr: documents done of the total, tokens per second, the ETA."""

from __future__ import annotations

import sys

from pipeline.config.job import JobConfig


def progress_bar(config: JobConfig, total: int):
    """A tqdm bar over `total` documents, or None when the job runs without one (config.progress)."""
    if not config.progress:
        return None
    from tqdm import tqdm

    # In job logs (no terminal) a line every 30 s instead of a redraw every second.
    interval = 1.0 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, unit="doc", desc=config.task, mininterval=interval, maxinterval=max(interval, 10.0),
                smoothing=0.1, dynamic_ncols=True)

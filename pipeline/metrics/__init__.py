"""What a job measures: the per-job metrics written beside its output (`job`: _metrics.json and
_metrics.png, whole-job figures across resumes) and the live metrics Ray's dashboard shows while it
runs (`live`)."""

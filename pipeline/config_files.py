"""What every config dataclass of the pipeline does when read from a dict or file."""

from __future__ import annotations

import dataclasses


def reject_unknown_fields(cls, values: dict) -> None:
    """A misspelt key in a config file is an error naming it, never silently ignored."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")


# Per-task generation defaults (config fields left at None take these), shared by the jobs and the
# processor so that both answer alike. Summaries: stop at the first blank line and keep the small
# models from looping (benchmarks/summary_quality.py measures what each setting does on the example
# corpus).
TASK_GENERATION_DEFAULTS = {
    "summarize": {"stop": ("\n\n",), "repetition_penalty": 1.1, "no_repeat_ngram_size": 4},
    "qa": {"stop": ("\n\n",), "repetition_penalty": 1.0, "no_repeat_ngram_size": 4},
}


def settle_task_fields(config) -> None:
    """The task fields shared by the jobs' and the processor's configs (frozen dataclasses with
    task, truncation, question_column, stop, repetition_penalty and no_repeat_ngram_size):
    checked, and defaults filled in place."""
    from pipeline.prompts import TASKS, TRUNCATION_POLICIES

    if config.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
    if config.truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {config.truncation!r}")
    if config.task == "qa" and not config.question_column:
        object.__setattr__(config, "question_column", "questions")
    if config.task == "summarize" and config.question_column:
        raise ValueError("question_column is only for the qa task")
    defaults = TASK_GENERATION_DEFAULTS[config.task]
    for name in ("stop", "repetition_penalty", "no_repeat_ngram_size"):
        if getattr(config, name) is None:
            object.__setattr__(config, name, defaults[name])
    if isinstance(config.stop, (list, str)):
        object.__setattr__(config, "stop", (config.stop,) if isinstance(config.stop, str) else tuple(config.stop))
    penalty, ngram = config.repetition_penalty, config.no_repeat_ngram_size
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or penalty < 1.0:
        raise ValueError(f"repetition_penalty must be a number >= 1 (1 = off), got {penalty!r}")
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 0:
        raise ValueError(f"no_repeat_ngram_size must be an int >= 0 (0 = off), got {ngram!r}")

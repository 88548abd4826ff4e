"""What every config dataclass of the pipeline does when read from a dict or file."""

from __future__ import annotations

import dataclasses


def reject_unknown_fields(cls, values: dict) -> None:
    """A misspelt key in a config file is an error naming it, never silently ignored."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")


def settle_task_fields(config) -> None:
    """The task fields shared by the jobs' and the processor's configs (frozen dataclasses with
    task, truncation, question_column and stop): checked, and defaults filled in place."""
    from pipeline.prompts import TASKS, TRUNCATION_POLICIES

    if config.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
    if config.truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {config.truncation!r}")
    if config.task == "qa" and not config.question_column:
        object.__setattr__(config, "question_column", "questions")
    if config.task == "summarize" and config.question_column:
        raise ValueError("question_column is only for the qa task")
    if isinstance(config.stop, list):
        object.__setattr__(config, "stop", tuple(config.stop))

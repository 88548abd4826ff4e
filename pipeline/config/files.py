"""What every config dataclass of the pipeline does when read from a dict or file."""

from __future__ import annotations

import dataclasses


def reject_unknown_fields(cls, values: dict) -> None:
    """A misspelt key in a config file is an error naming it, never silently ignored."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")

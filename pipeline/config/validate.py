"""The checks every settings dataclass of the pipeline shares, each written once.

A failed check raises ValueError with one line that names the field, the rule and the value given
(config errors reach users as that line and exit code 2, never as a traceback). `owner` prefixes
the message where the field name alone would be ambiguous ("ModelShape 'llama2-7b': ").
"""

from __future__ import annotations


def is_int(value) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value, *, optional: bool = False, owner: str = "") -> None:
    """value >= 1 (None too, when optional)."""
    if optional and value is None:
        return
    if not is_int(value) or value < 1:
        raise ValueError(f"{owner}{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


def check_positive_ints(config, names, *, optional: bool = False, owner: str = "") -> None:
    """check_positive_int on each named attribute of `config`."""
    for name in names:
        check_positive_int(name, getattr(config, name), optional=optional, owner=owner)


def check_non_negative_int(name: str, value) -> None:
    """value >= 0."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """value is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")

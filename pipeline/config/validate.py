"""The checks every settings dataclass of the pipeline shares, each written once.

A failed check raises ValueError with one line that names the field, the rule and the value given
(config errors reach users as that line and exit code 2, never as a traceback). `owner` prefixes
the message where the field name alone would be ambiguous ("ModelShape 'llama2-7b': ").

The rule is stated in each config's own words (`rule`, `shown`): "a positive integer" for the jobs'
and the processor's settings, "an int >= 1" for the engine's, as their messages have always read
(tests and users match on them); the check behind the words is the same.
"""

from __future__ import annotations


def check_number(name: str, value, *, low: float, high: float = float("inf"), low_open: bool = False,
                 rule: str) -> None:
    """value is a finite real number (not a bool, not a string) in [low, high], or (low, high]
    when low_open. NaN fails every comparison, so it is named here, not let through."""
    import math

    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value > high or value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def is_int(value) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int_at_least(name: str, value, minimum: int = 1, *, optional: bool = False,
                       rule: str = "a positive integer", owner: str = "") -> None:
    """value is an int (not a bool) >= minimum, or None when optional. The message reads
    "<owner><name> must be <rule>, got <value>"."""
    if optional and value is None:
        return
    if not is_int(value) or value < minimum:
        raise ValueError(f"{owner}{name} must be {rule}, got {value!r}")


def check_positive_ints(config, names, *, optional: bool = False, rule: str | None = None) -> None:
    """check_int_at_least(name, minimum 1) on each named attribute of `config`; the rule reads
    "a positive integer" (or None, when optional)."""
    rule = rule or ("a positive integer or None" if optional else "a positive integer")
    for name in names:
        check_int_at_least(name, getattr(config, name), optional=optional, rule=rule)


def check_choice(name: str, value, choices, *, shown: str | None = None) -> None:
    """value is one of `choices`. The message reads "<name> must be <shown>, got <value>"; `shown`
    defaults to "one of <the tuple>"."""
    if value not in choices:
        raise ValueError(f"{name} must be {shown if shown is not None else f'one of {tuple(choices)}'}, got {value!r}")

"""The engine's errors, and how any error is told in one line."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The engine cannot answer: the message says what happened."""


class EngineStartupError(EngineError):
    """The pool cannot start: the message says what is missing."""


def short_error(error: BaseException) -> str:
    """`Type: last line of the message`: an error from a rank (a Ray task's traceback text
    included) in one line, for logs, stats and error rows."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"

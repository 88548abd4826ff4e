"""The engine's errors, and how any error is told in one line."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The engine cannot answer: the message says what happened."""


class EngineStartupError(EngineError):
    """The pool cannot start: the message says what is missing."""


class AttentionBackendUnavailable(EngineStartupError):
    """A DCA attention backend asked for by name (DCAConfig.backend "triton" or "flash", a job's
    --dca-backend) cannot run on a rank, or failed its start-up self-check there (from
    dca.BackendUnavailable, which the driver does not import). A setting to change, not a fault of
    the cluster: never retried. The message is one line naming the replica, the rank and the
    reason."""


def find_error(error: BaseException, kind: type) -> BaseException | None:
    """`error`, or an exception it carries (chained, or a Ray task's `cause`), of class `kind`;
    None if none is. A Ray task's error is also an instance of its cause's class, but its text is
    the whole remote traceback: the cause itself is returned then."""
    seen, stack = set(), [error]
    while stack:
        candidate = stack.pop()
        if candidate is None or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        cause = getattr(candidate, "cause", None)
        if isinstance(cause, kind):
            return cause
        if isinstance(candidate, kind):
            return candidate
        stack += [candidate.__cause__, candidate.__context__, cause if isinstance(cause, BaseException) else None]
    return None


def error_message_in(error: BaseException, kind: type) -> str | None:
    """The message of a `kind` error that `error` carries only as text: Ray keeps no exception
    object when an actor dies in its constructor (Ray Data's actor pools), only the remote
    traceback in the message, which ends with "<module>.<Class>: <message>"."""
    text = str(error)
    marker = f"{kind.__module__}.{kind.__qualname__}: "
    at = text.rfind(marker)
    if at < 0:
        return None
    return text[at + len(marker):].splitlines()[0].strip() or None


def short_error(error: BaseException) -> str:
    """`Type: last line of the message`: an error from a rank (a Ray task's traceback text
    included) in one line, for logs, stats and error rows."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"

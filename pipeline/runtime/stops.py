"""How a job ends early: `JobFailed` (failure budget, engine), `JobStopped` (SIGTERM, SIGINT), and
the signal handling that turns a signal into a clean stop (`StopSignals`)."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger("pipeline.job")


class JobFailed(RuntimeError):
    """The job stopped before finishing (failure budget, engine failure); committed output is kept."""


class JobStopped(BaseException):
    """SIGTERM or SIGINT: the job commits what is done, writes its metrics and exits 128 + signal.

    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way (a prompt that
    fails to build becomes an error row) mistakes a stop for one document's failure."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


class StopSignals:
    """SIGTERM (`ray job stop`, schedulers) and SIGINT raise JobStopped in the main thread, except
    inside a critical section (a part being committed, a document's rows being counted), where
    the stop is raised at its end. A second signal while stopping is ignored: the cleanup runs
    to the end (commit, metrics, staging removed) within the few seconds `ray job stop` waits.

    Installed again after `ray.init`, which replaces the SIGTERM handler with its own (that one
    kills the local Ray processes and exits before anything is committed)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.closing = False  # cleanup has begun: never raise again
        self._critical = 0
        self._pending = False
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (library use in a thread)
        for sig in self.SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None or self.closing:
            log.warning("%s received while stopping: finishing the commit first", signal.Signals(signum).name)
            self.signum = self.signum or signum
            return
        self.signum = signum
        log.warning("%s received: committing finished documents, then stopping", signal.Signals(signum).name)
        if self._critical:
            self._pending = True
            return
        raise JobStopped(signum)

    @contextmanager
    def critical(self):
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self._pending and not self._critical and not self.closing:
            self._pending = False
            raise JobStopped(self.signum)

"""What Ray Data prints on the console for the project's dataflows: one line of progress, not hundreds.

Ray Data 2.60 prints, for every execution, its plan ("Starting execution of Dataset ...",
"Execution plan ..."), a progress report (on a terminal one bar per operator; without one, 18 lines
every 10 s for the processor's five operators) and, after a write, "Data sink X finished. N rows"
where a row is what the datasink received: the ray-data job's datasink receives one row per work
unit, so 6 documents read "2 rows". None of that is lost: Ray Data writes all of it, at every
level, to its own log file (<Ray session>/logs/ray-data/ray-data.log); only the console is spared.
The knobs are Ray Data's own (DataContext fields and the console handler of its "ray.data" logger,
configured by ray/data/_internal/logging.py); nothing here touches Ray Core's logging.
"""

from __future__ import annotations

import contextlib
import logging

# The name Ray Data's logging configuration gives its console handler on the "ray.data" logger
# (ray/data/_internal/logging.py DEFAULT_CONFIG; a RAY_DATA_LOGGING_CONFIG of the user's may name
# none, and is then left as the user made it).
RAY_DATA_CONSOLE_HANDLER = "console"

# Ray Data warns once per process when its progress bars are turned off ("Progress bars
# disabled. To enable, set ...") or only its operator bars are: that is the setting chosen here,
# not news for the user. These are the keys of Ray's own log_once for those two warnings.
_PROGRESS_SETTING_WARNINGS = ("ray_data_progress_manager_disabled", "ray_data_progress_manager_global")


def _settle_progress_setting_warnings() -> None:
    from ray.util.debug import log_once

    for key in _PROGRESS_SETTING_WARNINGS:
        log_once(key)  # marks it as said: Ray Data's own warning for the setting is skipped


def quiet_execution(context, *, progress: bool) -> None:
    """Sets a Ray Data DataContext (a Dataset's own `ds.context`, or the current one) to print no
    plan at the start of an execution and no per-operator progress. `progress`: keep Ray Data's
    one global bar (the processor, which has no bar of its own); False: no Ray Data progress at
    all (the jobs show their own bar, counted in documents)."""
    context.print_on_execution_start = False
    context.enable_operator_progress_bars = False
    context.enable_progress_bars = progress
    _settle_progress_setting_warnings()


@contextlib.contextmanager
def ray_data_console(level: int = logging.WARNING):
    """Within the block, Ray Data's console handler shows records of `level` and above (its log
    file keeps everything); the handler's level is restored afterwards. For a process the project
    owns (a job's driver), around the one execution it runs: a user's own Ray Data work before or
    after is printed as Ray Data prints it."""
    handlers = [h for h in logging.getLogger("ray.data").handlers if h.name == RAY_DATA_CONSOLE_HANDLER]
    before = [h.level for h in handlers]
    for handler in handlers:
        handler.setLevel(max(level, handler.level))
    try:
        yield
    finally:
        for handler, old in zip(handlers, before):
            handler.setLevel(old)


__all__ = ["quiet_execution", "ray_data_console", "RAY_DATA_CONSOLE_HANDLER"]

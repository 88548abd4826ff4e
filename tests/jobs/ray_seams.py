"""Seams into Ray for the tests of a job's start-up, usable in this process or in a job's
subprocess (`python -c "from tests.jobs.ray_seams import ...; ...; run_main(main)"`):

- `local_start_times_out(n)`: the next n local starts of Ray fail the way they fail on a loaded
  machine: the real ray.init starts its GCS and raylet, waits for the node to register, and
  raises its own "The current node timed out during startup" exception (the wait Ray gives
  the raylet, 30 s, is made to pass at once: the node's info lookup fails and moves the clock
  that wait reads 31 s on). What the failed start left running is real, too.
- `pause_after_ray_init(marker)`: ray.init returns, then the process writes `marker` and waits
  (the test sends a signal at that moment); no sleep races. ray.shutdown lingers 4 s.
- `forbid_ray_init()`: ray.init raises (a run that must not start Ray).
- `forbid_tokenizer_and_model()`: loading the tokenizer or the model's weights raises (a run
  that must load neither; reading the model's config.json is allowed: it is one of the checks).
"""

from __future__ import annotations

import os
import time


class _ShiftedClock:
    """The `time` module as ray._private.node sees it, with monotonic() moved on by `offset`."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def local_start_times_out(failures: int) -> dict:
    """Makes the next `failures` local ray.init calls time out in Ray's own wait for the node.
    -> a dict whose "left" counts the failures still to come."""
    import ray._private.node as node_module
    import ray._private.services as services

    real_get_node = services.get_node
    clock = _ShiftedClock()
    state = {"left": failures}

    def get_node(gcs_address, node_id):
        if state["left"] > 0:
            state["left"] -= 1
            clock.offset += 31.0  # past Ray's raylet_start_wait_time_s = 30
            raise RuntimeError("node info not in the GCS yet (injected)")
        return real_get_node(gcs_address, node_id)

    def restore() -> None:
        services.get_node = real_get_node
        node_module.time = time

    services.get_node = get_node
    node_module.time = clock
    state["restore"] = restore
    return state


def pause_after_ray_init(marker: str, timeout_s: float = 300.0, linger_s: float = 4.0) -> None:
    """Also: each ray.shutdown() then takes `linger_s` longer, so that a process stopping after
    the signal lives past Ray's 3 s abort alarm (see pipeline.runtime.cluster._init_ray) however
    fast the machine is."""
    import ray

    real_init, real_shutdown = ray.init, ray.shutdown

    def shutdown(*args, **kwargs):
        real_shutdown(*args, **kwargs)
        time.sleep(linger_s)

    ray.shutdown = shutdown

    def init(*args, **kwargs):
        context = real_init(*args, **kwargs)
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # the signal arrives here
            time.sleep(0.05)
        raise AssertionError(f"no signal within {timeout_s} s after ray.init returned")

    ray.init = init


def forbid_ray_init() -> None:
    import ray

    def init(*args, **kwargs):
        raise AssertionError("ray.init was called")

    ray.init = init


def forbid_tokenizer_and_model() -> None:
    """Before pipeline.job is imported (it binds load_tokenizer by name)."""
    import pipeline.engine.models as models

    def forbidden(name):
        def load(*args, **kwargs):
            raise AssertionError(f"{name} was called")
        return load

    for name in ("load_tokenizer", "load_model", "load_model_for_tp", "_load_on_cpu"):
        setattr(models, name, forbidden(name))

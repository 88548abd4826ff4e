"""The Ray cluster of a job: join the one given (or `ray job submit`'s), or start a local one sized
for the job; check and wait for the GPUs it needs (autoscaled clusters); and what `ray job submit`
tells the process about itself."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time

from pipeline.config.job import JobConfig
from pipeline.config.model import ModelError
from pipeline.engine.errors import EngineStartupError
from pipeline.engine.replica import local_ray_system_config
from pipeline.runtime.stops import JobFailed, JobStopped

log = logging.getLogger("pipeline.job")

# Tries of a local Ray start, and the pause before try n (n x this many seconds). On a loaded
# machine Ray's own wait for its raylet (30 s, fixed in Ray) runs out now and then, and the next
# try usually gets through.
LOCAL_START_ATTEMPTS = 3
LOCAL_START_BACKOFF_S = 2.0


class RayStartError(EngineStartupError):
    """Ray could not be started or joined: the one-line message says why and what to do (the jobs
    exit 2, with nothing claimed)."""


def check_devices(config: JobConfig) -> None:
    """On a Ray this job started itself (no autoscaler), the GPUs it has are all it will get."""
    import ray

    if config.device != "cuda":
        return
    need, have = config.tp * config.replicas, ray.cluster_resources().get("GPU", 0)
    if have < need:
        raise ModelError(
            f"--device cuda needs {need} GPU(s) (--tp {config.tp} x --replicas {config.replicas}) and this machine "
            f"has {have:g}; lower --tp/--replicas or submit the job to a cluster with GPUs"
        )


def under_ray_job() -> bool:
    """True inside the entrypoint of `ray job submit` (the job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def ray_submission_id() -> str | None:
    """The submission id of the `ray job submit` running this process, else None."""
    try:
        metadata = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("metadata", {})
        return metadata.get("job_submission_id")
    except (KeyError, ValueError, AttributeError):
        return None


def ensure_ray(config: JobConfig, *, on_started=None) -> JobConfig:
    """Connects to the cluster in --ray-address / RAY_ADDRESS (set by `ray job submit`), else
    starts a local Ray sized so that tp x replicas ranks fit on this machine (retried, see
    start_local_ray). Returns the config with cpus_per_rank filled in for a local Ray.

    on_started(): called as soon as ray.init returns (the job installs its stop handlers there:
    ray.init replaces the SIGTERM handler with its own). Raises RayStartError when Ray cannot be
    started or joined, JobStopped when SIGTERM arrives while Ray starts."""
    import ray

    address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
    local = not address or address == "local"
    ranks = config.tp * config.replicas
    cpus = os.cpu_count() or 1
    if local and config.cpus_per_rank is None:
        config = dataclasses.replace(config, cpus_per_rank=max(1, cpus // ranks))
    if ray.is_initialized():
        return config
    if not local:
        try:
            _init_ray(lambda: ray.init(address=address, log_to_driver=True), on_started)
        except (JobStopped, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - what ray.init raises is not typed: told in one line
            raise RayStartError(
                f"cannot join the Ray cluster at {address} ({_first_sentence(error)}); check the address "
                "(--ray-address / RAY_ADDRESS), that the cluster is up (`ray status`) and its authentication "
                "(RAY_AUTH_MODE, the token)"
            ) from None
    else:
        need = ranks * (config.cpus_per_rank or 1)
        if config.dataflow == "ray-data":  # logical CPUs for the prompt actors and the read/write tasks
            need += config.prompt_actors + 1
            cpus += config.prompt_actors + 1
        start_local_ray(max(cpus, need), on_started=on_started)
    return config


def start_local_ray(num_cpus: int, *, log_to_driver: bool = True, on_started=None,
                    attempts: int = LOCAL_START_ATTEMPTS) -> None:
    """A private local Ray of `num_cpus` logical CPUs, without a dashboard (`address="local"`: never
    a cluster that happens to run on this machine).

    A start that fails (on a loaded machine: "The current node timed out during startup") is
    retried `attempts` times in all, after removing what the failed try left running (its GCS and
    raylet go on otherwise, until this process exits). Then RayStartError, in one line. A SIGTERM
    or SIGINT while Ray starts raises JobStopped, with the half-started node removed."""
    import ray

    _quiet_local_ray_notice()
    error = None
    for attempt in range(1, attempts + 1):
        before = _child_pids()
        try:
            _init_ray(lambda: ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                                       log_to_driver=log_to_driver, _system_config=local_ray_system_config()),
                      on_started)
            return
        except BaseException as caught:  # noqa: BLE001 - every way out removes the half-started node
            _remove_failed_start(before)
            if isinstance(caught, (JobStopped, KeyboardInterrupt, SystemExit)) or _is_usage_error(caught):
                raise
            error = caught
        if attempt < attempts:
            log.warning("Ray's local start failed (%s); removed what it started, trying again (%d of %d)",
                        _first_sentence(error), attempt + 1, attempts)
            time.sleep(LOCAL_START_BACKOFF_S * attempt)
    raise RayStartError(
        f"Ray could not start on this machine ({attempts} tries; last: {_first_sentence(error)}): the machine is "
        "probably overloaded. Rerun when it is less busy, or start Ray yourself (`ray start --head`) and pass "
        "its address with --ray-address"
    )


def _init_ray(init, on_started) -> None:
    """Runs `init` (a ray.init call), then on_started(). Between the start of ray.init and
    on_started, SIGTERM goes to Ray's own handler, which raises SystemExit(SIGTERM) in this thread
    (and ending the interpreter there aborts Ray's core worker: exit 134 with a C++ stack): that
    becomes JobStopped(SIGTERM), after Ray is shut down, so the job stops like any other stop."""
    import ray

    try:
        init()
        if on_started is not None:
            on_started()
    except SystemExit as exit_:
        if exit_.code != signal.SIGTERM:
            raise
        # Ray's core worker has its C++ failure handler (absl) on SIGTERM from inside ray.init: it
        # logs "*** SIGTERM received", hands the signal on (here), and arms alarm(3) with an abort
        # handler, so that a process still running 3 s later dies with SIGABRT (exit 134, a C++
        # stack), however cleanly it stops. The job stops cleanly: disarm it.
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        log.warning("SIGTERM received while Ray started: stopping")
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - stopping anyway
            log.debug("ray.shutdown after SIGTERM failed", exc_info=True)
        if on_started is not None:
            on_started()  # the job's handlers again: a second signal is the job's to handle
        raise JobStopped(signal.SIGTERM) from None


def _is_usage_error(error: BaseException) -> bool:
    """Errors of the call itself (bad arguments): trying again cannot help."""
    return isinstance(error, (TypeError, ValueError))


def _first_sentence(error: BaseException | None) -> str:
    text = " ".join(str(error).split()) if error is not None else ""
    first = text.split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _child_pids() -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def _remove_failed_start(before: set[int]) -> None:
    """After a ray.init that failed part-way: the processes the try started (GCS, raylet and
    their helpers: children of this process that were not there before it, and every process of
    the same Ray session, such as the dashboard and runtime-env agents a raylet starts, which are
    reparented when the raylet goes) are found first, then ray.shutdown() (a no-op when Ray never
    got as far as recording its node), then they are terminated, then killed."""
    import psutil
    import ray

    try:
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    except psutil.Error:
        started = []
    sessions = set()
    for process in started:
        try:
            sessions.update(arg.split("=", 1)[1] for arg in process.cmdline() if arg.startswith("--session-name="))
        except psutil.Error:
            pass
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - the processes are removed below either way
        log.debug("ray.shutdown after a failed start failed", exc_info=True)
    found = {p.pid: p for p in started}
    if sessions:
        for process in psutil.process_iter(["cmdline"]):
            try:
                if process.pid != os.getpid() and any(f"--session-name={name}" in (process.info["cmdline"] or [])
                                                      for name in sessions):
                    found.setdefault(process.pid, process)
            except psutil.Error:
                pass
    victims = list(found.values())
    for process in victims:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


class _DropRayAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def _quiet_local_ray_notice() -> None:
    """Ray 2.60 warns at every start of a local cluster that token authentication is on (its
    default, and what the private cluster of a job should have): one warning per job run in every
    log, about nothing to act on. A filter on that logger drops exactly that message."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropRayAuthNotice) for f in logger.filters):
        logger.addFilter(_DropRayAuthNotice())


def wait_for_gpus(config: JobConfig) -> bool:
    """With device "cuda" on a cluster that has fewer GPUs than tp x replicas (GPU workers scaled
    from 0), asks the autoscaler for one node-sized bundle per replica and waits for the GPUs.
    Returns True when a request was made (release it with `release_gpu_request`)."""
    import ray

    if config.device != "cuda":
        return False
    need = config.tp * config.replicas
    if ray.cluster_resources().get("GPU", 0) >= need:
        return False
    from ray.autoscaler.sdk import request_resources

    cpus = config.cpus_per_rank or 1
    request_resources(bundles=[{"GPU": config.tp, "CPU": config.tp * cpus}] * config.replicas)
    log.info("waiting for the autoscaler: %d GPU(s) in groups of %d (have %g)", need, config.tp,
             ray.cluster_resources().get("GPU", 0))
    deadline = time.monotonic() + config.scale_up_timeout_s
    while ray.cluster_resources().get("GPU", 0) < need:
        if time.monotonic() > deadline:
            release_gpu_request()
            raise JobFailed(
                f"the cluster did not reach {need} GPUs within scale_up_timeout_s={config.scale_up_timeout_s:.0f} s "
                f"(has {ray.cluster_resources().get('GPU', 0):g}); check the autoscaler (`ray status`, "
                "`ray monitor cluster.yaml`) and the GPU quota of your cloud project"
            )
        time.sleep(5)
    return True


def release_gpu_request() -> None:
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
    except Exception:  # best effort: the idle timeout scales down anyway
        log.debug("could not clear the autoscaler request", exc_info=True)

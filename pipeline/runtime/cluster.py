"""The Ray cluster of a job: join the one given (or `ray job submit`'s), or start a local one sized
for the job; check and wait for the GPUs it needs (autoscaled clusters); and what `ray job submit`
tells the process about itself."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from pipeline.config.job import JobConfig
from pipeline.config.model import ModelError
from pipeline.runtime.stops import JobFailed

log = logging.getLogger("pipeline.job")


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


def ensure_ray(config: JobConfig) -> JobConfig:
    """Connects to the cluster in --ray-address / RAY_ADDRESS (set by `ray job submit`), else
    starts a local Ray sized so that tp x replicas ranks fit on this machine. Returns the config
    with cpus_per_rank filled in for a local Ray."""
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
        ray.init(address=address, log_to_driver=True)
    else:
        need = ranks * (config.cpus_per_rank or 1)
        if config.dataflow == "ray-data":  # logical CPUs for the prompt actors and the read/write tasks
            need += config.prompt_actors + 1
            cpus += config.prompt_actors + 1
        start_local_ray(max(cpus, need))
    return config


def start_local_ray(num_cpus: int, *, log_to_driver: bool = True) -> None:
    """A private local Ray of `num_cpus` logical CPUs, without a dashboard (`address="local"`: never
    a cluster that happens to run on this machine)."""
    import ray

    _quiet_local_ray_notice()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)


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

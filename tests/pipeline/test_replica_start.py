"""A replica whose ranks Ray stopped before they ran (pipeline.engine.replica.Replica.start): on a
loaded machine Ray kills a worker process that is slow to register and reports its actor as one
that "never ran". The replica is started again, says why, and stops with the reason when it keeps
happening. Its own module: the retry needs free CPUs in the cluster, which the module-scoped pools
of the other engine tests hold."""

from __future__ import annotations

import pytest

from pipeline.config.engine import EngineConfig
from pipeline.config.model import ModelSpec
from pipeline.config.task import SamplingParams
from pipeline.engine import ReplicaPool
from pipeline.engine.requests import GenerationRequest
from tests.pipeline.conftest import DCA


def _request(rid, prompt):
    return GenerationRequest(request_id=rid, prefix_ids=prompt, suffix_ids=[[]], sampling=SamplingParams(max_new_tokens=4))


def _config(model_dir, tp_size, **kw):
    return EngineConfig(model_spec=ModelSpec(model=model_dir, dca=DCA), tp_size=tp_size, max_input_tokens=400, **kw)


def _never_started_error(detail="Worker exit type: SYSTEM_ERROR Worker exit detail: the worker did not register in time"):
    """The error Ray raises for an actor stopped before its creation task ran (never_started)."""
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError

    return ActorDiedError(cause=ActorDiedErrorContext(
        error_message=f"The actor is dead because its worker process has died. {detail}", never_started=True,
        class_name="RankWorker", pid=4242, actor_id=bytes(16)))


def test_ray_errors_of_a_rank_that_never_ran_are_told_apart():
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError

    from pipeline.engine.replica import _never_started, _ray_reason

    error = _never_started_error()
    assert _never_started(error)
    assert _ray_reason(error) == ("The actor is dead because its worker process has died. Worker exit type: "
                                  "SYSTEM_ERROR Worker exit detail: the worker did not register in time")
    crashed = ActorDiedError(cause=ActorDiedErrorContext(error_message="raised in __init__", actor_id=bytes(16)))
    assert not _never_started(crashed) and not _never_started(RuntimeError(str(error)))


def test_a_rank_ray_stopped_before_it_ran_is_started_again(ray_cluster, tiny_model_dir, monkeypatch, caplog):
    """The first start's ranks are reported "never ran" (what Ray says of a worker process it killed
    for starting too slowly on a loaded machine): the replica is started again, says why, serves."""
    from pipeline.engine import replica as replica_module

    real_start, real_get, failed = replica_module.Replica._start_once, ray_cluster.get, []

    def lost_ranks(refs, *args, **kwargs):
        ray_cluster.get = real_get  # this call only: the clean-up after it (ray.kill, the placement group) is real
        real_get(refs, *args, **kwargs)  # the ranks are real: let them come up, then report them lost
        raise _never_started_error()

    def start_once(self):
        if failed:
            return real_start(self)
        failed.append(True)
        ray_cluster.get = lost_ranks  # for the first start only: its first wait on the ranks
        try:
            return real_start(self)
        finally:
            ray_cluster.get = real_get

    def placed():
        from ray.util import placement_group_table

        return {pg for pg, info in placement_group_table().items() if info["state"] == "CREATED"}

    monkeypatch.setattr(replica_module.Replica, "_start_once", start_once)
    before = placed()
    with caplog.at_level("WARNING", logger="pipeline.engine"):
        with ReplicaPool(_config(tiny_model_dir, 1)) as pool:
            (result,) = pool.submit(_request("after-retry", [5, 6, 7])).result(timeout=120)
            assert result.status == "ok", result.error_message
            (stats,) = pool.stats().values()
            assert stats["alive"]
            assert len(placed() - before) == 1  # the first try's placement group was removed
    assert failed == [True]
    (warning,) = [r.getMessage() for r in caplog.records if "before it ran" in r.getMessage()]
    assert "did not register in time" in warning and "attempt 2 of 3" in warning


def test_a_replica_whose_ranks_never_run_stops_with_the_reason(ray_cluster, tiny_model_dir, monkeypatch):
    from pipeline.engine import replica as replica_module
    from pipeline.engine.errors import EngineStartupError

    calls = []

    def never(self):
        calls.append(self.name)
        raise replica_module.RankNeverStarted("Worker exit detail: the worker did not register in time")

    monkeypatch.setattr(replica_module.Replica, "_start_once", never)
    with pytest.raises(EngineStartupError) as caught:
        ReplicaPool(_config(tiny_model_dir, 1)).start()
    assert len(calls) == replica_module.START_ATTEMPTS
    message = str(caught.value)
    assert "3 times in a row" in message and "did not register in time" in message
    assert "RAY_worker_register_timeout_seconds" in message and "\n" not in message


def test_a_pool_that_starts_its_own_local_ray_gives_workers_time_to_register(tiny_model_dir, monkeypatch):
    """ReplicaPool.start with no Ray running starts a private local Ray whose workers get 300 s
    to register, as a job's local Ray does; RAY_worker_register_timeout_seconds wins."""
    import ray

    from pipeline.runtime import cluster

    class Started(Exception):
        pass

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        raise Started

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_worker_register_timeout_seconds", raising=False)
    with pytest.raises(Started):
        ReplicaPool(_config(tiny_model_dir, 1)).start()
    assert calls[-1] == {"address": "local", "_system_config": {"worker_register_timeout_seconds": 300}}
    assert cluster.local_ray_system_config() == calls[-1]["_system_config"]  # the jobs' local Ray: the same
    monkeypatch.setenv("RAY_worker_register_timeout_seconds", "90")
    with pytest.raises(Started):
        ReplicaPool(_config(tiny_model_dir, 1)).start()
    assert calls[-1] == {"address": "local", "_system_config": {}}
    with pytest.raises(Started):  # a cluster's address: its own settings
        ReplicaPool(_config(tiny_model_dir, 1, ray_address="ray://head:10001")).start()
    assert calls[-1] == {"address": "ray://head:10001"}

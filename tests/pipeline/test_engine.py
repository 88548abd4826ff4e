"""The engine on a local Ray cluster (CPU, gloo): tensor-parallel replicas of a tiny random Llama
with DCA, against plain transformers + apply_dca; metrics; typed errors; a rank killed mid-request."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import threading

import pytest
import torch

from pipeline.config.engine import EngineConfig
from pipeline.config.model import ModelSpec
from pipeline.config.task import SamplingParams
from pipeline.engine import EngineStartupError, ReplicaPool
from pipeline.engine.models import load_model
from pipeline.engine.requests import INVALID_INPUT, PROMPT_TOO_LONG, REPLICA_FAILED, GenerationRequest
from tests.pipeline.conftest import DCA

MAX_NEW = 12


def _prompts(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def _request(rid, prompt, suffixes=None, max_new_tokens=MAX_NEW, ignore_eos=False):
    return GenerationRequest(request_id=rid, prefix_ids=prompt, suffix_ids=suffixes or [[]],
                             sampling=SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos))


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    """Plain transformers + apply_dca in this process."""
    return load_model(ModelSpec(model=tiny_model_dir, dca=DCA), "cpu")


def _greedy(model, prompt, max_new_tokens=MAX_NEW):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=2, pad_token_id=0)
    ids = out[0, len(prompt):].tolist()
    return ids[: ids.index(2)] if 2 in ids else ids


def _config(model_dir, tp_size, **kw):
    kw.setdefault("max_input_tokens", 400)
    return EngineConfig(model_spec=ModelSpec(model=model_dir, dca=DCA), tp_size=tp_size, **kw)


@pytest.fixture(scope="module")
def tp1_pool(ray_cluster, tiny_model_dir):
    with ReplicaPool(_config(tiny_model_dir, 1)) as pool:
        yield pool


@pytest.fixture(scope="module")
def tp2_pool(ray_cluster, tiny_model_dir):
    # 9 query heads / 3 KV heads over 2 ranks: AutoTP splits them unevenly.
    with ReplicaPool(_config(tiny_model_dir, 2, max_restarts=2, request_retries=2)) as pool:
        yield pool


def test_driver_side_imports_stay_light():
    code = ("import sys, pipeline.engine, pipeline.engine.requests, pipeline.engine.models, pipeline.config.engine; "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'dca') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tp2_and_tp1_give_the_greedy_tokens_of_transformers_with_dca(tp1_pool, tp2_pool, reference_model):
    prompts = _prompts(110, 70, 130, 20)  # > chunk_size=48: DCA's successive and inter-chunk paths
    expected = [_greedy(reference_model, p) for p in prompts]
    requests = [_request(f"r{i}", p) for i, p in enumerate(prompts)]
    for pool in (tp1_pool, tp2_pool):
        got = {}
        for results in pool.run(requests, max_in_flight=4):
            (result,) = results
            assert result.status == "ok", result.error_message
            got[result.request_id] = result.output_ids
        assert got == {f"r{i}": ids for i, ids in enumerate(expected)}


def _mixed_requests():
    """Prompts from 9 tokens to ~9 DCA chunks (chunk_len 40), different output lengths, and two
    QA requests sharing their prefix (one suffix empty)."""
    lengths, news = (350, 9, 130, 250, 70, 300, 41), (12, 30, 5, 20, 25, 8, 16)
    requests = [_request(f"m{i}", p, max_new_tokens=n) for i, (p, n) in enumerate(zip(_prompts(*lengths, seed=11), news))]
    prefix, s1, s2 = _prompts(170, 12, 5, seed=12)
    requests.insert(2, _request("qa1", prefix, [s1, [], s2], max_new_tokens=14))
    requests.insert(5, _request("qa2", prefix[:90], [s2, s1], max_new_tokens=9))
    return requests


@pytest.mark.parametrize("pool_name", ["tp1_pool", "tp2_pool"])
def test_continuous_batching_mixed_lengths_match_each_request_alone(pool_name, request, reference_model):
    """max_batch_size 8 rows and 9 requests of 12 rows: requests wait, join as rows end, and their
    prefill blocks run beside the others' decode steps; each still gets its greedy tokens alone."""
    pool = request.getfixturevalue(pool_name)
    (stats,) = pool.stats().values()
    assert stats["scheduler"] == "continuous" and stats["prefill_tokens"] == 1024
    requests = _mixed_requests()
    got = {}
    for results in pool.run(requests, max_in_flight=len(requests)):
        assert all(r.status == "ok" for r in results), results[0].error_message
        got[results[0].request_id] = [r.output_ids for r in results]
    for r in requests:
        assert got[r.request_id] == [_greedy(reference_model, r.prefix_ids + s, r.sampling.max_new_tokens)
                                     for s in r.suffix_ids], r.request_id


@pytest.mark.parametrize("pool_name", ["tp1_pool", "tp2_pool"])
def test_device_time_rule_over_ranks(pool_name, request):
    """The job's device-seconds (sum over ranks of busy time) equal the sum of the per-request
    attributions, and never exceed ranks x serving wall clock."""
    import time

    pool = request.getfixturevalue(pool_name)
    ranks = pool.config.tp_size
    (before,) = pool.stats().values()
    start = time.monotonic()
    results = [r for rs in pool.run(_mixed_requests(), max_in_flight=16) for r in rs]
    wall = time.monotonic() - start
    (after,) = pool.stats().values()
    busy = [b - a for a, b in zip(before["busy_s_per_rank"], after["busy_s_per_rank"])]
    attributed = sum(r.device_seconds_all_ranks for r in results)
    assert attributed == pytest.approx(sum(busy), rel=1e-4, abs=1e-5)  # stats round to the microsecond
    assert 0 < sum(busy) <= ranks * wall
    for r in results:
        assert r.device_time_kind == "cpu_wall" and r.gpu_time_s is None  # never labelled GPU on CPU
        assert 0 < r.device_time_s <= r.device_seconds_all_ranks <= ranks * r.device_time_s + 1e-12
        assert len(r.peak_memory_per_rank) == ranks and r.peak_memory_bytes == max(r.peak_memory_per_rank)


def test_static_scheduler_follows_the_same_device_time_rule(ray_cluster, tiny_model_dir, tp1_pool, reference_model):
    import time

    requests = _mixed_requests()
    with ReplicaPool(_config(tiny_model_dir, 1, scheduler="static")) as pool:
        start = time.monotonic()
        results = {rs[0].request_id: rs for rs in pool.run(requests, max_in_flight=16)}
        wall = time.monotonic() - start
        (stats,) = pool.stats().values()
    assert stats["scheduler"] == "static"
    flat = [r for rs in results.values() for r in rs]
    assert sum(r.device_seconds_all_ranks for r in flat) == pytest.approx(sum(stats["busy_s_per_rank"]), rel=1e-4)
    assert sum(stats["busy_s_per_rank"]) <= wall
    for r in requests:  # and the two schedulers give the same tokens
        assert [x.output_ids for x in results[r.request_id]] == [
            _greedy(reference_model, r.prefix_ids + s, r.sampling.max_new_tokens) for s in r.suffix_ids]


def test_shared_prefix_request_on_tp2(tp2_pool, reference_model):
    prefix, s1, s2 = _prompts(90, 7, 15, seed=5)
    results = tp2_pool.submit(_request("doc", prefix, [s1, s2])).result(timeout=120)
    assert [r.suffix_index for r in results] == [0, 1]
    assert [r.output_ids for r in results] == [_greedy(reference_model, prefix + s) for s in (s1, s2)]
    assert all(r.prefix_prefill_s > 0 for r in results)


def test_metrics_are_present_and_plausible(tp2_pool, tp1_pool):
    (prompt,) = _prompts(100, seed=6)
    for pool, ranks in ((tp1_pool, 1), (tp2_pool, 2)):
        (r,) = pool.submit(_request("m", prompt)).result(timeout=120)
        assert r.status == "ok" and r.prompt_tokens == 100
        assert r.output_tokens == len(r.output_ids) and 0 < r.output_tokens <= MAX_NEW
        assert isinstance(r.output, str) and r.output
        assert 0 < r.prefill_s < 60 and 0 <= r.decode_s < 60
        assert r.wall_time_s == pytest.approx(r.prefill_s + r.decode_s, rel=1e-6)
        # CPU: wall clock and RSS stand in, labelled as such; no GPU time is invented.
        assert r.gpu_time_s is None and r.memory_kind == "cpu_peak_rss"
        assert len(r.peak_memory_per_rank) == ranks
        assert all(50e6 < m < 8e9 for m in r.peak_memory_per_rank)
        assert r.peak_memory_bytes == max(r.peak_memory_per_rank)
        assert r.device_seconds_all_ranks >= r.wall_time_s * 0.99 * ranks * 0.5
        assert r.replica == "replica-0" and r.attempts == 1
        (stats,) = pool.stats().values()
        assert stats["load_s"] > 0 and stats["served"] >= 1 and stats["failures"] == 0
        assert stats["tp_size"] == ranks and stats["device"] == "cpu"


def test_over_long_and_invalid_prompts_get_error_results(tp1_pool):
    too_long = tp1_pool.submit(_request("long", list(range(3, 128)) * 4)).result(timeout=10)
    assert too_long[0].status == "error" and too_long[0].error_type == PROMPT_TOO_LONG
    assert "max_input_tokens=400" in too_long[0].error_message
    bad = tp1_pool.submit(_request("bad", [5, 6, 999])).result(timeout=10)
    assert bad[0].error_type == INVALID_INPUT and "999" in bad[0].error_message
    ok = tp1_pool.submit(_request("after", _prompts(30)[0])).result(timeout=60)
    assert ok[0].status == "ok"  # the replica is still usable


def test_startup_that_cannot_succeed_fails_fast(tp1_pool, tp2_pool, tiny_model_dir, tmp_path):
    with pytest.raises(EngineStartupError, match="not found"):
        ReplicaPool(_config(str(tmp_path / "missing"), 1)).start()
    with pytest.raises(EngineStartupError, match="needs 8 CPUs on one node"):
        ReplicaPool(_config(tiny_model_dir, 8)).start()
    with pytest.raises(EngineStartupError, match="needs 1 GPUs on one node"):
        ReplicaPool(_config(tiny_model_dir, 1, device="cuda")).start()
    # The cluster has the CPUs, but the two pools above hold 3 of its 4.
    with pytest.raises(EngineStartupError, match="free now in the cluster"):
        ReplicaPool(_config(tiny_model_dir, 2, placement_timeout_s=2)).start()


def test_killed_rank_mid_request_is_answered_by_a_rebuilt_replica(tp2_pool, reference_model):
    import ray

    (prompt,) = _prompts(120, seed=7)
    expected = _greedy(reference_model, prompt, 64)
    dispatched = threading.Event()
    tp2_pool._on_dispatch = lambda replica, ids: "victim" in ids and dispatched.set()
    try:
        future = tp2_pool.submit(_request("victim", prompt, max_new_tokens=64))
        assert dispatched.wait(60)
        ray.kill(tp2_pool._replicas[0].workers[1], no_restart=True)  # rank 1 dies mid-request
        (result,) = future.result(timeout=240)
    finally:
        tp2_pool._on_dispatch = None
    assert result.status == "ok", result.error_message
    assert result.output_ids == expected and result.attempts == 2
    (stats,) = tp2_pool.stats().values()
    assert stats["failures"] == 1 and stats["restarts"] == 1 and stats["alive"]
    # The rebuilt replica keeps serving.
    (after,) = tp2_pool.submit(_request("after", prompt)).result(timeout=120)
    assert after.output_ids == expected[:MAX_NEW] and after.attempts == 1


def test_shutdown_leaves_no_shared_memory_files(tp2_pool):
    tp2_pool.shutdown()  # the fixture's own shutdown afterwards is a no-op
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*") == []
    assert all(not s["alive"] for s in tp2_pool.stats().values())


def test_engine_config_validates_and_loads_from_a_file(tmp_path):
    path = tmp_path / "engine.json"
    path.write_text('{"engine": {"model_spec": {"model": "smollm2", "dca": null}, "tp_size": 2, "replicas": 3}}')
    config = EngineConfig.from_file(path)
    assert config.tp_size == 2 and config.replicas == 3 and config.model_spec.dca is None
    assert EngineConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="tp_size must be an int >= 1"):
        EngineConfig(model_spec=ModelSpec(), tp_size=0)
    with pytest.raises(ValueError, match="device must be one of"):
        EngineConfig(model_spec=ModelSpec(), device="tpu")
    with pytest.raises(ValueError, match="unknown EngineConfig field"):
        EngineConfig.from_dict({"model_spec": {}, "tp": 2})


def test_hung_replica_is_rebuilt_then_given_up_with_clear_errors(ray_cluster, tiny_model_dir):
    # Every attempt outlives request_timeout_s: the replica is rebuilt max_restarts times, the
    # request is retried request_retries times, then both give up with errors saying so.
    config = _config(tiny_model_dir, 1, request_timeout_s=0.2, max_restarts=1, request_retries=1)
    (prompt,) = _prompts(300, seed=8)
    with ReplicaPool(config) as pool:
        (result,) = pool.submit(_request("slow", prompt, max_new_tokens=3000, ignore_eos=True)).result(timeout=300)
        assert result.status == "error" and result.error_type == REPLICA_FAILED and result.attempts == 2
        assert "request_retries=1 exhausted" in result.error_message
        assert "request_timeout_s=0.2" in result.error_message
        (stats,) = pool.stats().values()
        assert stats["failures"] == 2 and not stats["alive"]
        (late,) = pool.submit(_request("late", prompt[:10])).result(timeout=10)
        assert late.error_type == REPLICA_FAILED and "no replica is left" in late.error_message

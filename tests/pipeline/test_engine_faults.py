"""No hang, ever: out of memory under tensor parallelism (on every rank, or on one rank while its
peer waits in a collective), an exception inside the serving loop, a serving thread that dies,
and `run` waiting with no serving thread left. Faults are injected: torch.OutOfMemoryError
through RankWorker.inject_out_of_memory, engine bugs through monkeypatch."""

from __future__ import annotations

import pickle
import time

import pytest
import torch

from pipeline import engine
from pipeline.config.engine import EngineConfig
from pipeline.config.model import ModelSpec
from pipeline.config.task import SamplingParams
from pipeline.engine import EngineError, ReplicaPool
from pipeline.engine.generation import RankContext, RankOutOfMemory, generate_batch
from pipeline.engine.models import load_model
from pipeline.engine.requests import INTERNAL, OUT_OF_MEMORY, GenerationRequest
from tests.pipeline.conftest import DCA, VOCAB

MAX_NEW = 8
# Short, so a rank stuck in a collective is found quickly; long enough for a loaded machine.
GRACE_S = 4.0


def _prompts(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def _request(rid, prompt):
    return GenerationRequest(request_id=rid, prefix_ids=prompt, suffix_ids=[[]],
                             sampling=SamplingParams(max_new_tokens=MAX_NEW))


def _config(model_dir, tp_size, **kw):
    return EngineConfig(model_spec=ModelSpec(model=model_dir, dca=DCA), tp_size=tp_size, max_input_tokens=400, **kw)


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    return load_model(ModelSpec(model=tiny_model_dir, dca=DCA), "cpu")


def _greedy(model, prompt):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2,
                         pad_token_id=0)
    ids = out[0, len(prompt):].tolist()
    return ids[: ids.index(2)] if 2 in ids else ids


@pytest.fixture(scope="module")
def tp2_pool(ray_cluster, tiny_model_dir):
    with ReplicaPool(_config(tiny_model_dir, 2, rank_grace_s=GRACE_S, max_restarts=3)) as pool:
        yield pool


@pytest.fixture(scope="module")
def tp1_pool(ray_cluster, tiny_model_dir):
    with ReplicaPool(_config(tiny_model_dir, 1)) as pool:
        yield pool


def _inject(pool, ranks, request_ids):
    import ray

    workers = pool._replicas[0].workers
    ray.get([workers[r].inject_out_of_memory.remote(request_ids) for r in ranks])


def _submit_as_one_batch(pool, *requests):
    # Holding the pool's lock (reentrant) while submitting: the serving thread sees all of them
    # at once and batches them together.
    with pool._cond:
        return [pool.submit(r) for r in requests]


# ---------------------------------------------------------------------------------------------
# One rank, in-process


def test_out_of_memory_with_several_ranks_raises_instead_of_retrying_alone(reference_model, tiny_model_dir):
    from pipeline.engine.models import load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(model=tiny_model_dir, dca=DCA))
    big, small = _prompts(40, 30, seed=1)
    requests = [_request("big", big), _request("small", small)]
    tp = RankContext(model=reference_model, device=torch.device("cpu"), rank=1, world_size=2, tokenizer=tokenizer,
                     eos_token_ids=frozenset({2}), out_of_memory_for=frozenset({"big"}))
    with pytest.raises(RankOutOfMemory) as raised:
        generate_batch(tp, requests)
    assert raised.value.request_ids == ["big", "small"] and raised.value.rank == 1
    assert "OutOfMemoryError" in raised.value.message
    copy = pickle.loads(pickle.dumps(raised.value))  # it crosses process boundaries
    assert (copy.message, copy.request_ids, copy.rank) == (raised.value.message, ["big", "small"], 1)

    # One rank keeps its local retry: the batch is split, the request that still fails is answered.
    alone = RankContext(model=reference_model, device=torch.device("cpu"), tokenizer=tokenizer,
                        eos_token_ids=frozenset({2}), out_of_memory_for=frozenset({"big"}))
    [(big_result,), (small_result,)] = generate_batch(alone, requests)
    assert big_result.error_type == OUT_OF_MEMORY and "40-token" in big_result.error_message
    assert small_result.status == "ok" and small_result.output_ids == _greedy(reference_model, small)


# ---------------------------------------------------------------------------------------------
# tp_size 2 on Ray


def test_out_of_memory_on_every_rank_splits_the_batch_and_keeps_the_replica(tp2_pool, reference_model):
    big, small = _prompts(60, 40, seed=2)
    _inject(tp2_pool, [0, 1], ["big"])
    try:
        start = time.monotonic()
        futures = _submit_as_one_batch(tp2_pool, _request("big", big), _request("small", small))
        (big_result,), (small_result,) = [f.result(timeout=120) for f in futures]
        elapsed = time.monotonic() - start
    finally:
        _inject(tp2_pool, [0, 1], [])
    # Split: each ran alone once more; the one that still ran out of memory is answered as such.
    assert small_result.status == "ok" and small_result.output_ids == _greedy(reference_model, small)
    assert small_result.attempts == 2
    assert big_result.error_type == OUT_OF_MEMORY and big_result.attempts == 2
    assert "running alone" in big_result.error_message and "injected" in big_result.error_message
    assert "rebuilt" not in big_result.error_message
    assert elapsed < GRACE_S + 60  # nobody waited for a stuck rank
    (stats,) = tp2_pool.stats().values()
    assert stats["restarts"] == 0 and stats["failures"] == 0 and stats["alive"]


def test_out_of_memory_on_one_rank_rebuilds_the_replica_then_runs_the_batch_split(tp2_pool, reference_model):
    big, small = _prompts(60, 40, seed=3)
    (before,) = tp2_pool.stats().values()
    # Rank 1 fails at once; rank 0 goes on into the forward and waits in its first all-reduce.
    _inject(tp2_pool, [1], ["big"])
    futures = _submit_as_one_batch(tp2_pool, _request("big", big), _request("small", small))
    (big_result,), (small_result,) = [f.result(timeout=180) for f in futures]
    # The rebuilt replica (without the injected fault) ran each request alone.
    for prompt, result in ((big, big_result), (small, small_result)):
        assert result.status == "ok", result.error_message
        assert result.output_ids == _greedy(reference_model, prompt) and result.attempts == 2
    (stats,) = tp2_pool.stats().values()
    assert stats["restarts"] == before["restarts"] + 1 and stats["failures"] == before["failures"] + 1
    assert stats["alive"] and "stuck in a collective" in stats["last_error"]


def test_out_of_memory_on_one_rank_for_a_request_alone_is_answered_and_serving_goes_on(tp2_pool, reference_model):
    (prompt,) = _prompts(50, seed=4)
    (before,) = tp2_pool.stats().values()
    _inject(tp2_pool, [1], ["solo"])
    (result,) = tp2_pool.submit(_request("solo", prompt)).result(timeout=180)
    assert result.error_type == OUT_OF_MEMORY and result.attempts == 1
    assert "rank 1" in result.error_message and "the replica was rebuilt" in result.error_message
    # It is answered before the replica is rebuilt; the next request runs on the rebuilt one.
    (after,) = tp2_pool.submit(_request("after", prompt)).result(timeout=120)
    assert after.status == "ok" and after.output_ids == _greedy(reference_model, prompt)
    (stats,) = tp2_pool.stats().values()
    assert stats["restarts"] == before["restarts"] + 1 and stats["alive"]


# ---------------------------------------------------------------------------------------------
# The serving loop


@pytest.fixture(scope="module")
def static_tp1_pool(ray_cluster, tiny_model_dir):
    with ReplicaPool(_config(tiny_model_dir, 1, scheduler="static")) as pool:
        yield pool


# Where each scheduler turns the ranks' answers into results (after every rank has answered).
_REDUCE = {"continuous": "reduce_step", "static": "reduce_over_ranks"}


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_an_exception_in_the_serving_loop_fails_the_batch_and_serving_goes_on(scheduler, request, monkeypatch):
    pool = request.getfixturevalue("tp1_pool" if scheduler == "continuous" else "static_tp1_pool")
    (prompt,) = _prompts(30, seed=5)
    real = getattr(engine.replica, _REDUCE[scheduler])
    calls = []

    def broken_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("injected engine bug")
        return real(*args)

    monkeypatch.setattr(engine.replica, _REDUCE[scheduler], broken_once)
    (failed,) = pool.submit(_request("victim", prompt)).result(timeout=60)
    assert failed.status == "error" and failed.error_type == INTERNAL
    assert "ValueError: injected engine bug" in failed.error_message and "victim" in failed.error_message
    (served,) = pool.submit(_request("next", prompt)).result(timeout=60)
    assert served.status == "ok"
    (stats,) = pool.stats().values()
    assert stats["alive"] and stats["restarts"] == 0  # the ranks had answered: no rebuild needed


@pytest.fixture
def stub_replicas(monkeypatch):
    """Replicas without actors: only the driver-side serving machinery runs."""

    def start(self):
        self.alive, self.vocab_size, self.load_s = True, VOCAB, 0.0

    monkeypatch.setattr(engine.replica.Replica, "start", start)


def test_a_dead_serving_thread_fails_its_requests_and_later_ones(ray_cluster, tiny_model_dir, stub_replicas):
    with ReplicaPool(_config(tiny_model_dir, 1)) as pool:
        def broken(*args):
            raise RuntimeError("injected bug outside any batch")

        pool._next_batch = broken
        (result,) = pool.submit(_request("queued", [5, 6, 7])).result(timeout=30)
        assert result.error_type == INTERNAL
        assert "serving thread died: RuntimeError: injected bug outside any batch" in result.error_message
        (late,) = pool.submit(_request("late", [5, 6, 7])).result(timeout=1)  # answered at once
        assert late.error_type == INTERNAL and "no serving thread is left" in late.error_message
        (stats,) = pool.stats().values()
        assert not stats["alive"] and "serving thread died" in stats["last_error"]


def test_run_raises_a_clear_error_when_no_serving_thread_is_alive(ray_cluster, tiny_model_dir, stub_replicas,
                                                                   monkeypatch):
    assert EngineConfig(model_spec=ModelSpec()).request_timeout_s == 3600.0  # finite by default
    # A thread that ends without answering anything: the backstop for a bug that loses requests.
    monkeypatch.setattr(ReplicaPool, "_serve", lambda self, replica: None)
    with ReplicaPool(_config(tiny_model_dir, 1)) as pool:
        start = time.monotonic()
        with pytest.raises(EngineError, match=r"1 request\(s\) are in flight but no serving thread is alive"):
            list(pool.run([_request("lost", [5, 6, 7])]))
        assert time.monotonic() - start < 10


"""The batching policy (pipeline/engine/scheduler.py): pure functions, no Ray, no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config.task import SamplingParams
from pipeline.engine.memory_plan import MemoryPlan, ModelShape, ServingConfig, parse_bytes
from pipeline.engine.requests import GenerationRequest
from pipeline.engine.scheduler import Budget, Demand, admit, budget_of, static_batch, wont_fit


def _demand(kv_tokens, rows=1):
    return Demand(rows=rows, kv_tokens=kv_tokens, longest=kv_tokens // rows)


def _budget(max_rows=8, kv_tokens=None):
    """A budget of `kv_tokens` tokens at one byte per token (None: no memory limit)."""
    if kv_tokens is None:
        return Budget(max_rows=max_rows)
    return Budget(max_rows=max_rows, kv_bytes=lambda longest: kv_tokens, kv_bytes_per_token=1.0)


def test_demand_reserves_every_row_whole():
    request = GenerationRequest(request_id="d", prefix_ids=[5] * 100, suffix_ids=[[6] * 10, [], [7] * 3],
                                sampling=SamplingParams(max_new_tokens=20))
    assert Demand.of(request) == Demand(rows=3, kv_tokens=130 + 120 + 123, longest=130)


def test_admits_in_order_while_rows_and_kv_fit():
    waiting = [(_demand(400), False), (_demand(300), False), (_demand(200), False)]
    assert admit(waiting, [], _budget(kv_tokens=1000)) == [0, 1, 2]
    assert admit(waiting, [_demand(500)], _budget(kv_tokens=1000)) == [0]
    assert admit(waiting, [], _budget(max_rows=2)) == [0, 1]  # rows cap


def test_first_come_first_served_a_large_request_is_not_overtaken():
    resident = [_demand(600)]
    waiting = [(_demand(500), False), (_demand(100), False)]
    # 100 would fit now, but it would delay the older 500 (and the next one, and the next...).
    assert admit(waiting, resident, _budget(kv_tokens=1000)) == []
    assert admit(waiting, resident, _budget(kv_tokens=1100)) == [0]
    assert admit(waiting, resident, _budget(kv_tokens=1200)) == [0, 1]


def test_an_empty_batch_takes_any_request_even_larger_than_the_limits():
    # (wont_fit requests are answered before; an oversized QA request runs when the batch is empty)
    assert admit([(_demand(5000, rows=20), False), (_demand(10), False)], [], _budget(max_rows=8, kv_tokens=1000)) == [0]


def test_solo_requests_run_with_nothing_beside_them():
    solo = (_demand(10), True)
    assert admit([solo, (_demand(10), False)], [], _budget()) == [0]
    assert admit([solo], [_demand(10)], _budget()) == []
    assert admit([(_demand(10), False), solo, (_demand(10), False)], [], _budget()) == [0]
    assert admit([(_demand(10), False)], [_demand(10)], _budget(), resident_solo=True) == []


def test_static_batch_is_the_old_policy():
    # (prompt tokens, alone): rows x longest prompt within max_batch_tokens, alone ones skipped
    assert static_batch([(100, False), (200, False), (50, False)], max_batch_tokens=8192, max_batch_size=8) == [0, 1, 2]
    assert static_batch([(5000, False), (10, False)], max_batch_tokens=8192, max_batch_size=8) == [0]  # half the budget
    assert static_batch([(100, True), (10, False)], max_batch_tokens=8192, max_batch_size=8) == [0]
    assert static_batch([(100, False), (10, True), (3000, False), (20, False)], max_batch_tokens=8192,
                        max_batch_size=8) == [0, 2]  # a third row would make 3 x 3000 > 8192
    assert static_batch([(100, False), (10, True), (5000, False), (20, False)], max_batch_tokens=8192,
                        max_batch_size=8) == [0, 3]
    assert static_batch([(10, False)] * 5, max_batch_tokens=8192, max_batch_size=2) == [0, 1]


def _plan(memory: str, **serving):
    return MemoryPlan(ModelShape.load("llama2-70b"), ServingConfig(tp_size=2, device_memory=parse_bytes(memory), **serving))


def test_budget_of_a_plan_is_what_the_estimate_leaves_for_the_kv_cache():
    plan = _plan("a100-80g", kv_dtype="int8", prefill_block="chunk")
    block = plan.block_size(100_000)
    budget = budget_of(plan, max_rows=4, prefill_tokens=block)
    kv = budget.kv_bytes(100_512)
    # A request using exactly this KV fits the device by the planner's own estimate, 1% more does not.
    per_token = plan.kv_bytes_per_token()
    assert budget.kv_bytes_per_token == per_token
    fixed = plan.estimate(100_000, 512).total - plan.kv_cache_bytes(100_512)
    assert kv + fixed == pytest.approx(plan.config.device_memory, rel=0.02)
    assert budget.fits([Demand(rows=1, kv_tokens=100_512, longest=100_512)])
    assert not budget.fits([Demand(rows=1, kv_tokens=100_512, longest=100_512)] * 2)
    assert budget_of(None, max_rows=4, prefill_tokens=None).kv_bytes is None


def test_wont_fit_gives_the_planners_numbers():
    plan = _plan("a100-80g", kv_dtype="auto", prefill_block="chunk")
    short = GenerationRequest(request_id="s", prefix_ids=[5] * 10, sampling=SamplingParams(max_new_tokens=512))
    assert wont_fit(plan, short) is None
    long = GenerationRequest(request_id="l", prefix_ids=[5] * 100_000, sampling=SamplingParams(max_new_tokens=512))
    message = wont_fit(plan, long)
    assert message.startswith("not started") and "100000 prompt tokens" in message and "int8 KV" in message
    assert wont_fit(None, long) is None


def test_scheduler_imports_nothing_heavy():
    code = ("import sys, pipeline.engine.scheduler; "
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

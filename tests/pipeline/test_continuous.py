"""Continuous batching on one rank, in process (no Ray): requests join and leave the running batch
at token granularity and still get exactly their greedy tokens alone; the metering rule; memory
budget, out of memory and wont_fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config.model import ModelSpec
from pipeline.config.task import SamplingParams
from pipeline.engine import metering
from pipeline.engine.continuous import ContinuousBatch, generate_continuous
from pipeline.engine.generation import RankContext, generate_batch
from pipeline.engine.memory_plan import MemoryPlan, ModelShape, ServingConfig
from pipeline.engine.metering import ForwardMeter
from pipeline.engine.models import load_model, load_tokenizer
from pipeline.engine.requests import OUT_OF_MEMORY, WONT_FIT, GenerationRequest
from tests.pipeline.conftest import DCA

# DCA chunk_len of the tiny model: chunk_size 48 - local_window 8.
CHUNK_LEN = 40


@pytest.fixture(scope="module")
def model_and_ctx(tiny_model_dir):
    spec = ModelSpec(model=tiny_model_dir, dca=DCA)
    model = load_model(spec, "cpu")
    ctx = RankContext(model=model, device=torch.device("cpu"), tokenizer=load_tokenizer(spec),
                      eos_token_ids=frozenset({2}), pad_token_id=0)
    return model, ctx


def _prompts(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def _reference(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=2, pad_token_id=0)
    ids = out[0, len(prompt):].tolist()
    return ids[: ids.index(2)] if 2 in ids else ids


def _request(rid, prompt, suffixes=None, **sampling):
    sampling.setdefault("max_new_tokens", 10)
    return GenerationRequest(request_id=rid, prefix_ids=prompt, suffix_ids=suffixes or [[]],
                             sampling=SamplingParams(**sampling))


def _mixed_requests():
    """Prompts from 9 tokens to ~10 DCA chunks, different output lengths, and a QA request whose
    shared prefix spans several chunks (one suffix empty)."""
    lengths = (390, 9, 130, 250, 70, 333, 41)
    news = (12, 30, 5, 20, 25, 8, 16)
    requests = [_request(f"r{i}", p, max_new_tokens=n) for i, (p, n) in enumerate(zip(_prompts(*lengths), news))]
    prefix, s1, s2 = _prompts(170, 12, 5, seed=1)
    requests.insert(3, _request("qa", prefix, [s1, [], s2], max_new_tokens=14))
    return requests


@pytest.mark.parametrize("prefill_block", ["auto", 17, "chunk"])
def test_mixed_lengths_get_exactly_their_greedy_tokens_alone(model_and_ctx, prefill_block):
    model, ctx = model_and_ctx
    requests = _mixed_requests()
    # Three rows at most: requests wait, join as rows end, prefill blocks interleave with decoding.
    results = generate_continuous(ctx, requests, max_rows=3, prefill_block=prefill_block)
    assert [r[0].request_id for r in results] == [r.request_id for r in requests]
    for request, rows in zip(requests, results):
        assert [r.suffix_index for r in rows] == list(range(len(request.suffix_ids)))
        for suffix, result in zip(request.suffix_ids, rows):
            assert result.status == "ok"
            assert result.output_ids == _reference(model, request.prefix_ids + suffix, request.sampling.max_new_tokens)
            assert result.output == ctx.tokenizer.decode(result.output_ids, skip_special_tokens=True)
            assert result.prompt_tokens == len(request.prefix_ids) + len(suffix)
            assert result.prefill_s > 0 and result.decode_s >= 0
            assert result.wall_time_s == pytest.approx(result.prefill_s + result.decode_s, rel=1e-9)
            assert result.device_time_kind == "cpu_wall" and result.gpu_time_s is None
            assert result.device_time_s > 0 and result.memory_kind == "cpu_peak_rss"
    qa = results[3]
    assert all(r.prefix_prefill_s is not None and r.prefix_prefill_s <= r.prefill_s for r in qa)


def _teacher_forced_logprob(model, prompt: list[int], output_ids: list[int]) -> float:
    """Sum of log p(output token | everything before it) from one forward over prompt + output."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output_ids])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(output_ids)[:, None]).sum().item()


@pytest.mark.parametrize("path", ["continuous", "static"])
def test_each_row_reports_the_log_probability_of_its_own_tokens(model_and_ctx, path):
    model, ctx = model_and_ctx
    if path == "continuous":  # rows joining and leaving, a QA prefix shared by three suffixes
        requests = _mixed_requests()[:5]
        results = generate_continuous(ctx, requests, max_rows=3)
    else:  # one left-padded batch
        requests = [_request(f"s{i}", p, max_new_tokens=n) for i, (p, n) in enumerate(zip(_prompts(60, 9, 130), (7, 12, 4)))]
        results = generate_batch(ctx, requests)
    for request, rows in zip(requests, results):
        for suffix, result in zip(request.suffix_ids, rows):
            assert result.output_ids
            expected = _teacher_forced_logprob(model, request.prefix_ids + suffix, result.output_ids)
            assert result.cumulative_logprob == pytest.approx(expected, abs=1e-3)
            assert result.cumulative_logprob < 0
            assert result.mean_logprob == pytest.approx(result.cumulative_logprob / len(result.output_ids))


def test_several_suffixes_without_a_shared_prefix(model_and_ctx):
    model, ctx = model_and_ctx
    s1, s2 = _prompts(30, 55, seed=9)
    (rows,) = generate_continuous(ctx, [_request("noprefix", [], [s1, s2])])
    assert [r.output_ids for r in rows] == [_reference(model, s, 10) for s in (s1, s2)]


def test_a_request_joins_a_running_decode_and_rows_leave_the_step_they_end(model_and_ctx):
    model, ctx = model_and_ctx
    long, short, late = _prompts(250, 60, 130, seed=2)
    batch = ContinuousBatch(ctx, prefill_tokens=64)
    first = batch.step(admit=[(0, _request("long", long, max_new_tokens=40, ignore_eos=True)),
                              (1, _request("short", short, max_new_tokens=3, ignore_eos=True))], time_budget_s=0.0)
    assert first.steps == 1 and not first.finished  # one step: the first 64-token block of "long"
    finished = []
    while not finished:
        finished = batch.step().finished  # returns the step a row ends
    assert [f.request_id for f in finished] == ["short"] and len(finished[0].output_ids) == 3
    assert [r.request.request_id for r in batch.rows] == ["long"]  # gone from the batch at once
    decoding = len(batch.rows[0].token.output_ids)
    assert 0 < decoding < 40
    # "late" joins while "long" is decoding: it is prefilled in blocks beside long's tokens.
    batch.step(admit=[(2, _request("late", late, max_new_tokens=10))], time_budget_s=0.0)
    rest = []
    while batch.rows:
        rest += batch.step().finished
    by_id = {f.request_id: f for f in [*finished, *rest]}
    for rid, prompt, new in (("long", long, 40), ("short", short, 3)):  # ignore_eos: the engine alone
        (alone,) = generate_batch(ctx, [_request(rid, prompt, max_new_tokens=new, ignore_eos=True)])[0]
        assert by_id[rid].output_ids == alone.output_ids and len(alone.output_ids) == new
    assert by_id["late"].output_ids == _reference(model, late, 10)


def test_seeded_sampling_gives_the_tokens_it_gives_alone(model_and_ctx):
    _, ctx = model_and_ctx
    requests = [_request(f"s{i}", p, do_sample=True, seed=7 + i, top_p=0.9, max_new_tokens=12)
                for i, p in enumerate(_prompts(60, 150, 20, seed=3))]
    alone = [generate_batch(ctx, [r])[0][0].output_ids for r in requests]
    together = [r[0].output_ids for r in generate_continuous(ctx, requests, max_rows=3)]
    assert together == alone


def test_int8_kv_runs_through_the_running_batch(model_and_ctx):
    _, ctx = model_and_ctx
    variant = dataclasses.replace(ctx, kv_cache_dtype="int8")
    results = generate_continuous(variant, _mixed_requests()[:4], max_rows=3)
    assert all(r.status == "ok" and r.output_tokens > 0 for rows in results for r in rows)


# ---------------------------------------------------------------------------------------------
# The metering rule


def test_forward_time_is_split_by_tokens_and_sums_to_busy_time():
    meter = ForwardMeter(torch.device("cpu"))
    x = torch.randn(256, 256)
    for shares in ({"a": 3, "b": 1}, {"a": 1, "b": 1, "c": 2}, {"c": 5}):
        with meter.forward(shares):
            for _ in range(20):
                x = torch.tanh(x @ x)
    report = meter.collect()
    assert report.forwards == 3 and report.tokens == 4 + 4 + 5
    assert sum(report.seconds.values()) == pytest.approx(report.busy_s, rel=1e-12)
    assert report.time_kind == "cpu_wall" and report.memory_kind == "cpu_peak_rss"
    assert meter.collect().busy_s == 0  # collected once


def test_a_forward_that_fails_counts_neither_in_busy_time_nor_in_attributions():
    meter = ForwardMeter(torch.device("cpu"))
    with pytest.raises(RuntimeError):
        with meter.forward({"a": 1}):
            raise RuntimeError("out of memory")
    assert meter.collect().forwards == 0


def test_continuous_attributions_sum_to_busy_time_and_the_prefix_is_its_rows(model_and_ctx):
    _, ctx = model_and_ctx
    batch = ContinuousBatch(ctx, prefill_tokens=64)
    requests = _mixed_requests()
    busy, attributed = 0.0, {}
    seqs = {i: r for i, r in enumerate(requests)}
    report = batch.step(admit=list(seqs.items())).report
    while True:
        busy += report.busy_s
        for key, seconds in report.seconds.items():
            attributed[key] = attributed.get(key, 0.0) + seconds
        if not batch.rows:
            break
        report = batch.step().report
    assert sum(attributed.values()) == pytest.approx(busy, rel=1e-9)
    # Every row of every request got some time: the QA rows share their prefix's forwards.
    assert set(attributed) == {(seq, i) for seq, r in seqs.items() for i in range(len(r.suffix_ids))}


@pytest.mark.parametrize("path", ["continuous", "static"])
def test_peak_memory_of_a_qa_row_covers_its_shared_prefix(model_and_ctx, monkeypatch, path):
    _, ctx = model_and_ctx
    prefix, s1, s2 = _prompts(170, 12, 5, seed=4)
    # The first forward the meter sees (the prefix's, or its first block) reads a huge peak.
    readings = iter([1 << 40])
    monkeypatch.setattr(metering, "_read_vm_hwm", lambda: next(readings, 1 << 20))
    request = _request("qa", prefix, [s1, [], s2])
    if path == "continuous":
        (rows,) = generate_continuous(ctx, [request], prefill_block=64)
    else:
        (rows,) = generate_batch(ctx, [request])
    assert [r.peak_memory_bytes for r in rows] == [1 << 40] * 3
    assert all(r.device_time_s > 0 for r in rows)


def test_static_batch_splits_each_forward_between_its_rows(model_and_ctx):
    _, ctx = model_and_ctx
    prompts = _prompts(110, 20, seed=5)
    results = [r[0] for r in generate_batch(ctx, [_request(str(i), p, max_new_tokens=6) for i, p in enumerate(prompts)])]
    # The 110-token row carries more of the shared prefill than the 20-token one.
    assert results[0].device_time_s > results[1].device_time_s > 0
    assert all(r.device_seconds_all_ranks == r.device_time_s for r in results)  # one rank


# ---------------------------------------------------------------------------------------------
# Memory: the planner's KV budget, wont_fit, out of memory


def _plan_for(model, kv_tokens: int, max_rows: int, prefill_tokens: int, context: int):
    """A CPU plan whose device holds about `kv_tokens` KV tokens beside everything else."""
    shape = ModelShape.from_config(model.config)
    probe = MemoryPlan(shape, ServingConfig(tp_size=1, weight_dtype="float32", device="cpu", prefill_block=prefill_tokens,
                                            device_memory=1 << 40))
    left = probe.kv_budget(prefill_tokens + max_rows, context, max_rows)
    memory = (1 << 40) - left + int(kv_tokens * probe.kv_bytes_per_token())
    return MemoryPlan(shape, ServingConfig(tp_size=1, weight_dtype="float32", device="cpu", prefill_block=prefill_tokens,
                                           device_memory=memory))


def test_admission_follows_the_kv_budget_not_a_token_cap(model_and_ctx, monkeypatch):
    model, ctx = model_and_ctx
    requests = [_request(f"k{i}", p, max_new_tokens=10) for i, p in enumerate(_prompts(300, 290, 280, 270, seed=6))]
    # Room for two of these requests' KV (prompt + max_new_tokens each), not three.
    plan = _plan_for(model, kv_tokens=2 * 310 + 50, max_rows=8, prefill_tokens=64, context=310)
    resident = []
    real_step = ContinuousBatch.step

    def step(self, admit=(), drop=(), time_budget_s=None):
        out = real_step(self, admit, drop, time_budget_s)
        resident.append(len({r.seq for r in self.rows}) + len({f.seq for f in out.finished}))
        return out

    monkeypatch.setattr(ContinuousBatch, "step", step)
    results = generate_continuous(ctx, requests, max_rows=8, prefill_block=64, plan=plan)
    assert max(resident) == 2
    for request, (result,) in zip(requests, results):
        assert result.output_ids == _reference(model, request.prefix_ids, 10)


def test_a_request_that_cannot_fit_alone_gets_wont_fit_before_any_compute(model_and_ctx):
    model, ctx = model_and_ctx
    plan = _plan_for(model, kv_tokens=400, max_rows=8, prefill_tokens=64, context=400)
    short, long = _prompts(64, 2000, seed=7)
    results = generate_continuous(ctx, [_request("short", short), _request("long", long)], prefill_block=64, plan=plan)
    assert results[0][0].status == "ok" and results[0][0].output_ids == _reference(model, short, 10)
    error = results[1][0]
    assert error.status == "error" and error.error_type == WONT_FIT and error.device_time_s is None
    assert error.error_message.startswith("not started") and "2000 prompt tokens" in error.error_message


def test_out_of_memory_runs_the_batch_again_one_by_one_and_answers_the_one_that_still_fails(model_and_ctx):
    model, ctx = model_and_ctx
    big, small, other = _prompts(60, 40, 90, seed=8)
    faulty = dataclasses.replace(ctx, out_of_memory_for=frozenset({"big"}))
    results = generate_continuous(faulty, [_request("big", big), _request("small", small), _request("other", other)],
                                  max_rows=8)
    (big_result,), (small_result,), (other_result,) = results
    assert big_result.error_type == OUT_OF_MEMORY and "running alone" in big_result.error_message
    assert small_result.output_ids == _reference(model, small, 10)
    assert other_result.output_ids == _reference(model, other, 10)

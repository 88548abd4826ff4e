"""The generation loop on one rank, in-process (no Ray): batching, shared prefixes, sampling,
stop strings, out-of-memory handling, last-position-only prefill logits."""

from __future__ import annotations

import pytest
import torch

from pipeline.config.model import ModelSpec
from pipeline.config.task import SamplingParams
from pipeline.engine.generation import RankContext, generate_batch
from pipeline.engine.metering import CPU_MEMORY_KIND
from pipeline.engine.models import load_model, load_tokenizer
from pipeline.engine.requests import OUT_OF_MEMORY, GenerationRequest
from tests.pipeline.conftest import DCA


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


def test_left_padded_batch_matches_each_prompt_alone(model_and_ctx):
    model, ctx = model_and_ctx
    prompts = _prompts(110, 70, 130, 9)  # longer than chunk_size=48: DCA's inter-chunk path runs
    results = generate_batch(ctx, [_request(str(i), p) for i, p in enumerate(prompts)])
    assert [r[0].request_id for r in results] == ["0", "1", "2", "3"]
    for prompt, (result,) in zip(prompts, results):
        assert result.status == "ok"
        assert result.output_ids == _reference(model, prompt, 10)
        assert result.output == ctx.tokenizer.decode(result.output_ids, skip_special_tokens=True)
        assert result.prompt_tokens == len(prompt)
        assert result.memory_kind == CPU_MEMORY_KIND and result.gpu_time_s is None
        assert result.prefill_s > 0 and result.decode_s >= 0 and result.wall_time_s >= result.prefill_s


def test_shared_prefix_matches_concatenated_prompts(model_and_ctx):
    model, ctx = model_and_ctx
    prefix, s1, s2 = _prompts(100, 12, 5, seed=1)
    (results,) = generate_batch(ctx, [_request("doc", prefix, [s1, [], s2])])
    assert [r.suffix_index for r in results] == [0, 1, 2]
    for result, suffix in zip(results, (s1, [], s2)):
        assert result.output_ids == _reference(model, prefix + suffix, 10)
        assert result.prompt_tokens == len(prefix) + len(suffix)
        assert result.prefix_prefill_s > 0 and result.prefill_s > 0


def test_sampling_is_reproducible_with_a_seed_and_stop_strings_cut(model_and_ctx):
    _, ctx = model_and_ctx
    (prompt,) = _prompts(60, seed=2)
    sampled = [generate_batch(ctx, [_request("s", prompt, do_sample=True, seed=7, top_p=0.9, max_new_tokens=12)])[0][0]
               for _ in range(2)]
    assert sampled[0].output_ids == sampled[1].output_ids and len(sampled[0].output_ids) == 12
    words = sampled[0].output.split()
    stop = words[3]
    first = words.index(stop)
    (cut,) = generate_batch(ctx, [_request("s", prompt, do_sample=True, seed=7, top_p=0.9, max_new_tokens=12,
                                            stop=(stop,))])[0]
    assert cut.output == " ".join(words[:first]) + (" " if first else "")
    assert cut.output_ids == sampled[0].output_ids[: first + 1]


class _OOMOnce(torch.nn.Module):
    """Raises out-of-memory on its first forward, then behaves like the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, []

    def forward(self, cache=None, **kwargs):
        self.calls.append(kwargs["input_ids"].shape)
        kwargs["cache"] = cache
        if len(self.calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
        return self.inner(**kwargs)


def test_out_of_memory_retries_alone_then_gives_a_typed_error(model_and_ctx):
    model, ctx = model_and_ctx
    p1, p2 = _prompts(30, 20, seed=3)
    wrapped = _OOMOnce(model)
    octx = RankContext(model=wrapped, device=ctx.device, tokenizer=ctx.tokenizer, eos_token_ids=ctx.eos_token_ids)
    results = generate_batch(octx, [_request("a", p1), _request("b", p2)])
    assert [r[0].status for r in results] == ["ok", "ok"]  # the batch was split and rerun
    assert results[0][0].output_ids == _reference(model, p1, 10)

    wrapped.calls.clear()
    (error,) = generate_batch(octx, [_request("c", p1)])[0]
    assert error.status == "error" and error.error_type == OUT_OF_MEMORY and "30-token" in error.error_message
    (again,) = generate_batch(octx, [_request("c", p1)])[0]  # still usable
    assert again.status == "ok"


def test_prefill_asks_for_last_position_logits_only(model_and_ctx):
    model, ctx = model_and_ctx
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        generate_batch(ctx, [_request("x", _prompts(120, seed=4)[0], max_new_tokens=2)])
    finally:
        handle.remove()
    assert seen[0] == (1, 1, 128)  # never (1, 120, vocab)


@pytest.mark.parametrize("kv_cache_dtype, prefill_block", [("auto", "chunk"), ("auto", 17), ("int8", None)])
def test_chunked_prefill_and_int8_cache_in_the_generation_loop(model_and_ctx, kv_cache_dtype, prefill_block):
    import dataclasses

    model, ctx = model_and_ctx
    variant = dataclasses.replace(ctx, kv_cache_dtype=kv_cache_dtype, prefill_block=prefill_block)
    prompts = _prompts(110, 70, seed=3)
    batch = generate_batch(variant, [_request(str(i), p) for i, p in enumerate(prompts)])
    prefix, s1, s2 = _prompts(100, 12, 5, seed=4)
    (shared,) = generate_batch(variant, [_request("doc", prefix, [s1, s2])])
    if kv_cache_dtype == "auto":  # chunked prefill is exact: same greedy tokens as one shot
        for prompt, (result,) in zip(prompts, batch):
            assert result.output_ids == _reference(model, prompt, 10)
        for suffix, result in zip([s1, s2], shared):
            assert result.output_ids == _reference(model, prefix + suffix, 10)
    else:  # int8 KV is lossy: it must run and give results of the right shape
        assert all(r[0].status == "ok" and r[0].output_tokens > 0 for r in batch)
        assert all(r.status == "ok" for r in shared)


def test_memory_plan_refuses_a_request_that_cannot_fit_before_running_it(model_and_ctx):
    import dataclasses

    from pipeline.engine.memory_plan import MemoryPlan, ModelShape, ServingConfig
    from pipeline.engine.requests import WONT_FIT

    model, ctx = model_and_ctx
    shape = ModelShape.from_config(model.config)
    probe = MemoryPlan(shape, ServingConfig(tp_size=1, weight_dtype="float32", device="cpu", device_memory=1 << 40))
    # a device that holds a 64-token request with 10 new tokens but not a 2000-token one
    memory = probe.estimate(64, 10, 1).total + (probe.estimate(2000, 10, 1).total - probe.estimate(64, 10, 1).total) // 2
    plan = MemoryPlan(shape, ServingConfig(tp_size=1, weight_dtype="float32", device="cpu", device_memory=memory))
    variant = dataclasses.replace(ctx, memory_plan=plan)
    short, long = _prompts(64, 2000, seed=5)
    results = generate_batch(variant, [_request("short", short), _request("long", long)])
    assert results[0][0].status == "ok"
    assert results[0][0].output_ids == _reference(model, short, 10)
    assert results[1][0].status == "error" and results[1][0].error_type == WONT_FIT
    message = results[1][0].error_message
    assert message.startswith("not started") and "2000 prompt tokens" in message and "needs" in message


def test_repetition_guard_penalises_and_bans_only_generated_tokens():
    from pipeline.engine.tokens import repetition_guard

    logits = torch.tensor([1.0, -1.0, 2.0, 0.5, 4.0, 3.0, -2.0, 1.5])
    off = SamplingParams()
    assert repetition_guard(logits, [4, 5], off) is logits  # off: the same tensor, untouched
    assert repetition_guard(logits, [], SamplingParams(repetition_penalty=2.0)) is logits
    penalised = repetition_guard(logits, [1, 4, 4], SamplingParams(repetition_penalty=2.0))
    assert penalised[4] == 2.0 and penalised[1] == -2.0  # divided when positive, multiplied when negative
    assert torch.equal(penalised[[0, 2, 3, 5, 6, 7]], logits[[0, 2, 3, 5, 6, 7]])
    # Generated 5 6 7 5: a 6 now would repeat the 2-gram (5, 6), so it is banned; nothing else is.
    banned = repetition_guard(logits, [5, 6, 7, 5], SamplingParams(no_repeat_ngram_size=2))
    assert banned[6] == float("-inf") and torch.isfinite(banned[[0, 1, 2, 3, 4, 5, 7]]).all()
    once = repetition_guard(logits, [3, 2], SamplingParams(no_repeat_ngram_size=1))
    assert torch.isinf(once[[2, 3]]).all() and torch.isfinite(once[[0, 1, 4, 5, 6, 7]]).all()


def test_no_repeat_ngram_size_in_the_generation_loop(model_and_ctx):
    model, ctx = model_and_ctx
    prompt = _prompts(60, seed=7)[0]

    def bigrams(ids):
        return [tuple(ids[i:i + 2]) for i in range(len(ids) - 1)]

    (plain,), = generate_batch(ctx, [_request("p", prompt, max_new_tokens=40, ignore_eos=True)])
    assert len(set(bigrams(plain.output_ids))) < len(bigrams(plain.output_ids))  # the tiny model loops
    guarded = generate_batch(ctx, [
        _request("g", prompt, max_new_tokens=40, ignore_eos=True, no_repeat_ngram_size=2),
        _request("s", prompt, max_new_tokens=40, ignore_eos=True, no_repeat_ngram_size=2, do_sample=True, seed=3),
    ])
    for (result,) in guarded:
        assert result.status == "ok" and result.output_tokens == 40
        assert len(set(bigrams(result.output_ids))) == len(bigrams(result.output_ids))
    # The prompt is not penalised: a guard-free first step is the plain model's first token.
    assert guarded[0][0].output_ids[0] == plain.output_ids[0]

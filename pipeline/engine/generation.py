"""Generation on one rank: prefill + decode with a KV cache, static batches, token choice.

Runs inside the process that holds a model (or one tensor-parallel shard of it); knows nothing of
Ray. Two paths:

- `generate_batch`: the static scheduler's batch (left-padded rows that run until the last one
  ends, or one request with several suffixes sharing its prefix). `pipeline.engine` rank actors
  call it when `EngineConfig.scheduler` is "static"; tests call it in process.
- `pipeline.engine.continuous`: the continuous scheduler's running batch (the default); it uses
  the same token choice and stop logic (`pipeline.engine.tokens`).

Under tensor parallelism every rank runs the same forward passes (AutoTP's all-reduces keep the
logits identical), but only rank 0 chooses tokens and decides when a row stops: `sync` broadcasts
its choice to the other ranks at every step, so the ranks can never diverge (sampling, stop
strings and the tokenizer live on rank 0 only).

Prefill asks the model for the logits of the last position only (`logits_to_keep=1`): nothing
(prompt x vocab) is ever allocated.

Out of memory: with one rank, a batch that runs out of memory is freed and retried one request at
a time, and a request that still does not fit gets an `out_of_memory` result. With several ranks
a rank never retries on its own (its peers may be blocked inside a collective of the same
forward, waiting for it): it frees what it can and raises `RankOutOfMemory`, and the engine, which
sees every rank, decides (see `pipeline.engine`).

Metrics follow the engine's one rule (`pipeline.engine.metering`): every forward is timed (CUDA
events, or CPU wall clock) and split between the rows in it by the real tokens each contributed;
a shared prefix is split between the rows of its request. Per-row peak memory is the largest
peak of the forwards the row was in; prefill_s and decode_s are the row's own (request start to
its first token, first token to its last).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeline.engine.kv_cache import cache_argument
from pipeline.engine.metering import CUDA_TIME_KIND, ForwardMeter
from pipeline.engine.out_of_memory import describe_out_of_memory, free_memory, is_out_of_memory, out_of_memory_results
from pipeline.engine.requests import WONT_FIT, GenerationRequest, GenerationResult
from pipeline.engine.tokens import TokenState, advance_tokens, choose_tokens, token_states

__all__ = ["RankContext", "RankOutOfMemory", "generate_batch"]


@dataclass
class RankContext:
    """What a rank needs to generate: its model, where it runs, and how to agree with rank 0."""

    model: torch.nn.Module
    device: torch.device
    rank: int = 0
    # Broadcasts rank 0's tensor to every rank and returns it (identity with one rank).
    sync: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # Rank 0 only: decodes output text and checks stop strings. None: no text (output=None).
    tokenizer: object | None = None
    eos_token_ids: frozenset[int] = frozenset()
    pad_token_id: int = 0
    # "auto" (model dtype) or "int8" (dca.kv_quant.Int8KVCache).
    kv_cache_dtype: str = "auto"
    # Prompt tokens per prefill forward: None one shot, "chunk" one DCA chunk, or a number.
    prefill_block: int | str | None = None
    # pipeline.engine.memory_plan.MemoryPlan every request is checked against, or None.
    memory_plan: object | None = None
    # Ranks in the tensor-parallel group: above 1, out of memory raises RankOutOfMemory instead
    # of being retried on this rank alone.
    world_size: int = 1
    # Test hook (fault injection), empty in production: a batch holding one of these request ids
    # raises torch.OutOfMemoryError on this rank before its first forward (set through
    # pipeline.engine.RankWorker.inject_out_of_memory).
    out_of_memory_for: frozenset[str] = frozenset()


class RankOutOfMemory(Exception):
    """This rank of a tensor-parallel group ran out of memory on a batch (memory freed, no retry).

    Picklable; `request_ids` are the batch's requests, `message` the allocator's words."""

    def __init__(self, message: str, request_ids: list[str], rank: int):
        super().__init__(message, request_ids, rank)
        self.message, self.request_ids, self.rank = message, list(request_ids), rank

    def __str__(self) -> str:
        return f"rank {self.rank} ran out of memory on requests {self.request_ids}: {self.message}"


# ---------------------------------------------------------------------------------------------
# The loop


def _forward(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=True, logits_to_keep=1, **{cache_argument(type(model)): cache},
    )
    return out.logits[:, -1, :]  # (B, V)


def _decode(ctx: RankContext, rows: list[TokenState], cache, logits, mask, timing: _Timing, keys: list) -> None:
    """Chooses, syncs and feeds tokens until every row is done. mask: (B, K) covering the cache;
    keys: each row's key for the meter."""
    device = ctx.device
    step = 0
    while True:
        if ctx.rank == 0:
            chosen = choose_tokens(ctx, rows, logits)
            done = torch.tensor(advance_tokens(ctx, rows, chosen.tolist()), device=device, dtype=torch.long)
            message = torch.stack([chosen.to(device), done])  # (2, B)
        else:
            message = torch.empty((2, len(rows)), dtype=torch.long, device=device)
        message = ctx.sync(message)
        chosen, done = message[0], message[1].bool()
        now = time.perf_counter()
        for i, row in enumerate(rows):  # other ranks keep no output: rank 0's result is the answer
            if step == 0:
                timing.first_token[i] = now
            if bool(done[i]) and i not in timing.end:
                row.done = True
                timing.end[i] = now
        if bool(done.all()):
            return
        step += 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, K+1)
        positions = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)  # (B, 1)
        with timing.meter.forward({keys[i]: 1 for i, row in enumerate(rows) if not row.done}):
            logits = _forward(ctx.model, chosen[:, None], mask, positions, cache)


@dataclass
class _Timing:
    """Wall-clock marks of one request or batch on this rank, and its forward meter."""

    meter: ForwardMeter
    start: float = field(default_factory=time.perf_counter)
    first_token: dict = field(default_factory=dict)  # row index -> time
    end: dict = field(default_factory=dict)


def _new_cache(ctx: RankContext):
    if ctx.kv_cache_dtype == "int8":
        from dca.kv_quant import Int8KVCache

        return Int8KVCache()
    from transformers import DynamicCache

    return DynamicCache(config=ctx.model.config)


def _prefill(ctx: RankContext, ids, mask, positions, cache, prompt_length) -> torch.Tensor:
    """Last-position logits (B, V) of the prompt, one shot or block by block (ctx.prefill_block)."""
    if ctx.prefill_block is None:
        return _forward(ctx.model, ids, mask, positions, cache)
    from dca.prefill import chunked_prefill

    block = None if ctx.prefill_block == "chunk" else ctx.prefill_block
    return chunked_prefill(ctx.model, ids, cache, block_size=block, attention_mask=mask, prompt_length=prompt_length)


def _run_rows_batch(ctx: RankContext, requests: list[GenerationRequest]) -> tuple[list[TokenState], dict]:
    """Single-suffix requests in one left-padded batch."""
    from dca import set_prompt_length

    rows = [r for req in requests for r in token_states(ctx, req, [0])]
    prompts = [req.prefix_ids + req.suffix_ids[0] for req in requests]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), ctx.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):  # left padding: every row ends at the last column
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    timing = _Timing(ForwardMeter(ctx.device))
    cache = _new_cache(ctx)
    lengths = torch.tensor([len(p) for p in prompts], device=ctx.device)
    set_prompt_length(cache, lengths)
    keys = list(range(len(rows)))
    with timing.meter.forward({i: len(p) for i, p in enumerate(prompts)}):  # pads are nobody's tokens
        logits = _prefill(ctx, ids, mask, positions, cache, lengths)
    _decode(ctx, rows, cache, logits, mask, timing, keys)
    return rows, {"timing": [timing] * len(rows), "report": timing.meter.collect(), "prefix_prefill_s": None}


def _run_shared_prefix(ctx: RankContext, request: GenerationRequest) -> tuple[list[TokenState], dict]:
    """One request with several suffixes: the prefix is prefilled once, its cache copied per suffix."""
    from dca import set_prompt_length

    device = ctx.device
    prefix = torch.tensor([request.prefix_ids], dtype=torch.long, device=device)
    # The attention temperature's n is the request's longest prompt, for the prefix and every
    # suffix alike (the prefix's cached states depend on it). No effect when alpha is 0.
    n = request.prompt_tokens
    k = len(request.suffix_ids)
    meter = ForwardMeter(device)
    start = time.perf_counter()
    prefix_cache = _new_cache(ctx)
    set_prompt_length(prefix_cache, n)
    prefix_mask = torch.ones_like(prefix)
    with meter.forward({i: prefix.shape[1] / k for i in range(k)}):  # the prefix is all its rows'
        prefix_logits = _prefill(ctx, prefix, prefix_mask, None, prefix_cache, n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prefix_s = time.perf_counter() - start

    rows, timings = [], []
    last = len(request.suffix_ids) - 1
    for index, suffix_ids in enumerate(request.suffix_ids):
        row = token_states(ctx, request, [index])
        timing = _Timing(meter, start=start)
        cache = prefix_cache if index == last else copy.deepcopy(prefix_cache)
        set_prompt_length(cache, n)
        mask = prefix_mask
        logits = prefix_logits
        if suffix_ids:
            suffix = torch.tensor([suffix_ids], dtype=torch.long, device=device)
            mask = torch.ones((1, prefix.shape[1] + suffix.shape[1]), dtype=torch.long, device=device)
            begin = prefix.shape[1]
            positions = torch.arange(begin, begin + suffix.shape[1], device=device)[None]
            with meter.forward({index: suffix.shape[1]}):
                logits = _forward(ctx.model, suffix, mask, positions, cache)
        _decode(ctx, row, cache, logits, mask, timing, [index])
        timing.first_token = {index: timing.first_token[0]}
        timing.end = {index: timing.end[0]}
        del cache
        rows += row
        timings.append(timing)
    return rows, {"timing": timings, "report": meter.collect(), "prefix_prefill_s": prefix_s}


def _results(ctx: RankContext, rows: list[TokenState], info: dict) -> list[GenerationResult]:
    """Rows -> results with this rank's metrics (device time attributed by the meter)."""
    report = info["report"]
    results = []
    for i, row in enumerate(rows):
        timing = info["timing"][i]
        first = timing.first_token.get(i, timing.start)
        end = timing.end.get(i, first)
        output = None
        if ctx.tokenizer is not None:
            output = row.text if row.text is not None else ctx.tokenizer.decode(row.output_ids, skip_special_tokens=True)
        seconds = report.seconds.get(i, 0.0)
        peak = report.peaks.get(i)
        results.append(GenerationResult(
            request_id=row.request.request_id, suffix_index=row.suffix_index, output=output,
            output_ids=list(row.output_ids), cumulative_logprob=row.cumulative_logprob,
            prompt_tokens=row.prompt_tokens, output_tokens=len(row.output_ids),
            prefill_s=first - timing.start, decode_s=end - first, wall_time_s=end - timing.start,
            gpu_time_s=seconds if report.time_kind == CUDA_TIME_KIND else None,
            device_time_s=seconds, device_time_kind=report.time_kind, device_seconds_all_ranks=seconds,
            peak_memory_bytes=peak, memory_kind=report.memory_kind,
            peak_memory_per_rank=[peak] if peak is not None else [],
            prefix_prefill_s=info["prefix_prefill_s"],
        ))
    return results


def _check_memory_plan(ctx: RankContext, requests: list[GenerationRequest]):
    """None when the planner says the batch fits; else per-request results (wont_fit errors and,
    for a batch that only fails together, each request run alone). Same answer on every rank."""
    from pipeline.engine.memory_plan import WontFit

    # A shared prefix's cache is copied per suffix: one KV cache per suffix at the last one.
    batch = len(requests) if len(requests) > 1 else len(requests[0].suffix_ids)
    longest = max(r.prompt_tokens for r in requests)
    new_tokens = max(r.sampling.max_new_tokens for r in requests)
    try:
        ctx.memory_plan.check(longest, new_tokens, batch)
        return None
    except WontFit as error:
        if len(requests) > 1:
            return [generate_batch(ctx, [r])[0] for r in requests]
        return [GenerationResult.errors_for(requests[0], WONT_FIT, f"not started: {error}")]


def generate_batch(ctx: RankContext, requests: list[GenerationRequest]) -> list[list[GenerationResult]]:
    """Runs a batch; -> one list of results (one per suffix) per request, in the given order.

    Several requests must each have exactly one suffix (they share one left-padded batch); a
    request with several suffixes must come alone. Inputs are assumed validated by the caller.
    Out of memory: what the batch held is freed. With one rank (ctx.world_size 1), a batch of
    several requests is retried one request at a time, and a request that still does not fit gets
    an `out_of_memory` result. With several ranks it raises `RankOutOfMemory` instead: retrying
    here alone could leave the other ranks waiting in a collective forever; the caller, which
    sees every rank, decides.
    """
    if len(requests) > 1 and any(len(r.suffix_ids) != 1 for r in requests):
        raise ValueError("a request with several suffixes must run alone")
    if ctx.memory_plan is not None:
        refused = _check_memory_plan(ctx, requests)
        if refused is not None:
            return refused
    message = None
    try:
        with torch.inference_mode():
            injected = [r.request_id for r in requests if r.request_id in ctx.out_of_memory_for]
            if injected:
                raise torch.OutOfMemoryError(f"injected out of memory (test hook) for {injected} on rank "
                                             f"{ctx.rank}")
            if len(requests) == 1 and len(requests[0].suffix_ids) > 1:
                rows, info = _run_shared_prefix(ctx, requests[0])
            else:
                rows, info = _run_rows_batch(ctx, requests)
            results = _results(ctx, rows, info)
    except Exception as error:  # noqa: BLE001 - only OOM is handled, the rest re-raised
        if not is_out_of_memory(error):
            raise
        message = describe_out_of_memory(error)
        del error
    if message is not None:  # outside the except: its traceback (and the tensors it holds) is gone
        free_memory(ctx.device)
        if ctx.world_size > 1:
            raise RankOutOfMemory(message, [r.request_id for r in requests], ctx.rank)
        if len(requests) > 1:
            return [generate_batch(ctx, [r])[0] for r in requests]
        return [out_of_memory_results(requests[0], str(ctx.device), f" ({message})")]
    if len(requests) == 1:
        return [results]
    return [[result] for result in results]  # one row per request, in request order

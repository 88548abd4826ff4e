"""Generation on one rank: prefill + decode with a KV cache, batched rows, per-request metrics.

Runs inside the process that holds a model (or one tensor-parallel shard of it); knows nothing of
Ray. `generate_batch` is what a rank actor of `pipeline.engine` calls for every batch; tests call
it in-process too.

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

Metrics per rank: on CUDA, GPU time from CUDA events and the allocator's peak (reset per batch);
on CPU, wall clock and the process's peak RSS (VmHWM, reset per batch through
/proc/self/clear_refs), labelled `cpu_peak_rss` and never reported as GPU figures.
"""

from __future__ import annotations

import copy
import functools
import gc
import inspect
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeline.requests import OUT_OF_MEMORY, WONT_FIT, GenerationRequest, GenerationResult

CUDA_MEMORY_KIND = "cuda_max_allocated"
CPU_MEMORY_KIND = "cpu_peak_rss"


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
    # pipeline.memory_plan.MemoryPlan every request is checked against, or None.
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
# Memory and time measurement


def _read_vm_hwm() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _reset_vm_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets the peak resident set size (Linux >= 4.0)
    except OSError:
        pass  # then the peak covers the process's life so far; still an upper bound


class _Meter:
    """One batch on one rank: start, prefill end, per-row finish; peak memory since start."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()
            self._row_events: dict[int, torch.cuda.Event] = {}
        else:
            _reset_vm_hwm()
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.row_end: dict[int, float] = {}

    def mark_first_token(self) -> None:
        self.first_token = time.perf_counter()

    def mark_row_done(self, row: int) -> None:
        self.row_end[row] = time.perf_counter()
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._row_events[row] = event

    def finish(self) -> dict:
        """-> per-row metrics plus the peak memory of this rank over the whole batch."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = int(torch.cuda.max_memory_allocated(self.device))
            gpu = {r: self._start_event.elapsed_time(e) / 1e3 for r, e in self._row_events.items()}
        else:
            peak = _read_vm_hwm()
            gpu = {}
        first = self.first_token if self.first_token is not None else time.perf_counter()
        rows = {}
        for row, end in self.row_end.items():
            rows[row] = {
                "prefill_s": first - self.start,
                "decode_s": max(0.0, end - first),
                "wall_time_s": end - self.start,
                "gpu_time_s": gpu.get(row),
            }
        return {
            "rows": rows,
            "peak_memory_bytes": peak,
            "memory_kind": CUDA_MEMORY_KIND if self.cuda else CPU_MEMORY_KIND,
        }


# ---------------------------------------------------------------------------------------------
# Token choice (rank 0)


@dataclass
class _Row:
    request: GenerationRequest
    suffix_index: int
    prompt_tokens: int
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str | None = None
    done: bool = False


def _choose(ctx: RankContext, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) next tokens (rank 0's decision)."""
    next_ids = torch.full((len(rows),), ctx.pad_token_id, dtype=torch.long, device=logits.device)
    greedy = logits.argmax(-1)
    for i, row in enumerate(rows):
        params = row.request.sampling
        if row.done:
            continue
        if not params.do_sample or params.temperature <= 0:
            next_ids[i] = greedy[i]
            continue
        scores = logits[i].float() / params.temperature
        probs = torch.softmax(scores, -1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # always keeps the top token
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        next_ids[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
    return next_ids


def _advance(ctx: RankContext, rows: list[_Row], next_ids: list[int]) -> list[bool]:
    """Appends the chosen tokens and decides which rows stop (rank 0). -> done flags."""
    for row, token in zip(rows, next_ids):
        if row.done:
            continue
        params = row.request.sampling
        if token in ctx.eos_token_ids and not params.ignore_eos:
            row.done = True
            continue
        row.output_ids.append(token)
        if params.stop and ctx.tokenizer is not None:
            text = ctx.tokenizer.decode(row.output_ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in params.stop if s and s in text), default=-1)
            if cut >= 0:
                row.text = text[:cut]
                row.done = True
                continue
        if len(row.output_ids) >= params.max_new_tokens:
            row.done = True
    return [row.done for row in rows]


# ---------------------------------------------------------------------------------------------
# The loop


@functools.cache
def _cache_argument(model_class: type) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; use what this version takes."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _forward(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=True, logits_to_keep=1, **{_cache_argument(type(model)): cache},
    )
    return out.logits[:, -1, :]  # (B, V)


def _decode(ctx: RankContext, rows: list[_Row], cache, logits, mask, meter: _Meter) -> None:
    """Chooses, syncs and feeds tokens until every row is done. mask: (B, K) covering the cache."""
    device = ctx.device
    step = 0
    while True:
        if ctx.rank == 0:
            chosen = _choose(ctx, rows, logits)
            done = torch.tensor(_advance(ctx, rows, chosen.tolist()), device=device, dtype=torch.long)
            message = torch.stack([chosen.to(device), done])  # (2, B)
        else:
            message = torch.empty((2, len(rows)), dtype=torch.long, device=device)
        message = ctx.sync(message)
        chosen, done = message[0], message[1].bool()
        if step == 0:
            meter.mark_first_token()
        for i, row in enumerate(rows):  # other ranks keep no output: rank 0's result is the answer
            if bool(done[i]) and i not in meter.row_end:
                row.done = True
                meter.mark_row_done(i)
        if bool(done.all()):
            return
        step += 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, K+1)
        positions = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)  # (B, 1)
        logits = _forward(ctx.model, chosen[:, None], mask, positions, cache)


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


def _rows_for(ctx: RankContext, request: GenerationRequest, suffixes) -> list[_Row]:
    rows = []
    for index in suffixes:
        row = _Row(request, index, len(request.prefix_ids) + len(request.suffix_ids[index]))
        seed = request.sampling.seed
        if ctx.rank == 0 and request.sampling.do_sample:
            row.generator = torch.Generator(device=ctx.device)
            if seed is not None:
                row.generator.manual_seed(seed + index)  # one reproducible stream per suffix
            else:
                row.generator.seed()
        rows.append(row)
    return rows


def _run_rows_batch(ctx: RankContext, requests: list[GenerationRequest]) -> tuple[list[_Row], dict]:
    """Single-suffix requests in one left-padded batch."""
    from dca import set_prompt_length

    rows = [r for req in requests for r in _rows_for(ctx, req, [0])]
    prompts = [req.prefix_ids + req.suffix_ids[0] for req in requests]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), ctx.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):  # left padding: every row ends at the last column
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    meter = _Meter(ctx.device)
    cache = _new_cache(ctx)
    lengths = torch.tensor([len(p) for p in prompts], device=ctx.device)
    set_prompt_length(cache, lengths)
    logits = _prefill(ctx, ids, mask, positions, cache, lengths)
    _decode(ctx, rows, cache, logits, mask, meter)
    return rows, {"batch": meter.finish(), "row_meters": None}


def _run_shared_prefix(ctx: RankContext, request: GenerationRequest) -> tuple[list[_Row], dict]:
    """One request with several suffixes: the prefix is prefilled once, its cache copied per suffix."""
    from dca import set_prompt_length

    device = ctx.device
    prefix = torch.tensor([request.prefix_ids], dtype=torch.long, device=device)
    # The attention temperature's n is the request's longest prompt, for the prefix and every
    # suffix alike (the prefix's cached states depend on it). No effect when alpha is 0.
    n = request.prompt_tokens
    prefix_meter = _Meter(device)
    prefix_cache = _new_cache(ctx)
    set_prompt_length(prefix_cache, n)
    prefix_mask = torch.ones_like(prefix)
    prefix_logits = _prefill(ctx, prefix, prefix_mask, None, prefix_cache, n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prefix_s = time.perf_counter() - prefix_meter.start
    shared = prefix_s / len(request.suffix_ids)

    rows, meters = [], []
    last = len(request.suffix_ids) - 1
    for index, suffix_ids in enumerate(request.suffix_ids):
        row = _rows_for(ctx, request, [index])
        meter = _Meter(device)
        cache = prefix_cache if index == last else copy.deepcopy(prefix_cache)
        set_prompt_length(cache, n)
        mask = prefix_mask
        logits = prefix_logits
        if suffix_ids:
            suffix = torch.tensor([suffix_ids], dtype=torch.long, device=device)
            mask = torch.ones((1, prefix.shape[1] + suffix.shape[1]), dtype=torch.long, device=device)
            start = prefix.shape[1]
            positions = torch.arange(start, start + suffix.shape[1], device=device)[None]
            logits = _forward(ctx.model, suffix, mask, positions, cache)
        _decode(ctx, row, cache, logits, mask, meter)
        del cache
        rows += row
        meters.append(meter.finish())
    return rows, {"prefix_prefill_s": prefix_s, "prefix_share_s": shared, "suffix_meters": meters,
                  "prefix_peak": prefix_meter.finish()["peak_memory_bytes"]}


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _results(ctx: RankContext, rows: list[_Row], info: dict) -> list[GenerationResult]:
    results = []
    for i, row in enumerate(rows):
        if "batch" in info:
            metrics, peak, kind = info["batch"]["rows"][i], info["batch"]["peak_memory_bytes"], info["batch"]["memory_kind"]
            prefix_prefill_s = None
        else:
            batch = info["suffix_meters"][i]
            metrics, kind = dict(batch["rows"][0]), batch["memory_kind"]
            peak = max(x for x in (batch["peak_memory_bytes"], info["prefix_peak"]) if x is not None)
            metrics["prefill_s"] += info["prefix_share_s"]
            metrics["wall_time_s"] += info["prefix_share_s"]
            prefix_prefill_s = info["prefix_prefill_s"]
        output = None
        if ctx.tokenizer is not None:
            output = row.text if row.text is not None else ctx.tokenizer.decode(row.output_ids, skip_special_tokens=True)
        device_s = metrics["gpu_time_s"] if kind == CUDA_MEMORY_KIND else metrics["wall_time_s"]
        results.append(GenerationResult(
            request_id=row.request.request_id, suffix_index=row.suffix_index, output=output,
            output_ids=list(row.output_ids), prompt_tokens=row.prompt_tokens, output_tokens=len(row.output_ids),
            prefill_s=metrics["prefill_s"], decode_s=metrics["decode_s"], gpu_time_s=metrics["gpu_time_s"],
            wall_time_s=metrics["wall_time_s"], peak_memory_bytes=peak, memory_kind=kind,
            peak_memory_per_rank=[peak] if peak is not None else [], device_seconds_all_ranks=device_s,
            prefix_prefill_s=prefix_prefill_s,
        ))
    return results


def _check_memory_plan(ctx: RankContext, requests: list[GenerationRequest]):
    """None when the planner says the batch fits; else per-request results (wont_fit errors and,
    for a batch that only fails together, each request run alone). Same answer on every rank."""
    from pipeline.memory_plan import WontFit

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
        request = requests[0]
        return [[
            GenerationResult.error(request.request_id, i, WONT_FIT, f"not started: {error}",
                                   prompt_tokens=len(request.prefix_ids) + len(s))
            for i, s in enumerate(request.suffix_ids)
        ]]


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
        if not _is_oom(error):
            raise
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        del error
    if message is not None:  # outside the except: its traceback (and the tensors it holds) is gone
        _free_memory(ctx.device)
        if ctx.world_size > 1:
            raise RankOutOfMemory(message, [r.request_id for r in requests], ctx.rank)
        if len(requests) > 1:
            return [generate_batch(ctx, [r])[0] for r in requests]
        request = requests[0]
        return [[
            GenerationResult.error(
                request.request_id, i, OUT_OF_MEMORY,
                f"out of memory for a {request.prompt_tokens}-token prompt on {ctx.device} ({message}); "
                "lower max_input_tokens or max_new_tokens, or use more tensor-parallel ranks",
                prompt_tokens=len(request.prefix_ids) + len(s),
            )
            for i, s in enumerate(request.suffix_ids)
        ]]
    if len(requests) == 1:
        return [results]
    return [[result] for result in results]  # one row per request, in request order

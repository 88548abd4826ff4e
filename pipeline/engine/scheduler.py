"""Batching policy of a replica: pure functions over request sizes, no Ray, no torch.

Two schedulers (`EngineConfig.scheduler`):

- "continuous" (default): requests join the replica's running batch whenever their KV cache fits
  beside the rows already there (`admit`), and leave it the step they finish. A request's demand
  is its rows (one per suffix) and the KV tokens it reserves: for every row, its prompt plus
  max_new_tokens (`Demand.of`). Reserving the whole row up front means a running request never
  needs memory it was not given; what the memory planner did not foresee (an out-of-memory
  error) is handled by the pool (the resident requests are preempted and recomputed).
- "static": the scheduler before continuous batching, kept for comparison
  (benchmarks/throughput.py): a batch is formed once, left-padded, and runs until its last row
  ends (`static_batch`).

Admission is first come, first served: the first waiting request that does not fit stops it,
so a large request is never overtaken by smaller ones for ever (the job driver already orders
each window of documents longest first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Demand:
    """What one request needs inside a replica's running batch."""

    # Output rows (one per suffix): slots of the batch.
    rows: int
    # KV tokens reserved: sum over rows of (prefix + suffix + max_new_tokens).
    kv_tokens: int
    # Longest row (prefix + longest suffix + max_new_tokens): the attention context it brings.
    longest: int

    @classmethod
    def of(cls, request) -> Demand:
        new = request.sampling.max_new_tokens
        prefix = len(request.prefix_ids)
        rows = [prefix + len(s) + new for s in request.suffix_ids]
        return cls(rows=len(rows), kv_tokens=sum(rows), longest=max(rows))


@dataclass(frozen=True)
class Budget:
    """The limits a replica's running batch must stay within."""

    # Rows in the running batch at most (EngineConfig.max_batch_size). A request with more rows
    # than this runs when the batch is empty.
    max_rows: int
    # KV bytes per rank available for the batch's caches, given the longest row in the batch
    # (the activation reserve grows with it), or None: no memory limit (CPU without a plan).
    kv_bytes: Callable[[int], float] | None = None
    # KV bytes per token per rank (all layers), from the memory planner.
    kv_bytes_per_token: float = 0.0

    def fits(self, demands: Sequence[Demand]) -> bool:
        if sum(d.rows for d in demands) > self.max_rows:
            return False
        if self.kv_bytes is None or not demands:
            return True
        need = sum(d.kv_tokens for d in demands) * self.kv_bytes_per_token
        return need <= self.kv_bytes(max(d.longest for d in demands))


def admit(waiting: Sequence[tuple[Demand, bool]], resident: Sequence[Demand], budget: Budget,
          resident_solo: bool = False) -> list[int]:
    """Which waiting requests join the running batch now: -> their indices in `waiting` (a
    prefix of it: first come, first served).

    waiting        (demand, solo) in queue order; solo: the request must run with no other
                   (it was in a batch that ran out of memory)
    resident       demands of the requests in the batch now
    resident_solo  the batch holds a solo request: nothing joins it

    An empty batch takes the first request whatever its size (one that cannot fit even alone
    was answered `wont_fit` before it was queued; a QA request with more rows than max_rows
    runs alone).
    """
    if resident_solo:
        return []
    chosen: list[int] = []
    taken = list(resident)
    for index, (demand, solo) in enumerate(waiting):
        if solo:
            return [index] if not taken else chosen
        if taken and not budget.fits([*taken, demand]):
            break
        chosen.append(index)
        taken.append(demand)
    return chosen


def static_batch(waiting: Sequence[tuple[int, bool]], max_batch_tokens: int, max_batch_size: int) -> list[int]:
    """The static scheduler: -> indices of the waiting requests that form the next batch.

    waiting  (prompt tokens, alone) in queue order; alone: several suffixes, or split after an
             out-of-memory error. The oldest request starts the batch; later requests that need
             no batch of their own join while rows x longest prompt stays within max_batch_tokens
             and the rows within max_batch_size; a prompt that fills half the budget runs alone.
    """
    if not waiting:
        return []
    width, alone = waiting[0]
    batch = [0]
    if alone or width * 2 > max_batch_tokens:
        return batch
    for index in range(1, len(waiting)):
        if len(batch) >= max_batch_size:
            break
        tokens, alone = waiting[index]
        if alone:
            continue
        new_width = max(width, tokens)
        if new_width * (len(batch) + 1) > max_batch_tokens:
            continue
        batch.append(index)
        width = new_width
    return batch


def budget_of(plan, max_rows: int, prefill_tokens: int | None):
    """The scheduler's Budget for a replica: max_rows and, with a plan, its KV budget."""
    from functools import lru_cache

    if plan is None or plan.config.device_memory is None:
        return Budget(max_rows=max_rows)

    @lru_cache(maxsize=256)
    def kv_bytes(longest: int) -> float:
        step = (prefill_tokens or longest) + max_rows
        return plan.kv_budget(step, longest, max_rows)

    return Budget(max_rows=max_rows, kv_bytes=kv_bytes, kv_bytes_per_token=plan.kv_bytes_per_token())


def wont_fit(plan, request) -> str | None:
    """The reason a request cannot run even alone (the planner's numbers), or None."""
    from pipeline.engine.memory_plan import WontFit

    if plan is None or plan.config.device_memory is None:
        return None
    try:
        plan.check(request.prompt_tokens, request.sampling.max_new_tokens, len(request.suffix_ids))
    except WontFit as error:
        return f"not started: {error}"
    return None

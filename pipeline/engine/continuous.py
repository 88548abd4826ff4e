"""Continuous batching on one rank: the running batch, one packed forward per step.

The driver (`pipeline.engine.pool`, or `generate_continuous` in process) decides which requests
join the batch (`pipeline.engine.scheduler`); this module runs it. Every step is ONE forward of
a packed sequence (`dca.hf`'s packed rows):

- one decode token for every row that has its first token already;
- prompt blocks of rows still prefilling, oldest first, within `prefill_tokens` tokens per step
  (block boundaries at multiples of it, as `dca.prefill.chunked_prefill` cuts them): a long
  prefill advances a block per step while the other rows keep decoding, instead of stalling them;
- logits only at the positions that choose a token (`logits_to_keep` as a tensor of positions).

A request with several suffixes (QA) first prefills its shared prefix once, into the slot of its
last suffix row; the other rows copy that cache when it is complete, then prefill their own
suffix. A row that ends (eos, a stop string, max_new_tokens) leaves the batch in that step and
its KV slot is freed at once.

Under tensor parallelism every rank runs this same loop on its shard: what is planned in a step
depends only on state every rank shares, and rank 0 alone chooses tokens and says which rows
ended and whether the call returns, broadcast in one message per step (`RankContext.sync`).

Out of memory in a forward: every row is rolled back to its length before the step (some
layers had appended, others not), memory is freed, and `BatchOutOfMemory` carries what this
rank measured so far; the rows stay until the driver drops them (it decides what runs again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.config.resolve import prefill_tokens
from pipeline.engine.generation import RankContext
from pipeline.engine.kv_cache import PackedRows, RowKV, cache_argument
from pipeline.engine.messages import FinishedRow, StepResult
from pipeline.engine.metering import ForwardMeter, MeterReport
from pipeline.engine.out_of_memory import describe_out_of_memory, free_memory, is_out_of_memory, out_of_memory_results
from pipeline.engine.requests import GenerationRequest
from pipeline.engine.tokens import TokenState, advance_tokens, choose_tokens, token_states

def resolve_prefill_tokens(prefill_block, model) -> int | None:
    """EngineConfig.prefill_block -> prompt tokens per step on this model (None: a whole prompt per
    step): `pipeline.config.resolve.prefill_tokens` with the model's DCA chunk_len."""
    from dca import dca_config_of

    dca = dca_config_of(model)
    return prefill_tokens(prefill_block, dca.chunk_len if dca is not None else None)


class BatchOutOfMemory(Exception):
    """A step's forward ran out of memory on this rank (rows rolled back, memory freed)."""

    def __init__(self, message: str, report: MeterReport):
        super().__init__(message)
        self.message, self.report = message, report


@dataclass
class SharedPrefix:
    """The shared prefix of a request with several suffixes, being prefilled."""

    seq: int
    request: GenerationRequest
    kv: RowKV
    tokens: list[int]
    rows: list  # its RunningRow rows, waiting for it
    fed: int = 0
    # Logits of its last position once complete (rows with an empty suffix start from them).
    done: bool = False


@dataclass
class RunningRow:
    """One output row of the running batch."""

    seq: int
    suffix_index: int
    request: GenerationRequest
    prompt_tokens: int
    capacity: int
    token: TokenState  # output tokens and stop state (meaningful on rank 0)
    admitted: float
    prompt: list[int] = field(default_factory=list)  # tokens this row prefills itself
    kv: RowKV | None = None
    fed: int = 0
    prefix: SharedPrefix | None = None  # set while the shared prefix is not complete
    last_token: int | None = None  # fed at the next decode step
    first_token: float | None = None
    prefix_prefill_s: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.seq, self.suffix_index)


class ContinuousBatch:
    """The running batch of one rank. `step()` is what `RankWorker.step` calls."""

    def __init__(self, ctx: RankContext, prefill_tokens: int | None):
        self.ctx = ctx
        self.prefill_tokens = prefill_tokens
        self.meter = ForwardMeter(ctx.device)
        self.num_layers = ctx.model.config.num_hidden_layers
        self.rows: list[RunningRow] = []  # admission order
        self.prefixes: list[SharedPrefix] = []

    # -- membership ------------------------------------------------------------------------------

    def admit(self, seq: int, request: GenerationRequest) -> None:
        now = time.perf_counter()
        new = request.sampling.max_new_tokens
        prefix = list(request.prefix_ids)
        token_rows = token_states(self.ctx, request, range(len(request.suffix_ids)))
        rows = [
            RunningRow(seq=seq, suffix_index=i, request=request, prompt_tokens=len(prefix) + len(suffix),
                 capacity=len(prefix) + len(suffix) + new, token=token_rows[i], admitted=now)
            for i, suffix in enumerate(request.suffix_ids)
        ]
        if len(rows) == 1 or not prefix:  # nothing shared: every row prefills its own prompt
            for row, suffix in zip(rows, request.suffix_ids):
                row.prompt = prefix + list(suffix)
                row.kv = self._slot(row.capacity, request.prompt_tokens if len(rows) > 1 else len(row.prompt))
        else:
            # The prefix goes into the slot of the last row, which keeps it; the others copy it.
            # n of the temperature is the request's longest prompt, for the prefix and every
            # suffix alike (the prefix's cached states depend on it).
            shared = SharedPrefix(seq=seq, request=request, kv=self._slot(rows[-1].capacity, request.prompt_tokens),
                             tokens=prefix, rows=rows)
            for row, suffix in zip(rows, request.suffix_ids):
                row.prompt, row.prefix = list(suffix), shared
            self.prefixes.append(shared)
        self.rows.extend(rows)

    def _slot(self, capacity: int, prompt_length: int) -> RowKV:
        kv = RowKV(self.num_layers, capacity, self.ctx.kv_cache_dtype)
        kv.dca_prompt_length = torch.tensor([prompt_length], device=self.ctx.device)
        return kv

    def drop(self, seqs) -> None:
        """Takes requests out of the batch (preempted: the driver runs them again later)."""
        seqs = set(seqs)
        for row in self.rows:
            if row.seq in seqs and row.kv is not None:
                row.kv.free()
        for prefix in self.prefixes:
            if prefix.seq in seqs:
                prefix.kv.free()
        self.rows = [r for r in self.rows if r.seq not in seqs]
        self.prefixes = [p for p in self.prefixes if p.seq not in seqs]

    def reset(self) -> None:
        self.drop({r.seq for r in self.rows} | {p.seq for p in self.prefixes})
        self.meter.collect()

    @property
    def busy(self) -> bool:
        return bool(self.rows)

    # -- running ---------------------------------------------------------------------------------

    def step(self, admit=(), drop=(), time_budget_s: float | None = None) -> StepResult:
        """Admits and drops requests, then runs steps until a row ends, `time_budget_s` has passed
        (rank 0's clock, after at least one step) or nothing is left. Raises BatchOutOfMemory."""
        self.drop(drop)
        for seq, request in admit:
            self.admit(seq, request)
        start = time.perf_counter()
        finished: list[FinishedRow] = []
        steps = 0
        while self.rows:
            ended, stop = self._one_step(start, time_budget_s)
            steps += 1
            finished.extend(ended)
            if stop:
                break
        return StepResult(rank=self.ctx.rank, finished=finished, report=self.meter.collect(),
                          rows=len(self.rows), steps=steps)

    def _plan(self):
        """-> segments [(kind, unit, tokens)] of the next packed forward; kind "decode",
        "prefill" (a row's own prompt) or "prefix" (a shared prefix)."""
        segments = []
        for row in self.rows:
            if row.last_token is not None and not row.token.done:
                segments.append(("decode", row, [row.last_token]))
        budget = self.prefill_tokens
        left = budget
        for kind, unit in self._prefill_units():
            tokens, fed = unit.tokens if kind == "prefix" else unit.prompt, unit.fed
            past = unit.kv.length
            if budget is None:
                stop = len(tokens)
            else:
                stop = min(len(tokens), fed + (past // budget + 1) * budget - past)
            if left is not None and stop - fed > left:
                break  # the next block does not fit this step: it starts the next one
            segments.append((kind, unit, tokens[fed:stop]))
            if left is not None:
                left -= stop - fed
                if left <= 0:
                    break
        return segments

    def _prefill_units(self):
        seen = set()
        for row in self.rows:
            if row.prefix is not None:
                if id(row.prefix) not in seen and row.prefix.fed < len(row.prefix.tokens):
                    seen.add(id(row.prefix))
                    yield "prefix", row.prefix
            elif row.fed < len(row.prompt):
                yield "prefill", row

    def _one_step(self, start: float, time_budget_s: float | None) -> tuple[list[FinishedRow], bool]:
        ctx = self.ctx
        segments = self._plan()
        if not segments:  # every row waits for a token (cannot happen) or is done
            raise RuntimeError("continuous batch: no work planned for a non-empty batch")
        ids, positions, packed, shares, keep, choosers = [], [], [], {}, [], []
        offset = 0
        for kind, unit, tokens in segments:
            n = len(tokens)
            past = unit.kv.length
            ids.extend(tokens)
            positions.extend(range(past, past + n))
            packed.append((unit.kv, offset, offset + n))
            if kind == "prefix":
                for row in unit.rows:  # a shared prefix belongs to all its rows
                    shares[row.key] = shares.get(row.key, 0.0) + n / len(unit.rows)
                if unit.fed + n == len(unit.tokens):  # complete: rows with no suffix start here
                    for row in unit.rows:
                        if not row.prompt:
                            choosers.append((row, len(keep)))
                    keep.append(offset + n - 1)
            else:
                row = unit
                shares[row.key] = shares.get(row.key, 0.0) + n
                if kind == "decode" or row.fed + n == len(row.prompt):
                    choosers.append((row, len(keep)))
                    keep.append(offset + n - 1)
            offset += n
        if not keep:
            keep.append(offset - 1)  # lm_head needs some position; nothing reads it
        injected = sorted({unit.request.request_id for _, unit, _ in segments}
                          & set(ctx.out_of_memory_for))
        logits = self._forward(ids, positions, packed, keep, shares, segments, injected)

        # Every rank: the forward went through; advance the prompts.
        now = time.perf_counter()
        for kind, unit, tokens in segments:
            if kind == "decode":
                continue
            unit.fed += len(tokens)
            if kind == "prefix" and unit.fed == len(unit.tokens):
                self._prefix_complete(unit, now)

        # Rank 0 chooses the tokens and whether this call ends; every rank applies the message.
        rows = [row for row, _ in choosers]
        n = len(rows)
        if ctx.rank == 0:
            chosen = choose_tokens(ctx, [r.token for r in rows], logits[[i for _, i in choosers]]) if n else \
                torch.empty(0, dtype=torch.long, device=ctx.device)
            done = advance_tokens(ctx, [r.token for r in rows], chosen.tolist()) if n else []
            stop = any(done) or (time_budget_s is not None and time.perf_counter() - start >= time_budget_s)
            message = torch.zeros((2, n + 1), dtype=torch.long, device=ctx.device)
            message[0, :n] = chosen.to(ctx.device)
            message[1, :n] = torch.tensor(done, dtype=torch.long, device=ctx.device)
            message[0, n] = int(stop)
        else:
            message = torch.empty((2, n + 1), dtype=torch.long, device=ctx.device)
        message = ctx.sync(message).tolist()
        now = time.perf_counter()
        ended = []
        for i, row in enumerate(rows):
            if row.first_token is None:
                row.first_token = now
            row.last_token = message[0][i]
            if message[1][i]:
                row.token.done = True
                ended.append(self._finish(row, now))
        if ended:
            self.rows = [r for r in self.rows if not r.token.done]
        return ended, bool(message[0][n])

    def _forward(self, ids, positions, packed, keep, shares, segments, injected) -> torch.Tensor:
        ctx = self.ctx
        device = ctx.device
        lengths = [(unit.kv, unit.kv.length) for _, unit, _ in segments]
        message = None
        try:
            with torch.inference_mode():
                if injected:
                    raise torch.OutOfMemoryError(f"injected out of memory (test hook) for {injected} on rank {ctx.rank}")
                input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
                position_ids = torch.tensor([positions], dtype=torch.long, device=device)  # (1, T)
                keep_ids = torch.tensor(keep, dtype=torch.long, device=device)
                with self.meter.forward(shares):
                    out = ctx.model(
                        input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=keep_ids,
                        **{cache_argument(type(ctx.model)): PackedRows(packed)},
                    )
                    logits = out.logits[0]  # (len(keep), V)
                return logits
        except Exception as error:  # noqa: BLE001 - only out of memory is handled
            if not is_out_of_memory(error):
                raise
            message = describe_out_of_memory(error)
            del error
        for kv, length in lengths:  # outside the except: the traceback's tensors are gone
            kv.rollback(length)
        free_memory(device)
        raise BatchOutOfMemory(message, self.meter.collect())

    def _prefix_complete(self, prefix: SharedPrefix, now: float) -> None:
        """Hands the finished prefix cache to its rows: the last row keeps it, the others copy."""
        *others, last = prefix.rows
        for row in others:
            row.kv = self._slot(row.capacity, prefix.request.prompt_tokens)
            row.kv.fill_from(prefix.kv)
        last.kv = prefix.kv
        for row in prefix.rows:
            row.prefix = None
            row.prefix_prefill_s = now - row.admitted
        self.prefixes.remove(prefix)

    def _finish(self, row: RunningRow, now: float) -> FinishedRow:
        ctx = self.ctx
        if row.kv is not None:
            row.kv.free()
        output = None
        if ctx.tokenizer is not None:
            token = row.token
            output = token.text if token.text is not None else ctx.tokenizer.decode(
                token.output_ids, skip_special_tokens=True)
        first = row.first_token if row.first_token is not None else now
        return FinishedRow(
            seq=row.seq, suffix_index=row.suffix_index, request_id=row.request.request_id,
            prompt_tokens=row.prompt_tokens, output_ids=list(row.token.output_ids), output=output,
            cumulative_logprob=row.token.cumulative_logprob,
            prefill_s=first - row.admitted, decode_s=now - first, wall_time_s=now - row.admitted,
            prefix_prefill_s=row.prefix_prefill_s,
        )


# ---------------------------------------------------------------------------------------------
# In process: one rank, no Ray (evaluation, GPU checks, tests)


def generate_continuous(ctx: RankContext, requests: list[GenerationRequest], *, max_rows: int = 8,
                        prefill_block: int | str | None = "auto", plan=None, reports: list | None = None) -> list[list]:
    """Runs requests through one rank's continuous batch in this process, as a replica of
    tp_size 1 does: same scheduler, same steps, same metering; -> one list of results (one per
    suffix) per request, in the given order.

    plan: a `pipeline.engine.memory_plan.MemoryPlan` with device_memory for the KV budget and wont_fit
    answers (None: only max_rows limits the batch). Out of memory: the requests in the batch
    run again one at a time; one that still does not fit alone gets an out_of_memory result.
    reports: a list to receive every `MeterReport` of the rank (busy time, forwards, tokens)."""
    from collections import deque

    from pipeline.engine.messages import result_of
    from pipeline.engine.metering import Ledger
    from pipeline.engine.requests import WONT_FIT, GenerationResult
    from pipeline.engine.scheduler import Demand, admit, budget_of, wont_fit

    if ctx.world_size != 1:
        raise ValueError("generate_continuous runs one rank in process; use the engine for tensor parallelism")
    step_tokens = resolve_prefill_tokens(prefill_block, ctx.model)
    batch = ContinuousBatch(ctx, step_tokens)
    budget = budget_of(plan, max_rows, step_tokens)
    ledger = Ledger(1)
    answers: dict[int, list] = {}
    waiting = deque()  # (seq, request, solo)
    for seq, request in enumerate(requests):
        refusal = wont_fit(plan, request)
        if refusal is not None:
            answers[seq] = GenerationResult.errors_for(request, WONT_FIT, refusal)
        else:
            waiting.append((seq, request, False))
    resident: dict[int, tuple] = {}  # seq -> (request, solo, finished rows)
    while waiting or resident:
        chosen = admit([(Demand.of(r), solo) for _, r, solo in waiting],
                       [Demand.of(r) for r, _, _ in resident.values()], budget,
                       resident_solo=any(solo for _, solo, _ in resident.values()))
        admitted = [waiting[i] for i in chosen]
        for item in admitted:
            waiting.remove(item)
            resident[item[0]] = (item[1], item[2], {})
        try:
            step = batch.step(admit=[(seq, r) for seq, r, _ in admitted])
        except BatchOutOfMemory as error:
            ledger.add(0, error.report)
            if reports is not None:
                reports.append(error.report)
            batch.drop(list(resident))
            if len(resident) == 1:
                ((seq, (request, _, _)),) = resident.items()
                answers[seq] = out_of_memory_results(request, f"{ctx.device}, running alone", f" ({error.message})")
                resident.clear()
            else:  # each runs again alone, oldest first
                waiting.extendleft(reversed([(seq, request, True) for seq, (request, _, _) in resident.items()]))
                resident.clear()
            continue
        ledger.add(0, step.report)
        if reports is not None:
            reports.append(step.report)
        for row in step.finished:
            request, _, rows = resident[row.seq]
            rows[row.suffix_index] = row
            if len(rows) == len(request.suffix_ids):
                del resident[row.seq]
                results = [result_of(rows[i]) for i in range(len(rows))]
                for result, metrics in zip(results, ledger.pop(row.seq, len(rows))):
                    ledger.apply(result, metrics)
                answers[row.seq] = results
    return [answers[seq] for seq in range(len(requests))]


def generate_in_process(ctx: RankContext, requests: list[GenerationRequest], **kwargs) -> list[list]:
    """What a replica of tp_size 1 runs, in this process: the continuous batch for a DCA model
    (`generate_continuous`, kwargs passed on), the static scheduler's path otherwise (a model
    without DCA cannot be packed: one request per `generate_batch`)."""
    from dca import dca_config_of
    from pipeline.engine.generation import generate_batch

    if dca_config_of(ctx.model) is not None:
        return generate_continuous(ctx, requests, **kwargs)
    return [generate_batch(ctx, [request])[0] for request in requests]

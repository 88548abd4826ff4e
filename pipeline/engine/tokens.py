"""Token choice on rank 0 (greedy, sampling, the repetition guard) and when a row stops; shared by
the static path (pipeline.engine.generation) and the continuous batch (pipeline.engine.continuous).
Runs in the process that holds a model: imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.engine.requests import GenerationRequest


@dataclass
class TokenState:
    """One output row's generation on rank 0: the tokens chosen so far, its sampling generator, the
    output text once a stop string cut it, and whether it ended."""

    request: GenerationRequest
    suffix_index: int
    prompt_tokens: int
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str | None = None
    done: bool = False
    # Sum of the log-probabilities of output_ids under the model's own distribution (its logits
    # before the repetition guard, temperature and top-p): the answer's confidence, which the
    # hierarchical QA's "confidence" combine ranks section answers by. `chosen_logprob` holds the
    # last chosen token's until advance_tokens keeps or drops it (an end-of-sequence token is not
    # an output token).
    cumulative_logprob: float = 0.0
    chosen_logprob: float = 0.0


def repetition_guard(logits: torch.Tensor, output_ids: list[int], params) -> torch.Tensor:
    """(V,) logits of one row -> the same logits with SamplingParams' repetition guard applied to
    the tokens generated so far (`output_ids`; the prompt is not penalised: a summary may reuse the
    document's words). transformers' own logits processors do the work, fed the generated tokens
    only. Unchanged (the same tensor) when the guard is off or nothing was generated yet."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    penalty, n = params.repetition_penalty, params.no_repeat_ngram_size
    if not output_ids or (penalty == 1.0 and n <= 0):
        return logits
    ids = torch.tensor([output_ids], dtype=torch.long, device=logits.device)
    scores = logits.float()[None]
    if penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
    if n > 0:
        scores = NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
    return scores[0]


def choose_tokens(ctx, rows: list[TokenState], logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) next tokens (rank 0's decision). `ctx`: the
    rank's RankContext (pipeline.engine.generation)."""
    next_ids = torch.full((len(rows),), ctx.pad_token_id, dtype=torch.long, device=logits.device)
    greedy = logits.argmax(-1)
    for i, row in enumerate(rows):
        params = row.request.sampling
        if row.done:
            continue
        row_logits = logits[i]
        guarded = repetition_guard(row_logits, row.output_ids, params)
        if not params.do_sample or params.temperature <= 0:
            next_ids[i] = greedy[i] if guarded is row_logits else guarded.argmax(-1)
            continue
        scores = guarded.float() / params.temperature
        probs = torch.softmax(scores, -1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # always keeps the top token
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        next_ids[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
    # The chosen tokens' log-probabilities under the model's logits, for the whole batch at once.
    scores = logits.float()
    chosen = scores.gather(-1, next_ids[:, None].to(scores.device))[:, 0] - torch.logsumexp(scores, -1)
    for row, logprob in zip(rows, chosen.tolist()):
        row.chosen_logprob = logprob
    return next_ids


def advance_tokens(ctx, rows: list[TokenState], next_ids: list[int]) -> list[bool]:
    """Appends the chosen tokens and decides which rows stop (rank 0): an end-of-sequence token, a
    stop string (the text is cut before it) or max_new_tokens. -> done flags."""
    for row, token in zip(rows, next_ids):
        if row.done:
            continue
        params = row.request.sampling
        if token in ctx.eos_token_ids and not params.ignore_eos:
            row.done = True
            continue
        row.output_ids.append(token)
        row.cumulative_logprob += row.chosen_logprob
        if params.stop and ctx.tokenizer is not None:
            text = ctx.tokenizer.decode(row.output_ids, skip_special_tokens=True)
            start = len(text) - len(text.lstrip())  # leading whitespace never stops a row
            cut = min((i for i in (text.find(s, start) for s in params.stop if s) if i >= 0), default=-1)
            if cut >= 0:
                row.text = text[:cut]
                row.done = True
                continue
        if len(row.output_ids) >= params.max_new_tokens:
            row.done = True
    return [row.done for row in rows]


def token_states(ctx, request: GenerationRequest, suffixes) -> list[TokenState]:
    """A TokenState for each suffix index of `request`; on rank 0 a sampling request's rows get a
    generator each, seeded seed + suffix index (one reproducible stream per suffix)."""
    rows = []
    for index in suffixes:
        row = TokenState(request, index, len(request.prefix_ids) + len(request.suffix_ids[index]))
        seed = request.sampling.seed
        if ctx.rank == 0 and request.sampling.do_sample:
            row.generator = torch.Generator(device=ctx.device)
            if seed is not None:
                row.generator.manual_seed(seed + index)  # one reproducible stream per suffix
            else:
                row.generator.seed()
        rows.append(row)
    return rows


def eos_token_ids(tokenizer, model) -> frozenset[int]:
    """Every end-of-sequence id the tokenizer (None on ranks other than 0), the model's generation
    config and its config name: generation stops at any of them."""
    eos: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None),
                   model.config.eos_token_id):
        eos.update(source if isinstance(source, (list, tuple)) else [source] if source is not None else [])
    return frozenset(eos)

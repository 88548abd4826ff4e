"""How a variant's model is run: the loss of a token sequence (perplexity) and a greedy passkey
answer through the engine's generation path, in this process (`InProcessRunner`, one rank) or on an
engine replica (`ReplicaRunner`, tensor parallelism). torch is imported inside the functions."""

from __future__ import annotations

import dataclasses
import math
import time


def sequence_nll(model, input_ids, loss_slice: int = 1024):
    """Per-token negative log-likelihood (n - 1,) float32 of a (n,) or (1, n) id tensor.

    Runs the base model once for the hidden states, then lm_head + cross-entropy over slices of
    `loss_slice` positions: peak extra memory is (loss_slice, vocab), never (n, vocab).
    """
    import torch

    ids = _as_row(model, input_ids)
    with torch.inference_mode():
        hidden = _base(model)(input_ids=ids, use_cache=False).last_hidden_state  # (1, n, H)
        return _hidden_nll(model, hidden[:, :-1], ids[0, 1:], loss_slice).cpu()


@dataclasses.dataclass
class SharedPrefixNLL:
    """What `shared_prefix_nll` computed: per model its NLL (n - 1,) and the seconds of its own
    forward (the first model's over the whole sequence, every other's over the rest)."""

    nll: list
    seconds: list


def shared_prefix_nll(models: list, input_ids, prefix: int, loss_slice: int = 1024) -> SharedPrefixNLL:
    """`sequence_nll` of every model in `models` over the same ids, the first `prefix` tokens
    computed once. models[0], the plain model, runs the whole sequence once keeping its KV cache;
    every other model continues from a copy of that cache cut to the first `prefix` tokens, over
    the rest, and takes the plain model's losses for the prefix's targets.

    For DCA variants whose chunk_len is at least `prefix` the first `prefix` tokens are the same
    computation as the plain model's: DCA is plain attention over them (queries before
    chunk_size) and caches keys rotated at j mod chunk_len = j, as the plain model does. So the
    results equal separate `sequence_nll` runs within float tolerance (tests/pipeline/
    test_evaluation.py), at `prefix` fewer token-forwards per DCA model. Why the plain model goes
    first, over everything: a plain forward continuing a cache gets an explicit attention mask
    (no causal fast path) and took longer on CPU than one over the whole sequence.
    """
    import copy

    import torch
    from transformers import DynamicCache

    from dca import dca_config_of, set_prompt_length

    if dca_config_of(models[0]) is not None:
        raise ValueError("the first model of a shared prefix must be the plain model (no DCA)")
    ids = _as_row(models[0], input_ids)
    n = ids.shape[1]
    if not 0 < prefix < n - 1:
        raise ValueError(f"the shared prefix must leave tokens to each model: prefix {prefix}, sequence {n}")
    out = SharedPrefixNLL(nll=[], seconds=[])
    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = DynamicCache(config=models[0].config)
        hidden = _base(models[0])(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
        first = _hidden_nll(models[0], hidden[:, :-1], ids[0, 1:], loss_slice)
        del hidden
        out.nll.append(first.cpu())  # .cpu() waits for the device
        out.seconds.append(time.perf_counter() - t0)
        cache.crop(-(n - prefix))  # the first `prefix` tokens' keys and values
        for i, model in enumerate(models[1:], start=1):
            t0 = time.perf_counter()
            own = cache if i == len(models) - 1 else copy.deepcopy(cache)
            # DCA's attention temperature takes n of the whole sequence, as one forward over it would.
            set_prompt_length(own, n)
            hidden = _base(model)(input_ids=ids[:, prefix:], cache=own, use_cache=True).last_hidden_state
            # Positions prefix .. n-2 predict tokens prefix+1 .. n-1; the ones before, the plain model's.
            tail = _hidden_nll(model, hidden[:, :-1], ids[0, prefix + 1 :], loss_slice)
            out.nll.append(torch.cat([out.nll[0][:prefix], tail.cpu()]))
            out.seconds.append(time.perf_counter() - t0)
            del hidden, own
    return out


def shared_prefix(dca_configs: list, length: int) -> int:
    """Tokens at the start of a `length`-token sequence that the plain model and every DCA
    variant of `dca_configs` (None: the plain model, which must be among them) compute alike, so
    `shared_prefix_nll` may run them once; 0 when nothing is to be shared. DCA with chunk_len L is
    plain attention over its first L tokens (keys rotated at j mod L = j), unless its attention
    temperature is on (alpha > 0 for a sequence longer than pretraining_length scales every
    logit, spec section 5)."""
    dcas = [c for c in dca_configs if c is not None]
    if None not in dca_configs or not dcas:
        return 0
    if any(c.temperature_alpha > 0 and length > c.pretraining_length for c in dcas):
        return 0
    prefix = min(c.chunk_len for c in dcas)
    return prefix if prefix < length - 1 else 0


def _as_row(model, input_ids):
    import torch

    return torch.as_tensor(input_ids).reshape(1, -1).to(next(model.parameters()).device)


def _base(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _hidden_nll(model, hidden, targets, loss_slice: int):
    """NLL (T,) of `targets` (T,) from the hidden states (1, T, H) that predict them, in slices."""
    import torch
    import torch.nn.functional as F

    head = model.get_output_embeddings()
    nll = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for s in range(0, targets.shape[0], loss_slice):
        e = min(s + loss_slice, targets.shape[0])
        # (1, slice, H) in: AutoTP's sharded lm_head slices the last dim of a 3D input.
        logits = head(hidden[:, s:e])[0].float()  # (slice, V)
        nll[s:e] = F.cross_entropy(logits, targets[s:e], reduction="none")
    return nll


def perplexity_summary(nll, length: int, position_bucket: int = 0) -> dict:
    """ppl over the whole window and over the targets in its last quarter (positions >= 3n/4)."""
    import torch

    first_last_quarter = length - length // 4  # token position of the first last-quarter target
    last = nll[first_last_quarter - 1 :]
    out = {
        "nll": float(nll.mean()),
        "ppl": math.exp(float(nll.mean())),
        "nll_last_quarter": float(last.mean()),
        "ppl_last_quarter": math.exp(float(last.mean())),
    }
    if position_bucket:
        # Bucket b covers target positions [b * size + 1, (b + 1) * size].
        out["nll_by_position"] = [
            float(chunk.mean()) for chunk in torch.split(nll, position_bucket)
        ]
    return out


def passkey_request(input_ids: list[int], max_new_tokens: int):
    from pipeline.config.task import SamplingParams
    from pipeline.engine.requests import GenerationRequest

    return GenerationRequest(request_id="passkey", prefix_ids=[int(t) for t in input_ids],
                             sampling=SamplingParams(max_new_tokens=max_new_tokens))


def answer_text(result) -> str:
    if result.status != "ok":
        raise RuntimeError(f"the engine could not answer a passkey prompt: {result.error_type}: {result.error_message}")
    return result.output


class InProcessRunner:
    """One variant's model in this process, run through the engine's rank-side code."""

    def __init__(self, model, tokenizer):
        from pipeline.engine.generation import RankContext
        from pipeline.engine.tokens import eos_token_ids

        pad = getattr(tokenizer, "pad_token_id", None)
        self.ctx = RankContext(model=model, device=next(model.parameters()).device, tokenizer=tokenizer,
                               eos_token_ids=eos_token_ids(tokenizer, model), pad_token_id=pad if pad is not None else 0)

    def info(self) -> dict:
        return rank_model_info(self.ctx)

    def nll(self, input_ids, loss_slice: int):
        return sequence_nll(self.ctx.model, input_ids, loss_slice)

    def answer(self, input_ids: list[int], max_new_tokens: int) -> str:
        from pipeline.engine.continuous import generate_in_process

        ((result,),) = generate_in_process(self.ctx, [passkey_request(input_ids, max_new_tokens)])
        return answer_text(result)


class ReplicaRunner:
    """One variant served by an engine replica (`ReplicaPool`, tensor parallelism): passkey
    answers are requests to it; perplexity runs `sequence_nll` on its ranks' shards."""

    def __init__(self, pool):
        self.pool = pool

    def info(self) -> dict:
        return {**self.pool.call_ranks(rank_model_info), "tp_size": self.pool.config.tp_size}

    def nll(self, input_ids, loss_slice: int):
        return self.pool.call_ranks(rank_sequence_nll, [int(t) for t in input_ids], loss_slice)

    def answer(self, input_ids: list[int], max_new_tokens: int) -> str:
        (result,) = self.pool.submit(passkey_request(input_ids, max_new_tokens)).result()
        return answer_text(result)


def rank_sequence_nll(ctx, input_ids: list[int], loss_slice: int):
    """On every rank of a replica (their all-reduces meet): the NLL of the rank's model shard."""
    return sequence_nll(ctx.model, input_ids, loss_slice)


def rank_model_info(ctx) -> dict:
    model = ctx.model
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": str(next(model.parameters()).device), "model_type": getattr(model.config, "model_type", None),
            "max_position_embeddings": int(model.config.max_position_embeddings)}

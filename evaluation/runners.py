"""How a variant's model is run: the loss of a token sequence (perplexity) and a greedy passkey
answer through the engine's generation path, in this process (`InProcessRunner`, one rank) or on an
engine replica (`ReplicaRunner`, tensor parallelism). torch is imported inside the functions."""

from __future__ import annotations

import math


def sequence_nll(model, input_ids, loss_slice: int = 1024):
    """Per-token negative log-likelihood (n - 1,) float32 of a (n,) or (1, n) id tensor.

    Runs the base model once for the hidden states, then lm_head + cross-entropy over slices of
    `loss_slice` positions: peak extra memory is (loss_slice, vocab), never (n, vocab).
    """
    import torch
    import torch.nn.functional as F

    ids = torch.as_tensor(input_ids).reshape(1, -1)
    device = next(model.parameters()).device
    ids = ids.to(device)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    with torch.inference_mode():
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state  # (1, n, H)
        targets = ids[0, 1:]  # (n-1,)
        nll = torch.empty(targets.shape[0], dtype=torch.float32, device=device)
        for s in range(0, targets.shape[0], loss_slice):
            e = min(s + loss_slice, targets.shape[0])
            # (1, slice, H) in: AutoTP's sharded lm_head slices the last dim of a 3D input.
            logits = head(hidden[:, s:e])[0].float()  # (slice, V)
            nll[s:e] = F.cross_entropy(logits, targets[s:e], reduction="none")
    return nll.cpu()


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

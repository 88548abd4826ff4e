"""GPU check of the engine (called by scripts/gpu_check.py; runs alone too).

    python scripts/gpu_check_engine.py                # on a CUDA machine: tp_size=2 with 2+ GPUs, else 1
    python scripts/gpu_check_engine.py --device cpu   # dry run of the same code paths on CPU

What it checks, on a tiny random Llama with DCA (9 heads / 3 KV heads, prompts longer than
chunk_size) saved to a temporary directory (the GPU image has no model weights):
1. in-process: `generate_batch` on the device gives the greedy tokens of transformers +
   apply_dca (float32), and CUDA metrics (memory_kind cuda_max_allocated, gpu_time_s from events);
2. engine: a replica of tp_size = min(2, GPUs) on a local Ray cluster (nccl between ranks, one
   GPU per rank) gives the same tokens in float32, with per-rank GPU peaks and GPU time; then a
   bfloat16 replica answers (tokens are printed, not compared: bf16 rounding differs);
3. a prompt above max_input_tokens returns a prompt_too_long result.
Stage 2 needs ray (and deepspeed for tp_size 2); without them it is reported as skipped, with
the reason. Prints one JSON line per check and a summary; exit code 1 if any check failed.
`run_checks(device)` returns the same records for a caller.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "token")

DCA = {"pretraining_length": 64, "chunk_size": 48, "local_window": 8}
VOCAB = 128


def _build_tiny_model(directory: str) -> str:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=64,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(directory)
    return directory


def _prompts():
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (110, 70, 130)]


def _reference(model_dir: str, device: str, prompts, max_new: int):
    import torch

    from pipeline.config.model import ModelSpec
    from pipeline.engine.models import load_model

    model = load_model(ModelSpec(model=model_dir, dca=DCA, dtype="float32"), device)
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p], device=device), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=2, pad_token_id=0)[0, len(p):].tolist()
        out.append(ids[: ids.index(2)] if 2 in ids else ids)
    return model, out


def run_checks(device: str = "cuda") -> list[dict]:
    import torch

    from pipeline.config.task import SamplingParams
    from pipeline.engine.generation import RankContext, generate_batch
    from pipeline.engine.requests import GenerationRequest

    records: list[dict] = []

    def record(name, ok, **info):
        entry = {"check": name, "ok": ok, **info}
        records.append(entry)
        print(json.dumps(entry, default=str), flush=True)

    if device == "cuda" and not torch.cuda.is_available():
        record("cuda_available", False, reason="torch.cuda.is_available() is False")
        return records
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    max_new = 12
    prompts = _prompts()
    requests = [GenerationRequest(request_id=f"r{i}", prefix_ids=p, sampling=SamplingParams(max_new_tokens=max_new))
                for i, p in enumerate(prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _build_tiny_model(tmp)

        # 1. in-process
        try:
            model, expected = _reference(model_dir, device, prompts, max_new)
            ctx = RankContext(model=model, device=torch.device(device), eos_token_ids=frozenset({2}))
            results = [r[0] for r in generate_batch(ctx, requests)]
            metrics_ok = all(
                (r.memory_kind == "cuda_max_allocated" and r.gpu_time_s and r.gpu_time_s > 0)
                if device == "cuda" else (r.memory_kind == "cpu_peak_rss" and r.gpu_time_s is None)
                for r in results
            )
            record("in_process_tokens_and_metrics", [r.output_ids for r in results] == expected and metrics_ok,
                   tokens_match=[r.output_ids for r in results] == expected, metrics_ok=metrics_ok,
                   gpu_time_s=[r.gpu_time_s for r in results], peak_memory_bytes=results[0].peak_memory_bytes,
                   memory_kind=results[0].memory_kind)
            del model, ctx
        except Exception:  # noqa: BLE001 - reported
            record("in_process_tokens_and_metrics", False, error=traceback.format_exc(limit=5))
            return records

        # 2. engine
        try:
            import ray
        except ImportError as error:
            record("engine", None, skipped=f"ray is not installed here ({error}); carry a wheel to run this stage")
            return records
        tp = min(2, gpus) if device == "cuda" else 2
        if tp > 1:
            try:
                import deepspeed  # noqa: F401
            except ImportError as error:
                record("engine_tp2", None, skipped=f"deepspeed is not installed ({error}); running tp_size=1 only")
                tp = 1
        from pipeline.config.engine import EngineConfig
        from pipeline.config.model import ModelSpec
        from pipeline.engine import ReplicaPool
        from pipeline.engine.requests import PROMPT_TOO_LONG

        ray.init(num_cpus=max(4, tp + 1), num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        try:
            for dtype in ("float32", "bfloat16" if device == "cuda" else "float32"):
                name = f"engine_tp{tp}_{dtype}"
                config = EngineConfig(model_spec=ModelSpec(model=model_dir, dca=DCA, dtype=dtype), tp_size=tp,
                                      device=device, max_input_tokens=200, placement_timeout_s=60)
                start = time.perf_counter()
                try:
                    with ReplicaPool(config) as pool:
                        load_s = time.perf_counter() - start
                        results = [r[0] for r in pool.run(requests, max_in_flight=3)]
                        results.sort(key=lambda r: r.request_id)
                        too_long = pool.submit(GenerationRequest(request_id="long", prefix_ids=[5] * 300)).result()
                        stats = pool.stats()
                    tokens = [r.output_ids for r in results]
                    kind = "cuda_max_allocated" if device == "cuda" else "cpu_peak_rss"
                    metrics_ok = all(
                        r.status == "ok" and r.memory_kind == kind and len(r.peak_memory_per_rank) == tp
                        and (r.gpu_time_s is not None) == (device == "cuda") for r in results
                    )
                    compare = dtype == "float32"
                    ok = metrics_ok and too_long[0].error_type == PROMPT_TOO_LONG and (tokens == expected or not compare)
                    record(name, ok, tokens_match=tokens == expected if compare else "not compared (bf16)",
                           tokens=tokens if not compare else None, metrics_ok=metrics_ok, load_s=load_s,
                           gpu_time_s=[r.gpu_time_s for r in results],
                           peak_memory_per_rank=results[0].peak_memory_per_rank,
                           too_long=too_long[0].error_type, stats=stats)
                except Exception:  # noqa: BLE001 - reported
                    record(name, False, error=traceback.format_exc(limit=8))
                if device != "cuda":
                    break
        finally:
            ray.shutdown()
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description="GPU check of the engine")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    records = run_checks(args.device)
    failed = [r["check"] for r in records if r["ok"] is False]
    skipped = [r["check"] for r in records if r["ok"] is None]
    print(json.dumps({"summary": "engine GPU check", "device": args.device, "failed": failed, "skipped": skipped}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

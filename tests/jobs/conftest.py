"""Fixtures for the data-plane and job tests: a tiny random Llama with a word-level tokenizer (with
and without a chat template), generated Parquet corpora with bad rows, and a fake engine pool."""

from __future__ import annotations

import os
import random
import sys
import threading
from collections import deque

import pytest

# Before anything imports ray (its auth mode is read at import): the clusters these tests start
# and the clients that talk to them both use token authentication (Ray 2.60's default for local).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# A cluster named by the developer's shell (RAY_ADDRESS, e.g. the dashboard tunnel of a real
# cluster) must never receive test work: code under test that reads it sees none.
os.environ.pop("RAY_ADDRESS", None)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 128
TINY_DCA = {"pretraining_length": 64, "chunk_size": 48, "local_window": 8}
# Roles as in-vocabulary words (system w110, user w111, assistant w112) so decoded prompts read back.
CHAT_TEMPLATE = (
    "{% set role = {'system': 'w110', 'user': 'w111', 'assistant': 'w112'} %}"
    "{% for m in messages %}<s> {{ role[m['role']] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> w112 {% endif %}"
)


def build_tiny_model(directory: str, *, chat: bool, seed: int = 0) -> str:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if not chat:  # a base model's tokenizer adds BOS, like Llama's
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_chat")), chat=True)


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_base")), chat=False, seed=1)


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(n))


def write_corpus(path: str, n_docs: int, *, seed: int = 0, bad_rows: bool = True, qa: bool = False,
                 min_words: int = 20, max_words: int = 200, files: int = 2, id_prefix: str = "doc") -> list[str]:
    """Writes `files` Parquet files under directory `path`; returns the ids of the valid documents.

    Bad rows (bad_rows=True): a null text, an empty text, a duplicate id, a null id, and for QA a
    document with an empty questions list and one with a null question among good ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)
    rows = []
    for i in range(n_docs):
        row = {"id": f"{id_prefix}{i:04d}", "text": words(rng, rng.randint(min_words, max_words))}
        if qa:
            row["questions"] = [words(rng, rng.randint(2, 5)) for _ in range(rng.randint(1, 3))]
        rows.append(row)
    valid = [r["id"] for r in rows]
    if bad_rows:
        extra = [
            {"id": "bad-null-text", "text": None},
            {"id": "bad-empty-text", "text": "   "},
            {"id": rows[0]["id"], "text": "w5 w6 w7 duplicate"},
            {"id": None, "text": "w5 w6 w7 no id"},
        ]
        if qa:
            for r in extra:
                r["questions"] = ["w9 w10"]
            extra += [
                {"id": "bad-no-questions", "text": words(rng, 30), "questions": []},
                {"id": "partly-bad-questions", "text": words(rng, 30), "questions": ["w11 w12", None, "w13"]},
            ]
            valid.append("partly-bad-questions")
        rows[len(rows) // 2:len(rows) // 2] = extra
    schema = [("id", pa.string()), ("text", pa.string())] + ([("questions", pa.list_(pa.string()))] if qa else [])
    per_file = -(-len(rows) // files)
    for f in range(files):
        chunk = rows[f * per_file:(f + 1) * per_file]
        if chunk:
            pq.write_table(pa.Table.from_pylist(chunk, schema=pa.schema(schema)), os.path.join(path, f"part{f}.parquet"))
    return valid


class FakePool:
    """Stands in for pipeline.engine.ReplicaPool: answers in a scrambled order, honours max_in_flight,
    optionally fails some requests, and records the largest number in flight."""

    def __init__(self, *, fail_ids=(), delay_s: float = 0.0, seed: int = 0) -> None:
        self.fail_ids = set(fail_ids)
        self.delay_s = delay_s
        self.rng = random.Random(seed)
        self.max_seen_in_flight = 0
        self.order: list[str] = []
        self.prompt_tokens: list[int] = []
        self.requests: list = []
        self.stopped = False

    def _answer(self, request):
        from pipeline.engine.requests import GenerationResult

        if self.delay_s:
            threading.Event().wait(self.delay_s)
        out = []
        for i, suffix in enumerate(request.suffix_ids):
            prompt = len(request.prefix_ids) + len(suffix)
            if request.request_id in self.fail_ids:
                out.append(GenerationResult.error(request.request_id, i, "out_of_memory", "fake OOM",
                                                  prompt_tokens=prompt, replica="fake-0"))
            else:
                out.append(GenerationResult(
                    request_id=request.request_id, suffix_index=i, output=f"answer {i} to {prompt} tokens",
                    prompt_tokens=prompt, output_tokens=4, prefill_s=prompt * 1e-4, decode_s=0.01,
                    wall_time_s=prompt * 1e-4 + 0.01, peak_memory_bytes=1000 + prompt,
                    memory_kind="cpu_peak_rss", peak_memory_per_rank=[1000 + prompt],
                    device_seconds_all_ranks=prompt * 1e-4 + 0.01, replica="fake-0",
                ))
        return out

    def run(self, requests, max_in_flight):
        in_flight: deque = deque()
        for request in requests:
            if request is None:  # the source waits for a result (ReplicaPool.run's contract)
                if not in_flight:
                    raise RuntimeError("the request source waits for a result while no request is in flight")
                yield self._answer(in_flight.popleft())
                continue
            self.order.append(request.request_id)
            self.prompt_tokens.append(request.prompt_tokens)
            self.requests.append(request)
            in_flight.append(request)
            self.max_seen_in_flight = max(self.max_seen_in_flight, len(in_flight))
            if len(in_flight) >= max_in_flight:
                # complete a random one of those in flight
                victim = in_flight[self.rng.randrange(len(in_flight))]
                in_flight.remove(victim)
                yield self._answer(victim)
        while in_flight:
            yield self._answer(in_flight.popleft())

    def stats(self):
        return {"fake": True}

    def shutdown(self):
        self.stopped = True


def load_tiny_tokenizer(model_dir: str):
    from pipeline.config.model import ModelSpec
    from pipeline.engine.models import load_tokenizer

    return load_tokenizer(ModelSpec(model=model_dir, dca=TINY_DCA))


def job_env(tmp_path) -> dict:
    """Environment for job subprocesses: this repo importable, a private local Ray, token auth."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_ADDRESS"] = "local"
    env["RAY_AUTH_MODE"] = "token"
    env.pop("RAY_JOB_CONFIG_JSON_ENV_VAR", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


PYTHON = sys.executable

"""Long-context evaluation: passkey retrieval and long-text perplexity, plain model vs DCA.

Two tasks, each run for every (variant, length) of an `EvalConfig`:

- passkey: a random 5-digit key hidden at a chosen depth of filler text (real book text or the
  classic repeated sentences), the question at the end, a greedy answer of a few tokens, exact
  match on the first number of the answer.
- perplexity: contiguous windows of n tokens from public-domain books; perplexity over the whole
  window and over its last quarter. The loss is computed slice by slice from the base model's
  hidden states, so no (n, vocab) logits tensor is ever built.

The weights are loaded once; each variant is a deep copy with its own DCA settings. Passkey answers
come from the engine's generation path (`pipeline.engine`), the code the jobs run: in process for
one rank, an engine replica per variant for tensor parallelism (`run_evaluation_tp`). A DCA variant
whose result is provably the plain model's (DCA equals plain attention up to chunk_size + 1
tokens, and the temperature is 1 up to pretraining_length) is not recomputed: its record says
`same_as`. Results are rewritten after every record, so a run that is stopped keeps what it did.

Driver-side imports are light: torch, transformers and `dca` are imported inside the functions
that run a model; plotting imports matplotlib inside `write_plots`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config_files import reject_unknown_fields
from pipeline.models import ModelSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXTS_DIR = REPO_ROOT / "data" / "texts"
TASKS = ("perplexity", "passkey")
FILLERS = ("book", "repeat")

# The classic passkey harness (Mohtashami & Jaggi 2023; the DCA paper's passkey script).
PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One model setting under evaluation: the plain model (dca=None) or DCA with given fields."""

    # Short label used in results and plots ("plain", "dca", "dca_alpha0.1").
    name: str
    # DCAConfig fields; None = plain model. pretraining_length defaults to the model's
    # max_position_embeddings.
    dca: dict | None = None
    # Evaluate this variant only at lengths <= max_length (None: all lengths).
    max_length: int | None = None
    # Evaluate this variant only at lengths <= the model's max_position_embeddings (the ablation
    # of a small pretraining_length is about lengths the model handles natively).
    native_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise ValueError(f"variant name must be letters, digits, '_', '.', '-', got {self.name!r}")
        if self.dca is not None and not isinstance(self.dca, dict):
            raise ValueError(f"variant {self.name}: dca must be None (plain) or a dict of DCAConfig fields")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length <= 0):
            raise ValueError(f"variant {self.name}: max_length must be a positive int or None")

    @classmethod
    def from_dict(cls, values: dict) -> Variant:
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What to evaluate. `quick()` and `full()` are the two presets; `from_file` loads JSON."""

    # The model to load (its `dca` field is ignored: variants say which DCA settings to use).
    model: ModelSpec = field(default_factory=lambda: ModelSpec(dca=None))
    # Model settings to compare, all on the same weights.
    variants: tuple[Variant, ...] = (Variant(name="plain"), Variant(name="dca", dca={}))
    # Sequence lengths in tokens (prompt length for passkey, window length for perplexity).
    lengths: tuple[int, ...] = (4096, 8192, 16384)
    # Tasks to run, in this order within each length.
    tasks: tuple[str, ...] = TASKS
    # Passkey: depth of the key as a fraction of the filler (0 = right after the instruction).
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    # Passkey: one random key (and book offset) per seed.
    seeds: tuple[int, ...] = (0, 1)
    # Passkey filler kinds: "book" (real text) and/or "repeat" (the classic repeated sentences).
    fillers: tuple[str, ...] = ("repeat", "book")
    # Passkey: new tokens generated greedily for the answer.
    answer_tokens: int = 12
    # Perplexity: windows per length; window w is taken from book w % len(books).
    windows: int = 2
    # Books (file names under data/texts/, or absolute paths) for perplexity windows and passkey
    # book filler.
    books: tuple[str, ...] = ("plrabn12.txt", "lcet10.txt", "alice29.txt")
    # Perplexity: tokens per slice of the lm_head + cross-entropy computation.
    loss_slice: int = 1024
    # Perplexity: mean loss is also recorded per bucket of this many positions (0: off).
    position_bucket: int = 1024
    # Reuse the plain (or an equal DCA) result where DCA provably gives the same numbers.
    skip_identical: bool = True
    # torch intra-op threads (None: torch's default).
    threads: int | None = None
    # "cpu", "cuda", or None (cuda if available).
    device: str | None = None

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("at least one variant is needed")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if not self.lengths or any(not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ValueError(f"lengths must be ints >= 64, got {self.lengths}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")
        bad = [f for f in self.fillers if f not in FILLERS]
        if bad:
            raise ValueError(f"fillers must be a subset of {FILLERS}, got {self.fillers}")
        if self.answer_tokens < 1 or self.windows < 0 or self.loss_slice < 1 or self.position_bucket < 0:
            raise ValueError("answer_tokens and loss_slice must be >= 1, windows and position_bucket >= 0")
        if not self.books:
            raise ValueError("at least one book is needed")

    @classmethod
    def quick(cls, **overrides) -> EvalConfig:
        """Under 10 minutes on 2 CPU cores with SmolLM2-135M: one sample per cell, 4k and 12k."""
        values = dict(lengths=(4096, 12288), depths=(0.5,), seeds=(0,), fillers=("repeat",), windows=1)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def full(cls, **overrides) -> EvalConfig:
        """Half to twice SmolLM2's training length, two alphas, and the pretraining_length ablation."""
        values = dict(
            variants=(
                Variant(name="plain"),
                Variant(name="dca", dca={"temperature_alpha": 0.0}),
                Variant(name="dca_alpha0.1", dca={"temperature_alpha": 0.1}),
                Variant(name="dca_p2048", dca={"pretraining_length": 2048}, native_only=True),
            ),
            lengths=(4096, 8192, 16384),
        )
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> EvalConfig:
        values = dict(values)
        reject_unknown_fields(cls, values)
        if "model" in values and isinstance(values["model"], dict):
            values["model"] = ModelSpec.from_dict(values["model"])
        if "variants" in values:
            values["variants"] = tuple(v if isinstance(v, Variant) else Variant.from_dict(v) for v in values["variants"])
        for key in ("lengths", "tasks", "depths", "seeds", "fillers", "books"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> EvalConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# --------------------------------------------------------------------------------------------
# Texts and prompts (token id lists; no torch needed)


def read_book(name: str, texts_dir: str | os.PathLike | None = None) -> str:
    """Text of a book: a file name under data/texts/ (or `texts_dir`), or an absolute path."""
    path = Path(name) if Path(name).is_absolute() else Path(texts_dir or TEXTS_DIR) / name
    if not path.is_file():
        available = sorted(p.name for p in Path(texts_dir or TEXTS_DIR).glob("*.txt"))
        raise FileNotFoundError(f"book {name!r} not found in {path.parent}; available: {available}")
    return path.read_text(encoding="utf-8", errors="replace")


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text (a BOS token for Llama-2; none for SmolLM2)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = encode(tokenizer, "a")
    if with_special[-len(plain):] == plain:
        return with_special[: len(with_special) - len(plain)]
    return []


def make_passkey(seed: int) -> str:
    """The random 5-digit key of a seed (10000..99999)."""
    return str(random.Random(seed).randint(10000, 99999))


def filler_ids(tokenizer, kind: str, n_tokens: int, seed: int, book_ids: dict[str, list[int]]) -> list[int]:
    """`n_tokens` filler ids: repeated classic sentences, or a contiguous span of a book chosen by seed."""
    if n_tokens <= 0:
        return []
    if kind == "repeat":
        unit = encode(tokenizer, REPEAT_FILLER)
        reps = n_tokens // len(unit) + 1
        return (unit * reps)[:n_tokens]
    if kind != "book":
        raise ValueError(f"filler must be one of {FILLERS}, got {kind!r}")
    names = sorted(book_ids)
    rng = random.Random(1_000_003 + seed)
    long_enough = [b for b in names if len(book_ids[b]) >= n_tokens]
    if long_enough:
        ids = book_ids[long_enough[rng.randrange(len(long_enough))]]
        start = rng.randrange(len(ids) - n_tokens + 1)
        return ids[start : start + n_tokens]
    joined = [t for b in names for t in book_ids[b]]  # books shorter than the filler: concatenate
    reps = n_tokens // len(joined) + 1
    return (joined * reps)[:n_tokens]


@dataclass(frozen=True)
class PasskeyPrompt:
    input_ids: list[int]
    key: str
    # Token index where the needle sentence starts, and the depth actually achieved
    # (fraction of the filler tokens before the needle).
    needle_start: int
    depth: float


def build_passkey_prompt(
    tokenizer, length: int, depth: float, key: str, filler: list[int] | None = None, *,
    kind: str = "repeat", seed: int = 0, book_ids: dict[str, list[int]] | None = None,
) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens: instruction, filler with the needle at `depth`, question.

    `filler` (token ids, at least as long as needed) overrides `kind`/`seed`/`book_ids`. The depth
    is the fraction of filler tokens placed before the needle, rounded to a token.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = leading_special_ids(tokenizer) + encode(tokenizer, PASSKEY_INSTRUCTION)
    needle = encode(tokenizer, PASSKEY_NEEDLE.format(key=key))
    question = encode(tokenizer, PASSKEY_QUESTION)
    budget = length - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(
            f"length {length} is too short for the passkey prompt: the instruction, needle and question "
            f"alone take {length - budget} tokens"
        )
    if filler is None:
        filler = filler_ids(tokenizer, kind, budget, seed, book_ids or {})
    if len(filler) < budget:
        raise ValueError(f"filler has {len(filler)} tokens, {budget} needed")
    before = round(depth * budget)
    ids = head + filler[:before] + needle + filler[before:budget] + question
    assert len(ids) == length
    return PasskeyPrompt(ids, key, len(head) + before, before / budget if budget else 0.0)


def passkey_correct(answer: str, key: str) -> bool:
    """Exact match: the first number in the answer is the key (digits only, nothing more or less)."""
    match = re.search(r"\d+", answer)
    return bool(match) and match.group() == key


def perplexity_windows(book_ids: dict[str, list[int]], books: tuple[str, ...], length: int, count: int):
    """`count` windows of `length` token ids: window w from book w % len(books), starting at the
    book's token (w // len(books)) * length, so shorter windows are prefixes of longer ones.
    Books shorter than a window are skipped. -> list of (book, start, ids)."""
    candidates = [b for b in books if len(book_ids[b]) >= length]
    windows = []
    w = 0
    while len(windows) < count and candidates:
        book = candidates[w % len(candidates)]
        start = (w // len(candidates)) * length
        ids = book_ids[book]
        if start + length > len(ids):
            break
        windows.append((book, start, ids[start : start + length]))
        w += 1
    return windows


# --------------------------------------------------------------------------------------------
# Model-side computations (import torch lazily)


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


def greedy_answer(model, tokenizer, input_ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of a prompt through the engine's generation path in this process (the
    rank-side code a replica of tp_size 1 runs: continuous batching for a DCA model, the static
    path otherwise), so passkey answers come from the production code, not `model.generate`."""
    return _InProcess(model, tokenizer).answer(input_ids, max_new_tokens)


def _engine_request(input_ids: list[int], max_new_tokens: int):
    from pipeline.requests import GenerationRequest, SamplingParams

    return GenerationRequest(request_id="passkey", prefix_ids=[int(t) for t in input_ids],
                             sampling=SamplingParams(max_new_tokens=max_new_tokens))


def _answer_text(result) -> str:
    if result.status != "ok":
        raise RuntimeError(f"the engine could not answer a passkey prompt: {result.error_type}: {result.error_message}")
    return result.output


class _InProcess:
    """One variant's model in this process, run through the engine's rank-side code."""

    def __init__(self, model, tokenizer):
        from pipeline.engine.generation import RankContext

        eos = set()
        for source in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None),
                       model.config.eos_token_id):
            eos.update(source if isinstance(source, (list, tuple)) else [source] if source is not None else [])
        pad = getattr(tokenizer, "pad_token_id", None)
        self.ctx = RankContext(model=model, device=next(model.parameters()).device, tokenizer=tokenizer,
                               eos_token_ids=frozenset(eos), pad_token_id=pad if pad is not None else 0)

    def info(self) -> dict:
        return _rank_model_info(self.ctx)

    def nll(self, input_ids, loss_slice: int):
        return sequence_nll(self.ctx.model, input_ids, loss_slice)

    def answer(self, input_ids: list[int], max_new_tokens: int) -> str:
        from pipeline.engine.continuous import generate_in_process

        ((result,),) = generate_in_process(self.ctx, [_engine_request(input_ids, max_new_tokens)])
        return _answer_text(result)


class _OnReplica:
    """One variant served by an engine replica (`ReplicaPool`, tensor parallelism): passkey
    answers are requests to it; perplexity runs `sequence_nll` on its ranks' shards."""

    def __init__(self, pool):
        self.pool = pool

    def info(self) -> dict:
        return {**self.pool.call_ranks(_rank_model_info), "tp_size": self.pool.config.tp_size}

    def nll(self, input_ids, loss_slice: int):
        return self.pool.call_ranks(_rank_sequence_nll, [int(t) for t in input_ids], loss_slice)

    def answer(self, input_ids: list[int], max_new_tokens: int) -> str:
        (result,) = self.pool.submit(_engine_request(input_ids, max_new_tokens)).result()
        return _answer_text(result)


def _rank_sequence_nll(ctx, input_ids: list[int], loss_slice: int):
    """On every rank of a replica (their all-reduces meet): the NLL of the rank's model shard."""
    return sequence_nll(ctx.model, input_ids, loss_slice)


def _rank_model_info(ctx) -> dict:
    model = ctx.model
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": str(next(model.parameters()).device), "model_type": getattr(model.config, "model_type", None),
            "max_position_embeddings": int(model.config.max_position_embeddings)}


# --------------------------------------------------------------------------------------------
# The evaluation run


def resolved_dca(variant: Variant, max_position_embeddings: int):
    """The DCAConfig of a variant on a model, or None for the plain model."""
    if variant.dca is None:
        return None
    from dca import DCAConfig

    values = dict(variant.dca)
    values.setdefault("pretraining_length", int(max_position_embeddings))
    return DCAConfig.from_dict(values)


def equivalence_key(dca_config, length: int, extra_tokens: int = 0):
    """Variants with equal keys give identical results on sequences of `length` (+ decoded) tokens.

    DCA equals plain attention for sequences up to chunk_size + 1 tokens (spec section 2), and the
    temperature factor is 1 for prompts up to pretraining_length (section 5).
    """
    if dca_config is None or length + extra_tokens <= dca_config.chunk_size + 1:
        return ("plain",)
    alpha = dca_config.temperature_alpha if length > dca_config.pretraining_length else 0.0
    return ("dca", dca_config.pretraining_length, dca_config.chunk_size, dca_config.local_window, alpha)


def git_commit(repo: Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "pipeline/evaluation.py", "jobs/evaluate.py", "dca"],
            cwd=repo, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class ResultWriter:
    """Keeps the results of a run and rewrites results.json / results.csv after every record."""

    CSV_FIELDS = (
        "task", "variant", "length", "depth", "seed", "filler", "window", "book", "start",
        "ppl", "ppl_last_quarter", "nll", "nll_last_quarter", "key", "answer", "correct",
        "needle_start", "seconds", "same_as",
    )

    def __init__(self, out_dir: str | os.PathLike, meta: dict, write: bool = True):
        self.out_dir = Path(out_dir)
        self.write = write
        if write:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.flush()

    def flush(self) -> None:
        if not self.write:
            return
        data = {"meta": self.meta, "records": self.records}
        tmp = self.out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.out_dir / "results.json")
        with open(self.out_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for r in self.records:
                writer.writerow(r)


def resumed_meta(old: dict, meta: dict, out_dir: str | os.PathLike) -> dict:
    """Folds the meta of the run being resumed into `meta` (in place) and refuses a resume that
    would mix incomparable records: another model, or a variant name now meaning other settings.

    The variants of both runs stay described (a stage may run a subset of them), and the earlier
    run's commit, dates and config go to `previous_runs`."""
    if old.get("model") is not None and old["model"] != meta["model"]:
        raise ValueError(f"{out_dir} holds results of model {old['model']!r}; cannot resume it with {meta['model']!r}")
    new_variants = json.loads(json.dumps(meta["variants"], default=str))
    for name, settings in old.get("variants", {}).items():
        if name in new_variants and new_variants[name] != settings:
            raise ValueError(
                f"{out_dir}: variant {name!r} was run with {settings}, now {new_variants[name]}; "
                "give the new settings another variant name or use another output directory"
            )
    meta["previous_runs"] = old.get("previous_runs", []) + [
        {k: old.get(k) for k in ("commit", "date", "finished", "torch_threads", "variants", "config")}
    ]
    meta["variants"] = {**old.get("variants", {}), **meta["variants"]}
    return meta


def record_identity(record: dict) -> tuple:
    """What makes a record unique in a run: task, variant, length and the sample's coordinates."""
    return tuple(record.get(k) for k in ("task", "variant", "length", "window", "depth", "seed", "filler"))


def _samples(config: EvalConfig, tokenizer, book_ids, task: str, length: int, log):
    """-> list of (info dict, token ids, tokens generated after the ids) for one task and length."""
    if task == "perplexity":
        windows = perplexity_windows(book_ids, config.books, length, config.windows)
        if len(windows) < config.windows:
            log(f"perplexity {length}: only {len(windows)} windows of the books are long enough")
        return [(dict(window=w, book=book, start=start), ids, 0) for w, (book, start, ids) in enumerate(windows)]
    samples = []
    # Filler outermost: the first rounds of a breadth-first run cover every depth with one filler.
    for filler in config.fillers:
        for seed in config.seeds:
            for depth in config.depths:
                key = make_passkey(seed)
                prompt = build_passkey_prompt(tokenizer, length, depth, key, kind=filler, seed=seed, book_ids=book_ids)
                info = dict(depth=depth, seed=seed, filler=filler, key=key, needle_start=prompt.needle_start)
                samples.append((info, prompt.input_ids, config.answer_tokens))
    return samples


def run_evaluation(
    config: EvalConfig, out_dir: str | os.PathLike, *, model=None, tokenizer=None, resume: bool = False,
    runners: dict | None = None, write: bool = True, log=print,
) -> dict:
    """Runs every task of `config`, writes results.json, results.csv and the plots to `out_dir`.

    `resume`: keep the records of an earlier (stopped) run in `out_dir` and compute only the rest.
    `runners`: {variant name: runner} serving the variants elsewhere (`run_evaluation_tp`: engine
    replicas); then `model` is unused. Otherwise each variant is a copy of `model` (with its DCA
    settings) in this process, run through the engine's rank-side code.
    `write`: False to compute without writing files.

    `model` / `tokenizer` may be passed in (tests: a tiny random model); otherwise they are loaded
    from `config.model`, once. Returns the results dict (meta + records).
    """
    import copy

    import torch

    from dca import apply_dca

    if config.threads:
        torch.set_num_threads(config.threads)
    t_load = time.time()
    if tokenizer is None:
        from pipeline.models import load_tokenizer

        tokenizer = load_tokenizer(config.model)
    if runners is not None:
        info = runners[config.variants[0].name].info()
    else:
        if model is None:
            from pipeline.models import load_model

            model = load_model(dataclasses.replace(config.model, dca=None), device=config.device)
        model.eval()
        info = _rank_model_info(_InProcess(model, tokenizer).ctx)
    max_pos = info["max_position_embeddings"]
    log(f"model loaded in {time.time() - t_load:.1f}s (max_position_embeddings={max_pos})")

    dca_configs = {v.name: resolved_dca(v, max_pos) for v in config.variants}
    if runners is None:
        runners = {}
        for v in config.variants:
            variant_model = model if dca_configs[v.name] is None else apply_dca(copy.deepcopy(model), dca_configs[v.name])
            runners[v.name] = _InProcess(variant_model, tokenizer)

    meta = {
        "model": config.model.model,
        "model_type": info["model_type"],
        "max_position_embeddings": max_pos,
        # Of the model, or of one tensor-parallel rank's shard (tp_size > 1).
        "parameters": info["parameters"],
        "dtype": info["dtype"],
        "device": info["device"],
        "tp_size": info.get("tp_size", 1),
        # Passkey answers come from the engine's generation path (pipeline.engine).
        "generation": "pipeline.engine" + (" replica" if info.get("tp_size", 1) > 1 else " in process"),
        "variants": {
            v.name: {"dca": dca_configs[v.name].to_dict() if dca_configs[v.name] else None,
                     "max_length": v.max_length, "native_only": v.native_only}
            for v in config.variants
        },
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        "prompt": {"instruction": PASSKEY_INSTRUCTION, "needle": PASSKEY_NEEDLE, "question": PASSKEY_QUESTION,
                   "repeat_filler": REPEAT_FILLER},
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "finished": None,
    }
    writer = ResultWriter(out_dir, meta, write=write)
    if resume and (Path(out_dir) / "results.json").is_file():
        previous = json.loads((Path(out_dir) / "results.json").read_text(encoding="utf-8"))
        writer.records = list(previous.get("records", []))
        resumed_meta(previous.get("meta", {}), meta, out_dir)
        log(f"resuming: {len(writer.records)} records already in {out_dir}")
    done_ids = {record_identity(r) for r in writer.records}
    book_ids = {b: encode(tokenizer, read_book(b)) for b in config.books}

    # Breadth first: round r holds the r-th sample of every (length, task), so a run stopped
    # early still has every cell covered by its first samples.
    plan = []
    for li, length in enumerate(sorted(config.lengths)):
        for ti, task in enumerate(config.tasks):
            for r, (info, ids, extra) in enumerate(_samples(config, tokenizer, book_ids, task, length, log)):
                plan.append(((r, li, ti), task, length, info, ids, extra))
    plan.sort(key=lambda item: item[0])

    for _, task, length, info, ids, extra in plan:
        active = [
            v for v in config.variants
            if (v.max_length is None or length <= v.max_length) and (not v.native_only or length <= max_pos)
        ]
        done: dict = {}  # equivalence key -> variant computed for this sample
        for v in active:
            eq = equivalence_key(dca_configs[v.name], length, extra)
            record = {"task": task, "variant": v.name, "length": length, **info}
            identity = record_identity(record)
            if identity in done_ids:
                prior = next(r for r in writer.records if record_identity(r) == identity)
                if not prior.get("same_as"):
                    done.setdefault(eq, v.name)
                continue
            if config.skip_identical and eq in done:
                src_id = record_identity({**record, "variant": done[eq]})
                src = next(r for r in writer.records if record_identity(r) == src_id)
                copied = {k: src[k] for k in src if k not in ("variant", "same_as", "seconds")}
                writer.add({**copied, "variant": v.name, "same_as": done[eq], "seconds": 0.0})
                done_ids.add(identity)
                continue
            t0 = time.time()
            if task == "perplexity":
                nll = runners[v.name].nll(ids, config.loss_slice)
                record.update(perplexity_summary(nll, length, config.position_bucket))
                what = f"ppl {record['ppl']:.3f} last-quarter {record['ppl_last_quarter']:.3f}"
            else:
                answer = runners[v.name].answer(ids, config.answer_tokens)
                record.update(answer=answer, correct=passkey_correct(answer, info["key"]))
                what = f"answer {answer!r} key {info['key']} correct={record['correct']}"
            record["seconds"] = round(time.time() - t0, 2)
            record["same_as"] = None
            done[eq] = v.name
            done_ids.add(identity)
            writer.add(record)
            where = {k: info[k] for k in info if k in ("window", "book", "depth", "seed", "filler")}
            log(f"{task} n={length} {v.name} {where}: {what} ({record['seconds']:.1f}s)")
    writer.meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    writer.flush()
    results = {"meta": writer.meta, "records": writer.records}
    if write:
        write_plots(results, out_dir)
        write_summary(results, out_dir)
    return results


# --------------------------------------------------------------------------------------------
# Tensor parallelism: each variant served by an engine replica (Ray actors, DeepSpeed AutoTP)


def run_evaluation_tp(
    config: EvalConfig, out_dir: str | os.PathLike, tp_size: int, *, resume: bool = False, tokenizer=None
) -> dict:
    """`run_evaluation` with every variant served by an engine replica of `tp_size` ranks
    (`pipeline.engine.ReplicaPool`: the production rank workers, DeepSpeed AutoTP over gloo on
    CPU, nccl on CUDA): passkey answers are engine requests, perplexity runs on the ranks' shards.
    Starts a private local Ray when none is initialised (and stops it at the end).

    Every variant holds its own replica (DCA is applied before sharding, as the engine does), so
    memory grows with the number of variants: keep few of them for large models.
    """
    import ray

    from pipeline.engine import EngineConfig, ReplicaPool

    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    started = not ray.is_initialized()
    if started:
        cpus = config.threads or 1
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, tp_size * cpus * len(config.variants)),
                 include_dashboard=False, log_to_driver=False)
    pools = {}
    try:
        for v in config.variants:
            spec = dataclasses.replace(config.model, dca=v.dca)
            engine = EngineConfig(
                model_spec=spec, tp_size=tp_size, max_input_tokens=max(config.lengths) + config.answer_tokens,
                cpus_per_rank=config.threads or 1, device=config.device or "auto", request_timeout_s=None,
            )
            pools[v.name] = ReplicaPool(engine).start()
        if tokenizer is None:
            from pipeline.models import load_tokenizer

            tokenizer = load_tokenizer(config.model)
        runners = {name: _OnReplica(pool) for name, pool in pools.items()}
        return run_evaluation(dataclasses.replace(config, threads=None), out_dir, runners=runners, tokenizer=tokenizer,
                              resume=resume, log=lambda m: print(m, flush=True))
    finally:
        for pool in pools.values():
            pool.shutdown()
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------------------------
# Summaries and plots (from a results dict, so a stopped run can still be plotted)


def summarize(results: dict) -> dict:
    """{"perplexity": {variant: {length: (mean ppl, mean last-quarter ppl, windows)}},
        "passkey": {filler: {variant: {length: {depth: (correct, total)}}}}}.

    Perplexities are averaged over windows in log space (exp of the mean NLL). Passkey counts are
    kept apart per filler: a model can fail one filler at every length (SmolLM2-135M with book
    text) and pooling them would hide what length does to the other."""
    ppl: dict = {}
    pk: dict = {}
    for r in results["records"]:
        if r["task"] == "perplexity":
            ppl.setdefault(r["variant"], {}).setdefault(r["length"], []).append(r)
        else:
            by_variant = pk.setdefault(r["filler"], {})
            cell = by_variant.setdefault(r["variant"], {}).setdefault(r["length"], {}).setdefault(r["depth"], [0, 0])
            cell[0] += int(bool(r["correct"]))
            cell[1] += 1
    out_ppl = {
        v: {
            n: (math.exp(sum(r["nll"] for r in rs) / len(rs)),
                math.exp(sum(r["nll_last_quarter"] for r in rs) / len(rs)), len(rs))
            for n, rs in sorted(by_len.items())
        }
        for v, by_len in ppl.items()
    }
    out_pk = {
        f: {v: {n: {d: tuple(c) for d, c in sorted(by_d.items())} for n, by_d in sorted(by_len.items())}
            for v, by_len in by_variant.items()}
        # The repeated filler first: it is the one that measures length generalisation.
        for f, by_variant in sorted(pk.items(), key=lambda item: item[0] != "repeat")
    }
    return {"perplexity": out_ppl, "passkey": out_pk}


def summary_markdown(results: dict) -> str:
    """Markdown tables of perplexity, and of passkey accuracy per filler, per variant and length."""
    s = summarize(results)
    lines = []
    if s["perplexity"]:
        lengths = sorted({n for by_len in s["perplexity"].values() for n in by_len})
        lines += ["Perplexity, whole window / last quarter (windows averaged in log space; "
                  "number of windows in brackets):", "",
                  "| variant | " + " | ".join(f"{n}" for n in lengths) + " |",
                  "| --- |" + " --- |" * len(lengths)]
        for v, by_len in s["perplexity"].items():
            cells = [f"{by_len[n][0]:.2f} / {by_len[n][1]:.2f} ({by_len[n][2]})" if n in by_len else ""
                     for n in lengths]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    for filler, by_variant in s["passkey"].items():
        lengths = sorted({n for by_len in by_variant.values() for n in by_len})
        lines += [f"Passkey accuracy, {filler} filler (correct / total over depths and seeds):", "",
                  "| variant | " + " | ".join(f"{n}" for n in lengths) + " |",
                  "| --- |" + " --- |" * len(lengths)]
        for v, by_len in by_variant.items():
            cells = []
            for n in lengths:
                if n in by_len:
                    c = sum(x[0] for x in by_len[n].values())
                    t = sum(x[1] for x in by_len[n].values())
                    cells.append(f"{c}/{t}")
                else:
                    cells.append("")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def document_comparison(results: dict, *, split: int | None = None, block: int | None = None) -> str:
    """Plain model vs DCA on one document (a perplexity run with one window): perplexity before and
    after `split` (default: the model's max_position_embeddings, its trained length) and per block
    of `block` tokens past it (default: the run's position_bucket), side by side. Uses each
    record's nll_by_position, so the run's position_bucket must divide `split` and `block`."""
    records = [r for r in results["records"] if r["task"] == "perplexity" and r.get("nll_by_position")]
    if not records:
        raise ValueError("no perplexity record with nll_by_position: run with --tasks perplexity")
    length = records[0]["length"]
    bucket = results["meta"]["config"].get("position_bucket") or 0
    split = split or results["meta"].get("max_position_embeddings") or length
    block = block or bucket
    if not bucket or split % bucket or block % bucket:
        raise ValueError(f"position_bucket {bucket} must divide the split {split} and the block {block}")
    variants = list(dict.fromkeys(r["variant"] for r in records))
    by_variant = {v: next(r for r in records if r["variant"] == v) for v in variants}
    # Bucket b holds the losses of targets b * bucket + 1 .. (b + 1) * bucket (length - 1 targets).
    sizes = [min(bucket, length - 1 - b * bucket) for b in range((length - 2) // bucket + 1)]

    def ppl(variant: str, lo: int, hi: int) -> float | None:
        nll = by_variant[variant]["nll_by_position"]
        picked = [(nll[b], sizes[b]) for b in range(len(sizes)) if lo <= b * bucket < hi]
        total = sum(n for _, n in picked)
        return math.exp(sum(x * n for x, n in picked) / total) if total else None

    rows = [(f"tokens 0-{split:,} (trained length)", 0, split), (f"tokens {split:,}-{length:,} (past it)", split, length)]
    rows += [(f"  {lo:,}-{lo + block if lo + block < length - 1 else length:,}", lo, lo + block)
             for lo in range(split, length - 1, block)]
    name = Path(by_variant[variants[0]].get("book") or "?").name
    lines = [f"Perplexity of {results['meta'].get('model')} on {name} ({length:,} tokens), trained on "
             f"{results['meta'].get('max_position_embeddings') or '?':,} tokens (lower is better):", "",
             f"{'':34}" + "".join(f"{v:>10}" for v in variants)]
    for label, lo, hi in rows:
        cells = [ppl(v, lo, hi) for v in variants]
        lines.append(f"{label:34}" + "".join(f"{c:>10.1f}" if c is not None else f"{'-':>10}" for c in cells))
    return "\n".join(lines)


def write_summary(results: dict, out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir) / "summary.md"
    meta = results["meta"]
    head = (f"# Evaluation summary\n\nmodel `{meta['model']}`, commit `{meta['commit']}`, "
            f"date {meta['date']}, finished {meta.get('finished')}\n\n")
    path.write_text(head + summary_markdown(results), encoding="utf-8")
    return path


def write_plots(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    """perplexity.png (ppl vs length, whole window and last quarter), passkey.png (accuracy grid
    depth x length per filler and variant) and loss_by_position.png (mean loss per position
    bucket, one panel per length past the training length). Only the plots the records allow are
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter

    out_dir = Path(out_dir)
    s = summarize(results)
    max_pos = results["meta"].get("max_position_embeddings")
    model = results["meta"].get("model")
    paths = []

    if s["perplexity"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, idx, title in ((axes[0], 0, "whole window"), (axes[1], 1, "last quarter of the window")):
            for k, (v, by_len) in enumerate(s["perplexity"].items()):
                ns = sorted(by_len)
                # Line styles and sizes differ: variants with equal results (same_as) overlap.
                ax.plot(ns, [by_len[n][idx] for n in ns], marker="osD^v"[k % 5], ms=7 - k % 4,
                        ls=("-", "--", ":", "-.")[k % 4], label=v)
            if max_pos:
                ax.axvline(max_pos, color="grey", ls="--", lw=1, label=f"training length {max_pos}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            all_lengths = sorted({n for by_len in s["perplexity"].values() for n in by_len})
            ax.set_xticks(all_lengths, [str(n) for n in all_lengths])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("window length (tokens)")
            ax.set_ylabel("perplexity")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Perplexity vs length: plain vs DCA ({model})")
        fig.tight_layout()
        paths.append(out_dir / "perplexity.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        ppl_records = [r for r in results["records"] if r["task"] == "perplexity" and r.get("nll_by_position")]
        if ppl_records:
            # One panel per length past the training length (where the variants part ways), or the
            # longest length if none is.
            ppl_lengths = sorted({r["length"] for r in ppl_records})
            shown = [n for n in ppl_lengths if max_pos and n > max_pos] or ppl_lengths[-1:]
            bucket = results["meta"]["config"].get("position_bucket") or 1
            fig, axes = plt.subplots(1, len(shown), figsize=(7 * len(shown), 4.2), squeeze=False)
            for ax, n in zip(axes[0], shown):
                per_pos: dict = {}
                for r in ppl_records:
                    if r["length"] == n:
                        per_pos.setdefault(r["variant"], []).append(r["nll_by_position"])
                for j, (v, rows) in enumerate(per_pos.items()):
                    k = min(len(x) for x in rows)
                    mean = [sum(x[i] for x in rows) / len(rows) for i in range(k)]
                    ends = [min((i + 1) * bucket, n) for i in range(k)]  # the last bucket may be short
                    ax.plot(ends, mean, marker=".", ls=("-", "--", ":", "-.")[j % 4],
                            label=f"{v} ({len(rows)} window{'s' if len(rows) > 1 else ''})")
                if max_pos:
                    ax.axvline(max_pos, color="grey", ls="--", lw=1, label=f"training length {max_pos}")
                ax.set_xlabel(f"position (end of each {bucket}-token bucket)")
                ax.set_ylabel("mean loss (nats/token)")
                ax.set_title(f"Loss by position in {n}-token windows")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
            fig.tight_layout()
            paths.append(out_dir / "loss_by_position.png")
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)

    if s["passkey"]:
        # One row of grids per filler, one column per variant.
        fillers = list(s["passkey"])
        variants = list(dict.fromkeys(v for by_variant in s["passkey"].values() for v in by_variant))
        lengths = sorted({n for by_variant in s["passkey"].values() for by_len in by_variant.values() for n in by_len})
        depths = sorted({d for by_variant in s["passkey"].values() for by_len in by_variant.values()
                         for by_d in by_len.values() for d in by_d})
        fig, axes = plt.subplots(
            len(fillers), len(variants), squeeze=False,
            figsize=(2.2 + 1.3 * len(lengths) * len(variants), (2.4 + 0.3 * len(depths)) * len(fillers) + 0.8),
        )
        cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
        for row, filler in zip(axes, fillers):
            for ax, v in zip(row, variants):
                grid = [[float("nan")] * len(lengths) for _ in depths]
                labels = [[""] * len(lengths) for _ in depths]
                for j, n in enumerate(lengths):
                    for i, d in enumerate(depths):
                        cell = s["passkey"][filler].get(v, {}).get(n, {}).get(d)
                        if cell:
                            grid[i][j] = cell[0] / cell[1]
                            labels[i][j] = f"{cell[0]}/{cell[1]}"
                ax.imshow(np.ma.masked_invalid(np.array(grid)), cmap=cmap, vmin=0, vmax=1, aspect="auto")
                for i in range(len(depths)):
                    for j in range(len(lengths)):
                        ax.text(j, i, labels[i][j] or "-", ha="center", va="center", fontsize=9)
                ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
                ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
                ax.set_xlabel("prompt length (tokens)")
                ax.set_ylabel("key depth")
                ax.set_title(f"{v}, {filler} filler", fontsize=10)
        fig.suptitle(f"Passkey accuracy ({model})")
        fig.tight_layout()
        paths.append(out_dir / "passkey.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths

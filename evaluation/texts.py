"""Texts and prompts of the evaluation, as token id lists (no torch needed): public-domain books
for perplexity windows and passkey filler, and the classic passkey prompt."""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from evaluation.config import FILLERS

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXTS_DIR = REPO_ROOT / "data" / "texts"

# The classic passkey harness (Mohtashami & Jaggi 2023; the DCA paper's passkey script).
PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


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

"""Is a generated "summary" a summary, or the model continuing (or copying) the document?

A cheap, model-free check used by `benchmarks/summary_quality.py`:

- copied: the share of the output's word 6-grams that occur verbatim in the document. A summary
  paraphrases (names and short phrases recur, whole 6-word runs rarely do); a model that copies
  the text reproduces its sentences.
- source_lines: output lines laid out like the document's own lines: their first 3 words (numbers
  read as one symbol) begin at least 2 lines of the document. This is the tiny model writing
  more of the document instead of about it: "Ruth Chapter 5" / "1 And Naomi said unto her, ..."
  after a text of "Ruth Chapter N" headings and numbered verses.
- repetitive: the share of the output's word 4-grams that repeat an earlier 4-gram of the
  output (loops: "The King James Bible: 1 / The King James Bible: 2 / ...").

`check_summary` turns these into one label: "empty" (fewer than 5 words), "continuation"
(copied >= 0.3 or any source line), "repetitive" (repetitive >= 0.15), else "summary". The
thresholds were set by reading the outputs of the example corpus before and after the prompt
changes (benchmarks/results/summary_quality.md lists every output with its measures and label);
the check is a screen, not a judge of quality: a fluent but wrong summary is a "summary" here.

Pure Python, no heavy imports.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

LABELS = ("summary", "continuation", "repetitive", "empty")
COPY_N = 6
REPEAT_N = 4
LINE_START_N = 3
COPIED_THRESHOLD = 0.3
REPETITIVE_THRESHOLD = 0.15
SOURCE_LINE_MIN_MATCHES = 2
MIN_WORDS = 5

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased words, every number as "#" (so verse 7 and verse 12 look alike; punctuation and
    case ignored)."""
    return ["#" if w.isdigit() else w for w in _WORD.findall(text.lower())]


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@dataclass(frozen=True)
class SummaryCheck:
    label: str
    # Output words; share of output 6-grams found in the document; output lines laid out like
    # the document's lines; share of output 4-grams repeating an earlier one.
    words: int
    copied: float
    source_lines: int
    repetitive: float

    def to_dict(self) -> dict:
        return asdict(self)


class SourceIndex:
    """The document's word n-grams, built once and checked against any number of outputs."""

    def __init__(self, document: str, n: int = COPY_N) -> None:
        self.n = n
        self.ngrams = set(_ngrams(words(document), n))
        self.line_starts: dict[tuple[str, ...], int] = {}
        for line in document.splitlines():
            start = tuple(words(line)[:LINE_START_N])
            if len(start) == LINE_START_N:
                self.line_starts[start] = self.line_starts.get(start, 0) + 1

    def copied(self, tokens: list[str]) -> float:
        grams = _ngrams(tokens, self.n)
        if not grams:
            return 0.0
        return sum(g in self.ngrams for g in grams) / len(grams)

    def source_lines(self, text: str) -> int:
        """Lines of `text` that begin the way at least SOURCE_LINE_MIN_MATCHES document lines do."""
        count = 0
        for line in text.splitlines():
            start = tuple(words(line)[:LINE_START_N])
            count += len(start) == LINE_START_N and self.line_starts.get(start, 0) >= SOURCE_LINE_MIN_MATCHES
        return count


def repetitive(tokens: list[str], n: int = REPEAT_N) -> float:
    """Share of the n-grams that already occurred earlier in the same text."""
    grams = _ngrams(tokens, n)
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def check_summary(output: str | None, document: str | SourceIndex) -> SummaryCheck:
    """The label and the measures behind it for one output of one document."""
    index = document if isinstance(document, SourceIndex) else SourceIndex(document)
    tokens = words(output or "")
    copied = index.copied(tokens)
    lines = index.source_lines(output or "")
    rep = repetitive(tokens)
    if len(tokens) < MIN_WORDS:
        label = "empty"
    elif copied >= COPIED_THRESHOLD or lines:
        label = "continuation"
    elif rep >= REPETITIVE_THRESHOLD:
        label = "repetitive"
    else:
        label = "summary"
    return SummaryCheck(label=label, words=len(tokens), copied=round(copied, 3), source_lines=lines,
                        repetitive=round(rep, 3))

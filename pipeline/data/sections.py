"""Cutting a document that is longer than the prompt budget into sections, at natural boundaries.

A section is a run of the document's own tokens (a slice of ONE tokenisation of the whole text,
never a re-tokenisation of a piece, so section sizes are exact and the sections together are the
document, token for token). Sections are as large as the budget allows, and end where the text
does: at a paragraph break if one falls inside the budget, else at a sentence end, else at a
line break, else between words; only a single "word" longer than the budget (a table without
spaces, a base64 blob) is cut between tokens.

Greedy packing by boundary level is what text splitters do (langchain's recursive character
splitter, llama-index's sentence splitter); it is written here because those libraries count
characters or re-tokenise pieces, while the engine needs exact token counts of one tokenisation.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

# Boundary levels, strongest first. A boundary is the character offset where the next piece
# starts (after the separator's whitespace), so a piece keeps its own trailing punctuation.
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_SENTENCE = re.compile(r"(?<=[.!?;:])[\"'\u201d\u2019)\]]*\s+")
_LINE = re.compile(r"\n\s*")
_WORD = re.compile(r"\s+")
BOUNDARY_LEVELS = ("paragraph", "sentence", "line", "word", "token")
_PATTERNS = (_PARAGRAPH, _SENTENCE, _LINE, _WORD)


@dataclass(frozen=True)
class Section:
    """Tokens [first_token, end_token) of the document, and where its text starts and ends."""

    index: int
    first_token: int
    end_token: int
    first_char: int
    end_char: int
    # The weakest boundary level the section's end had to use ("paragraph" ... "token"); the last
    # section ends with the document ("end").
    cut_at: str

    @property
    def tokens(self) -> int:
        return self.end_token - self.first_token


def cut_sections(offsets: list[tuple[int, int]], text: str, budget: int) -> list[Section]:
    """Sections of at most `budget` tokens covering every token of the document, in order.

    offsets: (start, end) character span of each token of ONE tokenisation of `text` (what a fast
    tokenizer returns with return_offsets_mapping=True), in order.
    A document of at most `budget` tokens is one section.
    """
    if budget < 1:
        raise ValueError(f"a section budget must be at least 1 token, got {budget}")
    n = len(offsets)
    if n == 0:
        return []
    ends = [span[1] for span in offsets]
    # For each level, the token indices at which a piece may start (sorted, unique, inside (0, n)).
    cuts = [_token_boundaries(pattern, text, ends, n) for pattern in _PATTERNS]
    sections: list[Section] = []
    first = 0
    while first < n:
        if n - first <= budget:
            end, level = n, "end"
        else:
            end, level = _best_cut(cuts, first, first + budget)
        sections.append(Section(index=len(sections), first_token=first, end_token=end,
                                first_char=offsets[first][0], end_char=offsets[end - 1][1], cut_at=level))
        first = end
    return sections


def _token_boundaries(pattern: re.Pattern, text: str, ends: list[int], n: int) -> list[int]:
    """Token indices where a piece starts after a separator matched by `pattern`: the token that
    holds the first character after the separator (BPE tokenizers attach a space to the word after
    it, so " Third" starts inside the separator and the cut goes before it)."""
    found = []
    for match in pattern.finditer(text):
        token = bisect.bisect_right(ends, match.end())  # first token ending after the separator
        if 0 < token < n and (not found or found[-1] != token):
            found.append(token)
    return found


def _best_cut(cuts: list[list[int]], first: int, limit: int) -> tuple[int, str]:
    """The end of a section starting at token `first` that may hold tokens up to `limit`
    (exclusive): the last boundary of the strongest level inside (first, limit], provided it
    keeps the section at least half full (a paragraph break after 3 tokens would otherwise make a
    3-token section); else the same rule at the next level; else a cut between tokens at the
    limit."""
    half = first + (limit - first + 1) // 2
    for level, boundaries in zip(BOUNDARY_LEVELS, cuts):
        i = bisect.bisect_right(boundaries, limit) - 1
        if i >= 0 and boundaries[i] > first and boundaries[i] >= half:
            return boundaries[i], level
    # Nothing but tokens in the second half of the window (a blob without spaces): cut there.
    return limit, "token"


# What a prompt takes beside the document when no tokenizer is at hand (jobs.plan loads none):
# the section and combine templates with a chat template and a short question, measured on the
# embedded model at about 90-150 tokens; rounded up.
ESTIMATED_TEMPLATE_TOKENS = 200
# A combine prompt lists each input as a labelled line ("Part i of n: ..."): its label's tokens.
LABEL_TOKENS = 8


@dataclass(frozen=True)
class SplitEstimate:
    """How the hierarchical policy answers a document of `document_tokens` (pure arithmetic, no
    tokenizer): at least `sections` sections (the cut keeps natural boundaries, so there can be
    more), `levels` levels of calls (map, then combines), `calls` engine calls per output row
    (QA: per question; its combine runs only over the sections that found an answer, so this
    is the most). Every call is a prompt within max_input_tokens: the memory plan of one
    --max-input-tokens request covers each."""

    document_tokens: int
    section_tokens: int
    sections: int
    levels: int
    calls: int

    def describe(self, task: str) -> str:
        if self.sections <= 1:
            return f"a document of {self.document_tokens:,} tokens fits one prompt: 1 call"
        per = ""
        if task == "qa":
            per = (" per question (at most: only sections that find an answer are combined)" if self.levels > 1 else
                   " per question (the section calls; --qa-combine confidence makes no combine call)")
        return (f"a document of {self.document_tokens:,} tokens under --truncation hierarchical: at least "
                f"{self.sections:,} sections of up to {self.section_tokens:,} tokens, {self.levels} levels, "
                f"about {self.calls:,} engine calls{per}, each a prompt within --max-input-tokens (the plan above "
                f"covers every call; templates assumed {ESTIMATED_TEMPLATE_TOKENS} tokens)")


def estimate_split(document_tokens: int, max_input_tokens: int, max_new_tokens: int,
                   template_tokens: int = ESTIMATED_TEMPLATE_TOKENS, combine: bool = True) -> SplitEstimate:
    """The sections, levels and calls of one output row of a document under the hierarchical
    policy: sections of the prompt budget less the template; each level's outputs (at most
    max_new_tokens each, plus a label) combined as many per call as fit, until one remains.
    combine=False: the sections' outputs are not combined by calls (QA's --qa-combine confidence)."""
    budget = max_input_tokens - template_tokens
    if budget < 16:
        raise ValueError(f"--max-input-tokens {max_input_tokens} leaves no room for a section beside its template")
    if document_tokens <= budget:
        return SplitEstimate(document_tokens, budget, 1, 1, 1)
    sections = -(-document_tokens // budget)
    fan_in = max(2, budget // (max_new_tokens + LABEL_TOKENS))
    calls, levels, n = sections, 1, sections
    while combine and n > 1:
        n = -(-n // fan_in)
        calls += n
        levels += 1
    return SplitEstimate(document_tokens, budget, sections, levels, calls)

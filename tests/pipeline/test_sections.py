"""Cutting documents into sections: budgets, boundaries, and the edge cases around them."""

from __future__ import annotations

import re

import pytest

from pipeline.data.sections import cut_sections


def word_offsets(text: str) -> list[tuple[int, int]]:
    """A whitespace tokenizer's offsets (what the tests' word-level tokenizers give)."""
    return [m.span() for m in re.finditer(r"\S+", text)]


def bpe_like_offsets(text: str) -> list[tuple[int, int]]:
    """A BPE-like tokenizer's offsets: a word carries the space before it (" Third"), newlines are
    tokens of their own."""
    return [m.span() for m in re.finditer(r"\n| ?[^\s]+|[ \t]+", text)]


def paragraphs(n: int, words: int, start: int = 0) -> str:
    return "\n\n".join(" ".join(f"p{p}w{w}" for w in range(words)) + "." for p in range(start, start + n))


def check_cover(sections, n_tokens: int, budget: int) -> None:
    assert sections[0].first_token == 0 and sections[-1].end_token == n_tokens
    for a, b in zip(sections, sections[1:]):
        assert a.end_token == b.first_token  # no token lost or repeated
    assert all(0 < s.tokens <= budget for s in sections)
    assert [s.index for s in sections] == list(range(len(sections)))


@pytest.mark.parametrize("offsets_of", [word_offsets, bpe_like_offsets])
def test_sections_end_at_paragraph_breaks(offsets_of):
    text = paragraphs(6, 10)  # 6 paragraphs of 10 words
    offsets = offsets_of(text)
    budget = len(offsets) // 2 + 5  # three paragraphs and their breaks fit, four do not
    sections = cut_sections(offsets, text, budget=budget)
    check_cover(sections, len(offsets), budget)
    assert len(sections) == 2
    for section in sections[:-1]:
        assert section.cut_at == "paragraph"
        # A paragraph ends the section (its line breaks on either side of the cut) and the next
        # section starts with the first word of the next one.
        assert text[:section.end_char].rstrip().endswith(".")
        assert "\n\n" in text[section.end_char - 2:section.end_char + 2]
        assert text[section.end_char:].split()[0].endswith("w0")
    assert sections[-1].cut_at == "end"
    # The sections' text is the document's, in order.
    joined = " ".join(text[s.first_char:s.end_char] for s in sections)
    assert re.sub(r"\s+", " ", joined) == re.sub(r"\s+", " ", text)


def test_a_document_exactly_at_the_budget_is_one_section():
    text = paragraphs(3, 7)
    offsets = word_offsets(text)
    sections = cut_sections(offsets, text, budget=len(offsets))
    assert len(sections) == 1
    assert (sections[0].first_token, sections[0].end_token, sections[0].cut_at) == (0, len(offsets), "end")


def test_one_token_over_the_budget_makes_two_sections():
    text = paragraphs(3, 7)
    offsets = word_offsets(text)
    sections = cut_sections(offsets, text, budget=len(offsets) - 1)
    check_cover(sections, len(offsets), len(offsets) - 1)
    assert len(sections) == 2
    # The cut still falls on a paragraph break (two paragraphs, then one), not at the budget.
    assert sections[0].cut_at == "paragraph" and sections[0].tokens == 14


def test_an_unsplittable_paragraph_is_cut_at_sentences_then_words():
    sentences = " ".join(f"s{i} " + " ".join(f"w{j}" for j in range(8)) + "." for i in range(6))  # 9 words each
    text = "Intro.\n\n" + sentences + "\n\nOutro."
    offsets = word_offsets(text)
    sections = cut_sections(offsets, text, budget=20)
    check_cover(sections, len(offsets), 20)
    cuts = [s.cut_at for s in sections[:-1]]
    assert "sentence" in cuts and "token" not in cuts
    for s in sections[:-1]:
        if s.cut_at == "sentence":
            assert text[:s.end_char].endswith(".")
    # One paragraph of words without sentence ends: cut between words.
    text = " ".join(f"w{i}" for i in range(50))
    sections = cut_sections(word_offsets(text), text, budget=16)
    check_cover(sections, 50, 16)
    assert [s.cut_at for s in sections] == ["word", "word", "word", "end"]
    assert [s.tokens for s in sections] == [16, 16, 16, 2]


def test_a_word_longer_than_the_budget_is_cut_between_tokens():
    text = "start " + "x" * 40 + " end"
    offsets = [(0, 5)] + [(6 + i, 7 + i) for i in range(40)] + [(47, 50)]  # the blob: one token per char
    sections = cut_sections(offsets, text, budget=10)
    check_cover(sections, len(offsets), 10)
    assert "token" in [s.cut_at for s in sections]


def test_sections_are_at_least_half_full_when_a_boundary_allows():
    # A paragraph break right after the start must not make a 2-token section.
    text = "Title here.\n\n" + " ".join(f"w{i}" for i in range(40)) + "."
    sections = cut_sections(word_offsets(text), text, budget=20)
    assert sections[0].tokens >= 10


def test_bad_budget_and_empty_document():
    with pytest.raises(ValueError, match="at least 1"):
        cut_sections([(0, 1)], "a", 0)
    assert cut_sections([], "", 10) == []


def test_the_split_estimate_of_jobs_plan():
    """estimate_split: one call up to the budget; one token over it, two sections and one combine;
    many sections combined as many per call as fit (budget // (max_new_tokens + label))."""
    from pipeline.data.sections import LABEL_TOKENS, estimate_split

    budget = 4096 - 200
    at = estimate_split(budget, 4096, 256)
    assert (at.sections, at.levels, at.calls) == (1, 1, 1)
    over = estimate_split(budget + 1, 4096, 256)
    assert (over.sections, over.levels, over.calls) == (2, 2, 3)
    fan_in = budget // (256 + LABEL_TOKENS)  # 14
    big = estimate_split(300_000, 4096, 256)
    assert big.sections == -(-300_000 // budget) == 78
    assert big.levels == 3 and big.calls == 78 + -(-78 // fan_in) + 1
    assert "at least 78 sections" in big.describe("summarize") and "per question" in big.describe("qa")
    with pytest.raises(ValueError, match="no room"):
        estimate_split(1000, 200, 16)

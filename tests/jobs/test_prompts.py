"""Prompt rendering, QA prefix/suffix split, truncation policy, template files.

The tiny tokenizer is word-level over w3..w127, so the templates here use those words too."""

from __future__ import annotations

import copy

import pytest

from pipeline.data.prompts import DEFAULT_TEMPLATES, PromptBuilder, PromptError, load_templates
from tests.jobs.conftest import load_tiny_tokenizer

T = {
    "summarize": {"system": "w120", "user": "w121 {document} w122", "base": "w123 {document} w124"},
    "qa": {"system": "w120", "user": "w125 {document} w126 {question}", "base": "w127 {document} w126 {question} w124"},
}


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_model):
    return load_tiny_tokenizer(tiny_chat_model)


@pytest.fixture(scope="module")
def base_tok(tiny_base_model):
    return load_tiny_tokenizer(tiny_base_model)


def _doc(n, start=3):
    return " ".join(f"w{start + i % 100}" for i in range(n))


def test_chat_qa_prefix_is_shared_and_suffix_holds_the_question(chat_tok):
    b = PromptBuilder(chat_tok, task="qa", templates=T, max_input_tokens=500)
    assert b.template_kind == "chat"
    p = b.build(_doc(5), ["w7 w8", "w9"])
    assert chat_tok.decode(p.prefix_ids) == "<s> w110 w120 </s> <s> w111 w125 w3 w4 w5 w6 w7 w126"
    assert [chat_tok.decode(s) for s in p.suffix_ids] == ["w7 w8 </s> <s> w112", "w9 </s> <s> w112"]
    assert p.truncated_tokens == 0 and p.document_tokens == 5


def test_base_template_adds_bos_and_summarize_has_one_empty_suffix(base_tok, chat_tok):
    b = PromptBuilder(base_tok, task="summarize", templates=T, max_input_tokens=500)
    assert b.template_kind == "base"
    p = b.build(_doc(3))
    assert base_tok.decode(p.prefix_ids) == "<s> w123 w3 w4 w5 w124" and p.suffix_ids == [[]]
    forced = PromptBuilder(chat_tok, task="summarize", templates=T, max_input_tokens=500, use_chat_template=False)
    assert forced.template_kind == "base"


@pytest.mark.parametrize("policy", ["middle", "end"])
def test_truncation_keeps_the_limit_and_reports_dropped_tokens(chat_tok, policy):
    b = PromptBuilder(chat_tok, task="qa", templates=T, max_input_tokens=40, truncation=policy)
    doc = _doc(100)
    p = b.build(doc, ["w7 w8 w9", "w10"])
    longest = len(p.prefix_ids) + max(len(s) for s in p.suffix_ids)
    assert longest == 40  # filled exactly to the limit
    words = chat_tok.decode(p.prefix_ids).split()
    body = words[words.index("w125") + 1:words.index("w126")]
    marker = len(b._marker)
    assert p.truncated_tokens == 100 - (len(body) - marker)
    if policy == "middle":
        assert body[:3] == ["w3", "w4", "w5"] and body[-1] == "w102"  # beginning and end kept
    else:
        assert body == doc.split()[:len(body)]


def test_template_too_long_for_the_limit_is_a_prompt_error(chat_tok):
    b = PromptBuilder(chat_tok, task="summarize", templates=T, max_input_tokens=20)
    with pytest.raises(PromptError, match="raise --max-input-tokens"):
        b.build(_doc(10))


def test_template_file_overrides_and_validation(tmp_path, chat_tok):
    good = tmp_path / "t.yaml"
    good.write_text("summarize:\n  user: 'w50 {document} w51'\n  system: ''\n")
    templates = load_templates(str(good))
    assert templates["qa"] == DEFAULT_TEMPLATES["qa"]
    b = PromptBuilder(chat_tok, task="summarize", templates=templates, max_input_tokens=200)
    assert chat_tok.decode(b.build("w5 w6").prefix_ids) == "<s> w111 w50 w5 w6 w51 </s> <s> w112"
    bad = tmp_path / "bad.json"
    bad.write_text('{"qa": {"user": "{question} before {document}"}}')
    with pytest.raises(ValueError, match="after {document}"):
        load_templates(str(bad))
    bad.write_text('{"translate": {"user": "{document}"}}')
    with pytest.raises(ValueError, match="unknown task"):
        load_templates(str(bad))
    broken = copy.deepcopy(T)
    broken["summarize"]["user"] = "no placeholder"
    with pytest.raises(ValueError, match="exactly once"):
        PromptBuilder(chat_tok, task="summarize", templates=broken, max_input_tokens=200)


def test_response_starts_the_answer_in_chat_prompts_only(chat_tok, base_tok, tmp_path):
    t = copy.deepcopy(T)
    t["summarize"]["response"] = "w100"
    t["qa"]["response"] = "w101"
    chat = PromptBuilder(chat_tok, task="summarize", templates=t, max_input_tokens=500)
    assert chat_tok.decode(chat.build(_doc(2)).prefix_ids) == "<s> w110 w120 </s> <s> w111 w121 w3 w4 w122 </s> <s> w112 w100"
    assert chat.output_text("\n A summary.") == "A summary." and chat.output_text(None) is None
    qa = PromptBuilder(chat_tok, task="qa", templates=t, max_input_tokens=500)
    assert [chat_tok.decode(s) for s in qa.build(_doc(2), ["w9"]).suffix_ids] == ["w9 </s> <s> w112 w101"]
    base = PromptBuilder(base_tok, task="summarize", templates=t, max_input_tokens=500)
    assert base_tok.decode(base.build(_doc(2)).prefix_ids) == "<s> w123 w3 w4 w124"  # the base prompt is whole
    assert base.output_text(" kept as is") == " kept as is"
    bad = tmp_path / "bad.yaml"
    bad.write_text("summarize:\n  response: 'w1 {document}'\n")
    with pytest.raises(ValueError, match="response is the start of the answer"):
        load_templates(str(bad))


def test_default_summary_prompt_asks_after_the_document():
    # A small model forgets an instruction read thousands of tokens earlier and continues the text.
    user = DEFAULT_TEMPLATES["summarize"]["user"]
    assert user.startswith("{document}") and "Summarise the text above" in user
    assert DEFAULT_TEMPLATES["summarize"]["response"] == "Summary:"

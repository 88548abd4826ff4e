"""Prompt templates, rendering to token ids, and truncation of over-long documents.

The driver owns prompts: it renders the task's template around the document (the tokenizer's chat
template when it has one, the plain "base" template otherwise), tokenizes, truncates the document
to fit `max_input_tokens`, and sends token ids to the engine.

For QA the rendered prompt is split at the question: prefix = everything up to the question
(instructions + document), suffix = question + the rest (end of the user turn, assistant header).

Chat prompts can also start the model's answer (`response`, after the assistant header): SmolLM2
asked to summarise a text of "Ruth Chapter N" headings answers "Ruth Chapter 5" - more of the
text - unless its answer already began with "Summary:". The response is not part of the output
(`PromptBuilder.output_text` drops the whitespace the model writes after it).
Every question of a document shares the prefix, which the engine prefills once.

Truncation (documents only; instructions and questions are never cut):
- "middle" (default): keep the beginning and the end of the document, drop the middle, and put a
  short marker (" [...] ") where text was dropped;
- "end": keep the beginning, drop the end;
- "hierarchical": nothing is dropped: a document over the budget is answered in sections
  (pipeline.data.long_documents), with the template sets `{task}_section` and `{task}_combine`.
The number of document tokens dropped is reported per row (truncated_tokens).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

from pipeline.config.task import HIERARCHICAL, TASKS, TRUNCATION_POLICIES

TRUNCATION_MARKER = " [...] "
TEMPLATE_KEYS = ("system", "user", "response", "base")

# "system": the chat system message ("" for none); "user": the chat user message; "response":
# the start of the model's answer in chat prompts ("" for none; not in the output); "base": the
# whole prompt for models without a chat template. {document} and (QA) {question} are filled in;
# {question} must come after {document}.
DEFAULT_TEMPLATES: dict[str, dict[str, str]] = {
    # The instruction comes after the document: a small model that read it first has forgotten it
    # thousands of tokens later and continues the document instead (benchmarks/summary_quality.py).
    "summarize": {
        "system": "You are a careful assistant. You write short, faithful summaries.",
        "user": "{document}\n\n---\nSummarise the text above in two or three sentences, in your own words.",
        "response": "Summary:",
        "base": "Document:\n{document}\n\nSummary of the document in two or three sentences:",
    },
    "qa": {
        "system": "You are a careful assistant. You answer questions using only the given document.",
        "user": "Document:\n{document}\n\nAnswer the question about the document in one or two sentences.\n"
                "Question: {question}",
        "response": "",
        "base": "Document:\n{document}\n\nQuestion: {question}\nAnswer:",
    },
}

# What a section answers when the question's answer is not in it (hierarchical QA), and the output
# of a question no section could answer.
NOT_FOUND = "NOT FOUND"

# The template sets of the hierarchical policy, overridable in a templates file like the tasks':
# `{task}_section` asks about one section of a long document, `{task}_combine` combines the
# section outputs (its {document} is their list, in document order).
HIERARCHICAL_TEMPLATES: dict[str, dict[str, str]] = {
    "summarize_section": {
        "system": "You are a careful assistant. You write short, faithful summaries.",
        "user": "{document}\n\n---\nThe text above is one part of a longer document. Summarise this part in two "
                "or three sentences, in your own words.",
        "response": "Summary:",
        "base": "Part of a longer document:\n{document}\n\nSummary of this part in two or three sentences:",
    },
    "summarize_combine": {
        "system": "You are a careful assistant. You write short, faithful summaries.",
        "user": "Summaries of consecutive parts of one document, in order:\n\n{document}\n\n---\nCombine them "
                "into one summary of the whole document in two or three sentences, in your own words.",
        "response": "Summary:",
        "base": "Summaries of consecutive parts of one document, in order:\n{document}\n\n"
                "One summary of the whole document in two or three sentences:",
    },
    "qa_section": {
        "system": "You are a careful assistant. You answer questions using only the given text.",
        "user": "Part of a longer document:\n{document}\n\nAnswer the question using only this part, in one or "
                f"two sentences. If this part does not contain the answer, reply exactly: {NOT_FOUND}\n"
                "Question: {question}",
        "response": "",
        "base": "Part of a longer document:\n{document}\n\nIf this part does not contain the answer, the answer "
                f"is {NOT_FOUND}.\nQuestion: {{question}}\nAnswer:",
    },
    "qa_combine": {
        "system": "You are a careful assistant. You answer questions using only the given notes.",
        "user": "Answers to one question found in different parts of a document:\n{document}\n\n"
                "Using only these answers, answer the question in one or two sentences.\nQuestion: {question}",
        "response": "",
        "base": "Answers to one question found in different parts of a document:\n{document}\n\n"
                "Question: {question}\nAnswer:",
    },
}
DEFAULT_TEMPLATES.update(HIERARCHICAL_TEMPLATES)
# Every template set a templates file may override, and the task whose placeholders it takes.
TEMPLATE_SETS = {**{task: task for task in TASKS}, **{name: name.split("_")[0] for name in HIERARCHICAL_TEMPLATES}}

_DOC = "\ue000DOCUMENT\ue000"
_QUESTION = "\ue000QUESTION\ue000"


class PromptError(ValueError):
    """A prompt cannot be built for one document (becomes that row's error)."""


def load_templates(path: str | None) -> dict[str, dict[str, str]]:
    """Default templates, with overrides from a YAML or JSON file ({task: {system|user|response|base: str}})."""
    templates = copy.deepcopy(DEFAULT_TEMPLATES)
    if not path:
        return templates
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(f) or {}
        else:
            values = json.load(f)
    if not isinstance(values, dict):
        raise ValueError(f"templates file {path}: expected a mapping {{task: {{system|user|response|base: text}}}}")
    for task, fields in values.items():
        if task not in TEMPLATE_SETS or not isinstance(fields, dict):
            raise ValueError(f"templates file {path}: unknown task {task!r} (template sets: {tuple(TEMPLATE_SETS)})")
        for key, text in fields.items():
            if key not in TEMPLATE_KEYS or not isinstance(text, str):
                raise ValueError(f"templates file {path}: {task}.{key} must be one of {'/'.join(TEMPLATE_KEYS)}, "
                                 "a string")
            templates[task][key] = text
        if "user" in fields and "response" not in fields:
            # A user message of one's own comes without the default's answer start (written for
            # the default message).
            templates[task]["response"] = ""
    for name, task in TEMPLATE_SETS.items():
        _check_template(task, templates[name], source=path, name=name)
    return templates


def _check_template(task: str, fields: dict[str, str], source: str | None = None, name: str | None = None) -> None:
    where = f"templates{' file ' + source if source else ''}: {name or task}"
    for key in ("user", "base"):
        text = fields[key]
        if text.count("{document}") != 1:
            raise ValueError(f"{where}.{key} must contain {{document}} exactly once")
        if task == "qa":
            if text.count("{question}") != 1 or text.index("{question}") < text.index("{document}"):
                raise ValueError(f"{where}.{key} must contain {{question}} once, after {{document}}")
        elif "{question}" in text:
            raise ValueError(f"{where}.{key}: {{question}} is only for the qa task")
    if "{document}" in fields.get("response", "") or "{question}" in fields.get("response", ""):
        raise ValueError(f"{where}.response is the start of the answer: no {{document}} or {{question}} in it")


@dataclass(frozen=True)
class Prompt:
    prefix_ids: list[int]
    # One per output row; [[]] for summarisation. None marks a question that could not be used.
    suffix_ids: list[list[int]]
    truncated_tokens: int
    document_tokens: int  # before truncation


class PromptBuilder:
    """Renders and tokenizes prompts for one task with one tokenizer."""

    def __init__(
        self, tokenizer, *, task: str, templates: dict | None = None, max_input_tokens: int,
        truncation: str = "middle", use_chat_template: bool | None = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
        self.tokenizer = tokenizer
        self.task = task
        self.max_input_tokens = max_input_tokens
        self.truncation = truncation
        fields = (templates or DEFAULT_TEMPLATES)[task]
        _check_template(task, fields)
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        self.chat = has_chat if use_chat_template is None else (use_chat_template and has_chat)
        self.response = fields.get("response", "") if self.chat else ""
        text = self._render(fields)
        before, rest = _split_once(text, _DOC, "document")
        if task == "qa":
            between, after = _split_once(rest, _QUESTION, "question")
        else:
            between, after = rest, ""
        self._before = self._encode(before, first=True)
        self._between = self._encode(between)
        self._after = self._encode(after)
        self._marker = self._encode(TRUNCATION_MARKER) if truncation == "middle" else []
        self.templates = fields
        self.template_tokens = len(self._before) + len(self._between) + len(self._after)

    @property
    def template_kind(self) -> str:
        return "chat" if self.chat else "base"

    def _render(self, fields: dict[str, str]) -> str:
        values = {"document": _DOC, "question": _QUESTION}
        if not self.chat:
            return fields["base"].format(**values)
        messages = []
        if fields.get("system"):
            messages.append({"role": "system", "content": fields["system"]})
        messages.append({"role": "user", "content": fields["user"].format(**values)})
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt + self.response

    def output_text(self, text: str | None) -> str | None:
        """A generated text as it goes into the output: after a response prefix ("Summary:") the
        model starts with a space or a new line, which is not part of the answer."""
        return text.lstrip() if text is not None and self.response else text

    def _encode(self, text: str, first: bool = False) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if first and not self.chat:
            # Base models: the special tokens the tokenizer adds at the start (BOS), if any.
            empty = self.tokenizer("", add_special_tokens=True)["input_ids"]
            bos = getattr(self.tokenizer, "bos_token_id", None)
            if bos is not None and empty[:1] == [bos]:
                ids = [bos] + ids
        return ids

    def build(self, document: str, questions: list[str | None] | None = None) -> Prompt:
        """Token ids of one document's prompt; raises PromptError when even the template is too long."""
        return self.build_from_ids(self.encode(document), questions)

    def encode(self, text: str) -> list[int]:
        """A document's token ids as `build` tokenizes it (no special tokens)."""
        return self._encode(text)

    def suffixes(self, questions: list[str | None] | None) -> list[list[int] | None]:
        """The suffix of each question (None for a question that is None); [[]] for summaries."""
        if self.task == "qa":
            if not questions:
                raise PromptError("no question to answer")
            return [self._encode(q) + self._after if q is not None else None for q in questions]
        return [[]]

    def document_budget(self, suffixes: list[list[int] | None]) -> int:
        """Document tokens that fit beside the template and the longest of `suffixes`."""
        longest_suffix = max((len(s) for s in suffixes if s is not None), default=0)
        return self.max_input_tokens - len(self._before) - len(self._between) - longest_suffix

    def build_from_ids(self, doc_ids: list[int], questions: list[str | None] | None = None,
                       suffixes: list[list[int] | None] | None = None) -> Prompt:
        """`build` for a document already tokenized (`encode`; a section is a slice of a whole
        document's ids); `suffixes`: the questions' suffixes when the caller has them already."""
        suffixes = self.suffixes(questions) if suffixes is None else suffixes
        budget = self.document_budget(suffixes)
        if budget < 16 + len(self._marker):
            raise PromptError(
                f"the prompt template{' and question' if self.task == 'qa' else ''} alone take "
                f"{self.max_input_tokens - budget} tokens, leaving {max(budget, 0)} for the document "
                f"under max_input_tokens={self.max_input_tokens}: raise --max-input-tokens or shorten the "
                f"{'question' if self.task == 'qa' else 'template'}"
            )
        kept, dropped = self._truncate(doc_ids, budget)
        return Prompt(
            prefix_ids=self._before + kept + self._between,
            suffix_ids=[s if s is not None else [] for s in suffixes],
            truncated_tokens=dropped,
            document_tokens=len(doc_ids),
        )

    def _truncate(self, ids: list[int], budget: int) -> tuple[list[int], int]:
        """-> (ids that fit in `budget`, document tokens dropped)."""
        if len(ids) <= budget:
            return ids, 0
        if self.truncation == HIERARCHICAL:
            raise RuntimeError("under the hierarchical policy a document over the budget is answered in sections "
                               "(pipeline.data.long_documents), never truncated")
        if self.truncation == "end":
            return ids[:budget], len(ids) - budget
        keep = budget - len(self._marker)
        head = (keep + 1) // 2
        tail = keep - head
        return ids[:head] + self._marker + (ids[len(ids) - tail:] if tail else []), len(ids) - keep


def _split_once(text: str, sentinel: str, name: str) -> tuple[str, str]:
    parts = text.split(sentinel)
    if len(parts) != 2:
        raise ValueError(
            f"the rendered template contains the {name} {len(parts) - 1} times (expected once): "
            "the chat template may drop or repeat the user message"
        )
    return parts[0], parts[1]

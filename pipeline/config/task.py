"""The task settings shared by the jobs' and the processor's configs: which task, how a document is
cut to fit, and how an answer is generated (sampling, stop strings, the repetition guard).

`settle_task_fields` checks them and fills the task's defaults into a frozen config in place;
`sampling_params` reads the generation fields into the engine's SamplingParams, for both configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.validate import check_choice, check_int_at_least, check_number

TASKS = ("summarize", "qa")
# What happens to a document longer than the prompt budget: "middle": its beginning and end are
# kept; "end": its beginning is kept; "hierarchical": nothing is dropped, it is answered in sections
# that are then combined (pipeline.data.long_documents).
HIERARCHICAL = "hierarchical"
TRUNCATION_POLICIES = ("middle", "end", HIERARCHICAL)
# How hierarchical QA turns the sections' answers to a question into one: "reduce" asks the model
# to combine them; "confidence" takes the one the model was most confident of, with no further call.
REDUCE, CONFIDENCE = "reduce", "confidence"
QA_COMBINES = (REDUCE, CONFIDENCE)

# Per-task generation defaults (config fields left at None take these), shared by the jobs and the
# processor so that both answer alike. Summaries: stop at the first blank line and keep the small
# models from looping (benchmarks/summary_quality.py measures what each setting does on the example
# corpus).
TASK_GENERATION_DEFAULTS = {
    "summarize": {"stop": ("\n\n",), "repetition_penalty": 1.1, "no_repeat_ngram_size": 4},
    "qa": {"stop": ("\n\n",), "repetition_penalty": 1.0, "no_repeat_ngram_size": 4},
}


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    # Greedy by default: reproducible batch output.
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    # Generation stops at the first of these strings (the string is cut from the output), looked
    # for after the output's leading whitespace: "\n\n" ends a paragraph, not an answer that
    # starts on a new line.
    stop: tuple[str, ...] = ()
    # Keep generating past end-of-sequence tokens up to max_new_tokens (benchmarks: fixed lengths).
    ignore_eos: bool = False
    # Repetition guard over the tokens generated so far (the prompt is not penalised), applied
    # before greedy choice or sampling (pipeline.engine.tokens.repetition_guard): logits of tokens
    # already generated are divided by repetition_penalty (multiplied when negative, as in
    # transformers; 1 = off), and a token that would complete an n-gram of no_repeat_ngram_size
    # tokens already generated is excluded (0 = off).
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        check_sampling_values(self)


def settle_task_fields(config) -> None:
    """The task fields shared by the jobs' and the processor's configs (frozen dataclasses with
    task, truncation, qa_combine, question_column, stop, repetition_penalty and
    no_repeat_ngram_size): checked, and defaults filled in place."""
    check_choice("task", config.task, TASKS)
    check_choice("truncation", config.truncation, TRUNCATION_POLICIES)
    check_choice("qa_combine", config.qa_combine, QA_COMBINES)
    if config.qa_combine != REDUCE and (config.task != "qa" or config.truncation != HIERARCHICAL):
        raise ValueError(f"qa_combine={config.qa_combine!r} is for the qa task with truncation={HIERARCHICAL!r} "
                         f"(it chooses among the answers of a document's sections)")
    if config.task == "qa" and not config.question_column:
        object.__setattr__(config, "question_column", "questions")
    if config.task == "summarize" and config.question_column:
        raise ValueError("question_column is only for the qa task")
    defaults = TASK_GENERATION_DEFAULTS[config.task]
    for name in ("stop", "repetition_penalty", "no_repeat_ngram_size"):
        if getattr(config, name) is None:
            object.__setattr__(config, name, defaults[name])
    if isinstance(config.stop, (list, str)):
        object.__setattr__(config, "stop", (config.stop,) if isinstance(config.stop, str) else tuple(config.stop))
    check_number("repetition_penalty", config.repetition_penalty, low=1.0, rule="a number >= 1 (1 = off)")
    check_sampling_values(config)
    check_int_at_least("no_repeat_ngram_size", config.no_repeat_ngram_size, 0, rule="an int >= 0 (0 = off)")


def check_sampling_values(values) -> None:
    """temperature and top_p of a config or SamplingParams: finite, temperature > 0 and top_p in
    (0, 1]. Checked with the settings, before any model loads (a NaN or zero temperature would
    otherwise surface as a traceback in the middle of generation)."""
    check_number("temperature", values.temperature, low=0.0, low_open=True,
                 rule="a number > 0 (for greedy decoding leave do_sample off; temperature is then unused)")
    check_number("top_p", values.top_p, low=0.0, high=1.0, low_open=True, rule="a number in (0, 1]")


def sampling_params(config) -> SamplingParams:
    """The generation settings of a job's or the processor's config (settled) as SamplingParams."""
    return SamplingParams(
        do_sample=config.do_sample, temperature=config.temperature, top_p=config.top_p, seed=config.seed,
        max_new_tokens=config.max_new_tokens, stop=config.stop, repetition_penalty=float(config.repetition_penalty),
        no_repeat_ngram_size=config.no_repeat_ngram_size,
    )

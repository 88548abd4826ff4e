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

The package, by concern:

    config.py         EvalConfig, Variant: what to evaluate
    texts.py          books, passkey prompts, perplexity windows (token ids; no torch)
    runners.py        the loss of a sequence and a passkey answer, in process or on an engine replica
    run.py            run_evaluation, run_evaluation_tp: the grid, written as it goes, resumable
    report.py         summaries and plots of a results dict
    summary_check.py  a model-free screen: is a generated summary a summary or a continuation?
"""

from evaluation.config import FILLERS, TASKS, EvalConfig, Variant
from evaluation.report import document_comparison, summarize, summary_markdown, write_plots, write_summary
from evaluation.run import (
    ResultWriter, equivalence_key, git_commit, record_identity, resolved_dca, resumed_meta, run_evaluation,
    run_evaluation_tp,
)
from evaluation.runners import (
    InProcessRunner, ReplicaRunner, perplexity_summary, sequence_nll, shared_prefix, shared_prefix_nll,
)
from evaluation.texts import (
    PASSKEY_INSTRUCTION, PASSKEY_NEEDLE, PASSKEY_QUESTION, REPEAT_FILLER, TEXTS_DIR, PasskeyPrompt,
    build_passkey_prompt, encode, filler_ids, leading_special_ids, make_passkey, passkey_correct, perplexity_windows,
    read_book,
)

__all__ = [
    "FILLERS", "TASKS", "EvalConfig", "Variant", "document_comparison", "summarize", "summary_markdown", "write_plots",
    "write_summary", "ResultWriter", "equivalence_key", "git_commit", "record_identity", "resolved_dca",
    "resumed_meta", "run_evaluation", "run_evaluation_tp", "InProcessRunner", "ReplicaRunner", "perplexity_summary",
    "sequence_nll", "shared_prefix", "shared_prefix_nll", "PASSKEY_INSTRUCTION", "PASSKEY_NEEDLE", "PASSKEY_QUESTION",
    "REPEAT_FILLER", "TEXTS_DIR",
    "PasskeyPrompt", "build_passkey_prompt", "encode", "filler_ids", "leading_special_ids", "make_passkey",
    "passkey_correct", "perplexity_windows", "read_book",
]

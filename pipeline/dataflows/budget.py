"""The failure budget: a job stops when its documents fail too often, judged the same way by both
dataflows (the driver after each document, the units' ledger after each unit)."""

from __future__ import annotations

import math

from pipeline.config.job import JobConfig
from pipeline.data.input import INPUT_ERROR_TYPES


def budget_counts(rows: list[dict]) -> tuple[int, int, int]:
    """One document's (input error, answered by the model, model failure), each 0 or 1, for the
    failure budget. A document answered by the model counts in the model rate's denominator
    whether it succeeded or not; a QA document with one invalid question and the others answered
    is both an input error and an answered document."""
    input_failed = any(r["status"] != "ok" and r["error_type"] in INPUT_ERROR_TYPES for r in rows)
    model_failed = any(r["status"] != "ok" and r["error_type"] not in INPUT_ERROR_TYPES for r in rows)
    answered = model_failed or any(r["status"] == "ok" for r in rows)
    return int(input_failed), int(answered), int(model_failed)


class FailureBudget:
    """Stops a job when its documents fail too often. Two rates, each counted like against like:
    documents the input made unusable (null/empty/non-UTF-8 text, duplicate or null id,
    unreadable rows), decided as they are read, over the documents read (`documents_read`, counted
    by the dataflow); and documents the model failed, decided as they are answered, over the
    documents answered. (Counting the first kind against answered documents let them race ahead
    of good documents still waiting in the scheduling window.) A rate is judged once
    budget_min_documents of its documents are decided, and trips when the lower end of its 95%
    confidence interval (Wilson) is above max_error_fraction: 3 empty texts among the first 20
    rows of a corpus with 3% of them is bad luck, 10 of 20 is a broken corpus."""

    def __init__(self, config: JobConfig) -> None:
        self.max_error_fraction = config.max_error_fraction
        self.min_documents = config.budget_min_documents
        self.documents_read = self.input_errors = self.model_decided = self.model_errors = 0

    def add(self, rows: list[dict]) -> None:
        """One document's rows, decided."""
        input_errors, model_decided, model_errors = budget_counts(rows)
        self.input_errors += input_errors
        self.model_decided += model_decided
        self.model_errors += model_errors

    def stop_reason(self, error_types, first_errors: dict) -> str | None:
        """The verdict: None while within budget, else the message the job stops with (naming the
        most common of `error_types`, a Counter, with an example each from `first_errors`)."""
        fraction, floor = self.max_error_fraction, self.min_documents
        input_errors, documents_read = self.input_errors, self.documents_read
        model_errors, model_decided = self.model_errors, self.model_decided
        rates = (("input", input_errors, documents_read), ("model", model_errors, model_decided))
        tripped = [(kind, errors, n) for kind, errors, n in rates
                   if n >= floor and wilson_lower_bound(errors, n) > fraction]
        if not tripped:
            return None
        common = error_types.most_common(3)
        detail = "; ".join(f"{t} x{n} (e.g. {first_errors.get(t, '')[:200]})" for t, n in common)
        return (
            "failure budget exceeded: "
            + "; ".join(f"{errors} of {n} documents "
                        f"{'read had invalid input' if kind == 'input' else 'sent to the model failed'}"
                        for kind, errors, n in tripped)
            + f" (invalid input {input_errors} of {documents_read} read, model failures "
            f"{model_errors} of {model_decided} answered; max_error_fraction {fraction:g}, counted over at "
            f"least {floor} documents). Most common: {detail}. Committed results are kept; "
            + ("fix the input (or the --id-column/--text-column choice)" if tripped[0][0] == "input" else
               "see the errors above")
            + " (or raise --max-error-fraction) and rerun the same command to resume."
        )


def wilson_lower_bound(errors: int, n: int, z: float = 1.96) -> float:
    """Lower end of the Wilson score interval of a rate (95% for z = 1.96); 0 for no trials."""
    if n <= 0:
        return 0.0
    p = errors / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)

"""A batch job's settings (`JobConfig`), the production defaults the memory planner shares, and
what identifies a job: its config hash and its fingerprint (`config_hash`, `job_fingerprint`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from pipeline.config.engine import DEFAULT_MAX_BATCH_SIZE
from pipeline.config.model import ModelError, ModelSpec
from pipeline.config.resolve import KV_CACHE_DTYPES, check_prefill_block, normalize_prefill_block
from pipeline.config.task import HIERARCHICAL, SamplingParams, sampling_params, settle_task_fields
from pipeline.config.validate import check_choice, check_number, check_positive_ints

# Production defaults, shared with the memory planner's flags (jobs.plan) so that a plan is made
# for what a job runs: DCA on (ModelSpec), the engine's "auto" prefill (one DCA chunk, at least
# 1024 tokens, per step of the continuous scheduler: activation memory set by DCA's chunk_len, not
# by the prompt), the model's own KV dtype.
DEFAULT_MAX_INPUT_TOKENS = 32768
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_PREFILL_BLOCK = "auto"
# Which dataflow runs a job (and wrote an output: manifest key "dataflow"; absent: "driver"). The
# two commit differently (numbered parts keyed by row vs one part per work unit): never mixed in
# one output.
DATAFLOWS = ("driver", "ray-data")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything a batch job needs. Loadable from a YAML/JSON file via jobs.common."""

    # "summarize" | "qa".
    task: str
    # Parquet file, directory or glob (local or s3://, gs://...).
    input_path: str
    # Local (or mounted shared) directory; must be absolute (jobs.common resolves CLI paths).
    output_dir: str
    # Input column names. question_column: QA only; "question" (string) or "questions" (list<string>).
    id_column: str = "id"
    text_column: str = "text"
    question_column: str | None = None
    # Which model, dtype and DCA settings (pipeline.config.model.ModelSpec).
    model_spec: ModelSpec = field(default_factory=ModelSpec)
    # Ranks per replica (tensor parallelism) and number of replicas.
    tp: int = 1
    replicas: int = 1
    # Longest prompt sent to the model (tokens): longer documents are truncated (see truncation).
    max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS
    # Tokens generated per output row at most.
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    # Documents over max_input_tokens: "middle": keep beginning and end of the document; "end":
    # keep the beginning only; "hierarchical": answer it in sections, then combine (nothing dropped).
    truncation: str = "middle"
    # QA under truncation "hierarchical": how a question's section answers become one: "reduce" (a
    # combine prompt) or "confidence" (the answer the model was most confident of, no extra call).
    qa_combine: str = "reduce"
    # YAML/JSON file overriding the prompt templates (pipeline.data.prompts.DEFAULT_TEMPLATES).
    templates_file: str | None = None
    # None: the tokenizer's chat template when it has one; False: always the base template.
    use_chat_template: bool | None = None
    # Sampling: greedy unless do_sample; seed makes sampling reproducible.
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    # Generation stops at the first of these strings (cut from the output). None: the task's
    # default (pipeline.config.task.TASK_GENERATION_DEFAULTS).
    stop: tuple[str, ...] | None = None
    # Repetition guard on the tokens generated so far (prompt tokens are not penalised: a summary
    # may reuse the document's names): their logits are divided by repetition_penalty (> 1), and
    # no n-gram of no_repeat_ngram_size tokens is generated twice. None: the task's default.
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    # Requests inside the engine at once (backpressure) and the longest-first reordering window.
    max_in_flight: int | None = None  # None: 2 x max_batch_size per replica
    schedule_window: int | None = None  # None: 4 x max_in_flight
    # Engine limits (None: the engine's defaults). scheduler: "continuous" or "static"
    # (pipeline.config.engine.EngineConfig.scheduler).
    scheduler: str | None = None
    max_batch_tokens: int | None = None
    max_batch_size: int | None = None
    max_restarts: int | None = None
    request_retries: int | None = None
    device: str | None = None
    # KV cache storage "auto" (the model dtype) | "int8", and prompt tokens per prefill forward:
    # "auto" (the engine's: one DCA chunk, at least 1024 tokens, per continuous-batching step; one
    # shot with the static scheduler or without DCA), "chunk" one DCA chunk of chunk_len L tokens
    # (one shot when DCA is off), None (or "none") one shot, or a number. docs/memory.md says
    # what each buys.
    kv_cache_dtype: str = "auto"
    prefill_block: int | str | None = DEFAULT_PREFILL_BLOCK
    # CPUs (and torch threads) per rank. None: on a local Ray, this machine's cores shared evenly
    # between all ranks; on a cluster, the engine's default (1).
    cpus_per_rank: int | None = None
    # Autoscaling clusters (device "cuda", GPU workers scaled from 0): how long to wait for the
    # autoscaler to bring up the GPUs of all replicas before giving up.
    scale_up_timeout_s: float = 1800.0
    # Failure budget: stop when error documents exceed this fraction of max(done, budget_min_documents).
    max_error_fraction: float = 0.1
    budget_min_documents: int = 20
    # Output commit cadence: a part every part_rows rows or part_seconds seconds, whichever first.
    part_rows: int = 256
    part_seconds: float = 30.0
    # Replace an output directory that holds another job's results.
    overwrite: bool = False
    # Label written to every row; None: "<task>-<fingerprint>" (stable across resumes).
    job_id: str | None = None
    # Progress bar on stderr (documents done/total, tokens/s, ETA).
    progress: bool = True
    # Ray: None = RAY_ADDRESS if set (ray job submit sets it), else start a local Ray.
    ray_address: str | None = None
    # Rows per input record batch.
    input_batch_rows: int = 64
    # "driver": one driver process reads, tokenises, schedules and commits every document.
    # "ray-data": a Ray Data dataflow (pipeline.dataflows.units): reading and prompts in Ray tasks and
    # CPU actors, the engine in one actor per replica, one committed part per work unit of at most
    # unit_rows rows; the driver lists files and footers, plans units and sums per-unit counts.
    dataflow: str = "driver"
    unit_rows: int = 64
    # ray-data: CPU actors that check rows and build prompts (1 CPU and a tokenizer each).
    prompt_actors: int = 1

    def __post_init__(self) -> None:
        settle_task_fields(self)
        check_choice("dataflow", self.dataflow, DATAFLOWS, shown=f"one of {', '.join(DATAFLOWS)}")
        check_positive_ints(self, ("tp", "replicas", "max_input_tokens", "max_new_tokens", "budget_min_documents",
                                   "part_rows", "unit_rows", "prompt_actors"))
        check_positive_ints(self, ("max_in_flight", "schedule_window"), optional=True)
        check_number("max_error_fraction", self.max_error_fraction, low=0.0, high=1.0, rule="a number in [0, 1]")
        object.__setattr__(self, "prefill_block", normalize_prefill_block(self.prefill_block))
        check_prefill_block(self.prefill_block, rule="'auto', 'chunk', 'none' (one shot) or a positive int")
        check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if isinstance(self.model_spec, dict):
            object.__setattr__(self, "model_spec", ModelSpec.from_dict(self.model_spec))

    @property
    def in_flight(self) -> int:
        # Enough to fill every replica's running batch and have as many waiting to join it.
        return self.max_in_flight or 2 * (self.max_batch_size or DEFAULT_MAX_BATCH_SIZE) * self.replicas

    @property
    def window(self) -> int:
        return self.schedule_window or 4 * self.in_flight

    def sampling(self) -> SamplingParams:
        return sampling_params(self)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["model_spec"] = self.model_spec.to_dict()
        values["stop"] = list(self.stop)
        return values


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def config_hash(config: JobConfig, templates: dict, template_kind: str, model_fp: str) -> str:
    """What determines a document's output besides its text: model (its content fingerprint, not
    its path), prompt, generation settings.

    DCA's `backend` is left out, as the device and tensor parallelism are: it says how attention
    is computed, not what (every backend computes the same DCA, to rounding), and "auto" already
    runs different ones on different machines (rows record which: attention_backend). So a job
    stopped at start because the backend it named cannot run resumes, unchanged, under another."""
    spec = {k: v for k, v in config.model_spec.to_dict().items() if k != "model"}
    if isinstance(spec.get("dca"), dict):
        spec["dca"] = {k: v for k, v in spec["dca"].items() if k != "backend"}
    used = templates[config.task]
    combine = {}
    if config.truncation == HIERARCHICAL:  # the section and combine prompts shape its outputs too
        used = {name: templates[name] for name in (config.task, f"{config.task}_section", f"{config.task}_combine")}
        if config.qa_combine != "reduce":  # (left out when "reduce": earlier outputs keep their hash)
            combine = {"qa_combine": config.qa_combine}
    return _hash({
        "task": config.task, "model_spec": spec, "model_fingerprint": model_fp, "templates": used,
        "template_kind": template_kind, "max_input_tokens": config.max_input_tokens,
        "truncation": config.truncation, "sampling": dataclasses.asdict(config.sampling()), **combine,
    })[:16]


def job_fingerprint(config: JobConfig, cfg_hash: str, input_identity: str) -> str:
    """Identity of a job's output: the config hash plus the corpus content (resume only the same
    job). Paths are left out on purpose: under `ray job submit` the input lives in a copy of the
    working dir whose path changes when the cluster restarts; the content does not."""
    return _hash({
        "config_hash": cfg_hash, "input": input_identity, "id": config.id_column,
        "text": config.text_column, "question": config.question_column,
    })[:16]


def check_parallelism(config: JobConfig, model_config) -> None:
    """Tensor parallelism splits the KV heads between ranks: more ranks than KV heads cannot work."""
    heads = getattr(model_config, "num_key_value_heads", None) or getattr(model_config, "num_attention_heads", None)
    if heads and config.tp > heads:
        raise ModelError(
            f"--tp {config.tp} is larger than the {heads} key/value heads of {config.model_spec.model}: "
            f"tensor parallelism splits the heads between ranks; use --tp {heads} or fewer"
        )


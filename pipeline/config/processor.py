"""What the Ray Data processor runs (`DCAProcessorConfig`, pipeline.dataflows.processor): frozen,
validated like the jobs' settings, `from_dict` rejects unknown keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.config.engine import DEFAULT_MAX_BATCH_SIZE, EngineConfig
from pipeline.config.files import reject_unknown_fields
from pipeline.config.model import ModelSpec
from pipeline.config.task import SamplingParams, sampling_params, settle_task_fields
from pipeline.config.validate import check_positive_ints, is_int


@dataclass(frozen=True, kw_only=True)
class DCAProcessorConfig:
    """What `build_processor` runs. Frozen and validated; `from_dict` rejects unknown keys."""

    # "smollm2" (the embedded SmolLM2-135M-Instruct), a Hugging Face directory or a .gguf file;
    # the same path must exist on every node that runs an engine actor.
    model: str = "smollm2"
    # "summarize" | "qa".
    task: str = "summarize"
    # Ranks (GPUs) per replica: DeepSpeed AutoTP tensor parallelism inside one node.
    tp_size: int = 1
    # Engine replicas: an int for a fixed pool, or (min, max) for an autoscaling pool.
    concurrency: int | tuple[int, int] = 1
    # Documents per engine call (one Ray Data batch); the engine batches inside it.
    batch_size: int = 4
    # CPU actors that check rows and tokenise (1 CPU each).
    prompt_concurrency: int = 1
    # Longest prompt sent to the model; longer documents are truncated (see truncation).
    max_input_tokens: int = 8192
    max_new_tokens: int = 256
    # DCAConfig fields ({} = the model's defaults: pretraining_length = max_position_embeddings),
    # or None to run the model without DCA.
    dca: dict | None = field(default_factory=dict)
    # "auto" (cuda when the cluster has GPUs) | "cuda" | "cpu".
    device: str = "auto"
    # "auto" (bf16 on GPU, fp32 on CPU) | "float32" | "bfloat16" | "float16".
    dtype: str = "auto"
    # "auto" (the model dtype) | "int8".
    kv_cache_dtype: str = "auto"
    # Input columns. question_column: QA only (None: "questions").
    id_column: str = "id"
    text_column: str = "text"
    question_column: str | None = None
    # "middle" keeps beginning and end of an over-long document, "end" the beginning.
    truncation: str = "middle"
    # QA under truncation "hierarchical": "reduce" (a combine prompt) or "confidence" (the section
    # answer the model was most confident of).
    qa_combine: str = "reduce"
    # Prompt tokens per prefill forward: "auto" (the engine's default: prompt blocks interleaved
    # with the running decode steps), None one shot, "chunk" one DCA chunk, or a number.
    prefill_block: int | str | None = "auto"
    # CPUs (and torch threads) per rank.
    cpus_per_rank: int = 1
    # Greedy unless do_sample. stop strings end generation; the repetition guard works on the
    # tokens generated so far. None: the task's defaults, the jobs' too
    # (pipeline.config.task.TASK_GENERATION_DEFAULTS).
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    # None: the tokenizer's chat template when it has one; False: the plain base template.
    use_chat_template: bool | None = None

    def __post_init__(self) -> None:
        settle_task_fields(self)
        check_positive_ints(self, ("tp_size", "batch_size", "prompt_concurrency", "max_input_tokens", "max_new_tokens",
                                   "cpus_per_rank"))
        c = self.concurrency
        if isinstance(c, list):
            object.__setattr__(self, "concurrency", c := tuple(c))
        ok = (is_int(c) and c >= 1) or (isinstance(c, tuple) and len(c) == 2 and all(is_int(x) and x >= 1 for x in c)
                                        and c[0] <= c[1])
        if not ok:
            raise ValueError(f"concurrency must be an int >= 1 or a (min, max) pair with 1 <= min <= max, got {c!r}")
        # The same checks as the jobs' (dtype, device, DCA keys, kv cache): fail here, not in an actor.
        self.model_spec()
        self.engine_config()
        if self.dca is not None:
            from dca import DCAConfig  # plain Python: no torch in the driver

            known = {f.name for f in dataclasses.fields(DCAConfig)}
            unknown = sorted(set(self.dca) - known)
            if unknown:
                raise ValueError(f"unknown dca field(s) {unknown}; known: {sorted(known)}")

    @classmethod
    def from_dict(cls, values: dict) -> DCAProcessorConfig:
        reject_unknown_fields(cls, values)
        return cls(**values)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["stop"] = list(self.stop)
        values["concurrency"] = list(self.concurrency) if isinstance(self.concurrency, tuple) else self.concurrency
        return values

    def model_spec(self) -> ModelSpec:
        return ModelSpec(model=self.model, dtype=self.dtype, dca=self.dca)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model_spec=self.model_spec(), tp_size=self.tp_size, replicas=1, max_input_tokens=self.max_input_tokens,
            device=self.device, kv_cache_dtype=self.kv_cache_dtype, prefill_block=self.prefill_block,
            cpus_per_rank=self.cpus_per_rank, max_batch_size=max(DEFAULT_MAX_BATCH_SIZE, self.batch_size),
        )

    def sampling(self) -> SamplingParams:
        return sampling_params(self)


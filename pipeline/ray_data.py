"""DCA inference as a Ray Data processor: `read_parquet -> processor -> write`, like ray.data.llm.

    import ray
    from pipeline.ray_data import DCAProcessorConfig, build_processor

    config = DCAProcessorConfig(model="smollm2", task="summarize", tp_size=1, concurrency=1,
                                max_input_tokens=16384, max_new_tokens=64)
    processor = build_processor(config, postprocess=lambda row: {**row, "chars": len(row["output"] or "")})
    out = processor(ray.data.read_parquet("examples/corpus"))
    out.write_parquet("/tmp/summaries")

`processor(ds)` returns a Dataset with the input's columns plus the job's output columns
(`OUTPUT_COLUMNS`), one row per (document, question). Two stages, both callable classes that
import torch/transformers in their constructors, so the driver stays light:

- `_PromptStage` (CPU actors): checks each row (id, text, questions), tokenises, renders the
  task's prompt and truncates it, exactly as the jobs do (pipeline.prompts); a bad row leaves with
  its error set and is never sent to a model.
- `_EngineStage` (an actor pool of `concurrency` actors, autoscaling for a (min, max) pair): each
  actor owns one engine replica (pipeline.engine.ReplicaPool with one replica: `tp_size` rank
  actors in a STRICT_PACK placement group, DeepSpeed AutoTP on GPUs), sends a batch of prompts
  through it and explodes the results to one row per question. A rank that dies is rebuilt and
  its requests retried by the engine; an actor (or node) lost mid-batch is retried by Ray Data.

Live metrics (`ray.util.metrics`, so Ray's Prometheus endpoint and dashboard show them) are
listed in `pipeline.live_metrics`.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable

import pyarrow as pa

from pipeline.config.processor import DCAProcessorConfig
from pipeline.io import INVALID_INPUT, _decode, _decode_text, _questions

# Output columns added to the input's, in this order (types as in the jobs' output schema).
OUTPUT_FIELDS = [
    pa.field("question_index", pa.int32()),
    pa.field("question", pa.string()),
    pa.field("output", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("truncated_tokens", pa.int64()),
    pa.field("prefill_s", pa.float64()),
    pa.field("decode_s", pa.float64()),
    pa.field("latency_s", pa.float64()),
    pa.field("gpu_time_s", pa.float64()),
    pa.field("peak_memory_bytes", pa.int64()),
    pa.field("memory_kind", pa.string()),
    pa.field("replica", pa.string()),
    pa.field("dca_enabled", pa.bool_()),
    pa.field("dca_pretraining_length", pa.int64()),
    pa.field("dca_chunk_size", pa.int64()),
    pa.field("dca_local_window", pa.int64()),
    pa.field("dca_temperature_alpha", pa.float64()),
]
OUTPUT_COLUMNS = tuple(f.name for f in OUTPUT_FIELDS)
# Columns the prompt stage adds for the engine stage (dropped from the output).
_PROMPT_COLUMNS = ("__dca_prefix_ids", "__dca_suffix_ids", "__dca_question_index", "__dca_question",
                   "__dca_truncated", "__dca_error_type", "__dca_error_message")


class Processor:
    """`processor(ds) -> ds`: the stages of `build_processor`, applied lazily (Ray Data plans them)."""

    def __init__(self, config: DCAProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                 postprocess: Callable[[dict], dict] | None = None, *, engine_stage: type | None = None) -> None:
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess
        # The engine stage's class: _EngineStage, or a stand-in with its constructor and call
        # signature (benchmarks/data_plane.py measures the data plane with one that answers at once).
        self.engine_stage = engine_stage or _EngineStage
        # Tags this run's live metrics (`run`), so runs sharing a cluster stay apart on a dashboard.
        self.run_id = f"ray-data-{config.task}-{uuid.uuid4().hex[:12]}"

    def __call__(self, ds):
        from ray.data import ActorPoolStrategy

        config = self.config
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        values = config.to_dict()
        ds = ds.map_batches(
            _PromptStage, fn_constructor_kwargs={"config": values}, batch_format="pyarrow",
            batch_size=config.batch_size, compute=ActorPoolStrategy(size=config.prompt_concurrency), num_cpus=1,
        )
        size = config.concurrency
        pool = ActorPoolStrategy(size=size) if isinstance(size, int) else ActorPoolStrategy(min_size=size[0],
                                                                                             max_size=size[1])
        # The actor only coordinates: its replica's ranks reserve the CPUs/GPUs (placement group).
        ds = ds.map_batches(
            self.engine_stage, fn_constructor_kwargs={"config": values, "run_id": self.run_id}, batch_format="pyarrow",
            batch_size=config.batch_size, compute=pool, num_cpus=0, max_restarts=-1, max_task_retries=-1,
        )
        if self.postprocess is not None:
            ds = ds.map(self.postprocess)
        return ds


def build_processor(config: DCAProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                    postprocess: Callable[[dict], dict] | None = None) -> Processor:
    """A Processor running `config` on a Ray Data Dataset: preprocess (a row -> row function,
    e.g. to rename columns), the prompt and engine stages, then postprocess (row -> row)."""
    if not isinstance(config, DCAProcessorConfig):
        raise TypeError(f"config must be a DCAProcessorConfig, got {type(config).__name__}")
    return Processor(config, preprocess, postprocess)


# --------------------------------------------------------------------------------------- stages


def _row_source(row: int) -> str:
    return f"row {row} of this batch"


class _PromptStage:
    """Checks rows and renders prompts (token ids), in CPU actors that hold the tokenizer."""

    def __init__(self, config: dict) -> None:
        from pipeline.engine.models import load_tokenizer
        from pipeline.prompts import PromptBuilder, load_templates

        self.config = DCAProcessorConfig.from_dict(config)
        spec = self.config.model_spec()
        self.builder = PromptBuilder(
            load_tokenizer(spec), task=self.config.task, templates=load_templates(None),
            max_input_tokens=self.config.max_input_tokens, truncation=self.config.truncation,
            use_chat_template=self.config.use_chat_template,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.io import _as_bytes
        from pipeline.prompts import PromptError

        c = self.config
        for column in (c.id_column, c.text_column) + ((c.question_column,) if c.question_column else ()):
            if column not in batch.column_names:
                raise ValueError(f"input column {column!r} is missing (columns: {batch.column_names}); set "
                                 "id_column / text_column / question_column in DCAProcessorConfig")
        clash = sorted(set(batch.column_names) & (set(OUTPUT_COLUMNS) | set(_PROMPT_COLUMNS)))
        if clash:
            raise ValueError(f"input columns {clash} clash with the processor's output columns; rename them "
                             "in preprocess")
        ids = _as_bytes(batch.column(c.id_column)).to_pylist()
        texts = _as_bytes(batch.column(c.text_column)).to_pylist()
        raw_qs = _as_bytes(batch.column(c.question_column)).to_pylist() if c.question_column else [None] * len(ids)
        is_list = bool(c.question_column) and (pa.types.is_list(batch.schema.field(c.question_column).type)
                                               or pa.types.is_large_list(batch.schema.field(c.question_column).type))
        out = {name: [] for name in _PROMPT_COLUMNS}
        for i, (raw_id, raw_text, raw_q) in enumerate(zip(ids, texts, raw_qs)):
            where = f"id {raw_id!r}" if raw_id is not None else _row_source(i)
            _, id_error = _decode(raw_id, "id")
            text, text_error = _decode_text(raw_text)
            questions, q_errors = _questions(raw_q, is_list) if c.task == "qa" else ([None], [None])
            error = id_error or text_error
            prefix, suffixes, truncated = [], [[] for _ in questions], 0
            valid = [k for k, e in enumerate(q_errors) if e is None]
            if error is None and valid:
                try:
                    prompt = self.builder.build(text, [questions[k] for k in valid] if c.task == "qa" else None)
                    prefix, truncated = prompt.prefix_ids, prompt.truncated_tokens
                    for k, suffix in zip(valid, prompt.suffix_ids):
                        suffixes[k] = suffix
                except PromptError as e:
                    error = f"prompt: {e}"
            error_type = None if error is None else INVALID_INPUT if not error.startswith("prompt:") else "prompt_too_long"
            if error_type is None and not valid:  # every question is invalid: nothing to send
                error_type = INVALID_INPUT
            out["__dca_prefix_ids"].append(prefix)
            out["__dca_suffix_ids"].append(suffixes)
            out["__dca_question_index"].append(list(range(len(questions))) if c.task == "qa" else [None])
            out["__dca_question"].append(questions)
            out["__dca_truncated"].append(truncated)
            out["__dca_error_type"].append(error_type)
            out["__dca_error_message"].append(
                [f"{where}: {error}" if error else (f"{where}: {e}" if e else None) for e in q_errors])
        types = {
            "__dca_prefix_ids": pa.list_(pa.int32()), "__dca_suffix_ids": pa.list_(pa.list_(pa.int32())),
            "__dca_question_index": pa.list_(pa.int32()), "__dca_question": pa.list_(pa.string()),
            "__dca_truncated": pa.int64(), "__dca_error_type": pa.string(), "__dca_error_message": pa.list_(pa.string()),
        }
        for name in _PROMPT_COLUMNS:
            batch = batch.append_column(name, pa.array(out[name], types[name]))
        return batch


class _EngineStage:
    """One engine replica per actor; a batch of prompts in, one row per (document, question) out."""

    _ids = itertools.count()

    def __init__(self, config: dict, run_id: str) -> None:
        from pipeline.job import dca_columns
        from pipeline.live_metrics import LiveMetrics
        from pipeline.engine.models import load_model_config

        self.config = DCAProcessorConfig.from_dict(config)
        spec = self.config.model_spec()
        self.dca = dca_columns(spec, load_model_config(spec))
        self.name = f"dca-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.metrics = LiveMetrics(run=run_id, replica=self.name)
        self.pool = self._start_engine()

    def _start_engine(self):
        from pipeline.engine import ReplicaPool

        return ReplicaPool(self.config.engine_config()).start()

    def _answer(self, requests):
        """Results of each request (a list per request, in completion order)."""
        return self.pool.run(requests, max_in_flight=max(1, len(requests)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.engine.requests import GenerationRequest

        c = self.config
        sampling = c.sampling()
        columns = {name: batch.column(name).to_pylist() for name in _PROMPT_COLUMNS}
        requests, index_of = [], {}
        for i in range(batch.num_rows):
            if columns["__dca_error_type"][i] is not None:
                continue
            messages = columns["__dca_error_message"][i]
            sent = [k for k, m in enumerate(messages) if m is None]
            request_id = f"{self.name}-{next(self._ids)}"
            requests.append(GenerationRequest(
                request_id=request_id, prefix_ids=columns["__dca_prefix_ids"][i],
                suffix_ids=[columns["__dca_suffix_ids"][i][k] for k in sent], sampling=sampling,
            ))
            index_of[request_id] = (i, sent)
        answers: dict[tuple[int, int], object] = {}
        self.metrics.queued(len(requests))
        start = time.monotonic()
        for results in self._answer(requests):
            i, sent = index_of[results[0].request_id]
            for result in results:
                answers[(i, sent[result.suffix_index])] = result
            self.metrics.answered(results)
        self.metrics.throughput(sum(r.output_tokens for r in answers.values()), time.monotonic() - start)
        # The input's own columns are carried with Arrow `take`, never decoded: a non-UTF-8 text
        # is an error row here, and must not break the rows around it.
        taken, out = [], []
        for i in range(batch.num_rows):
            first = len(out)
            questions = columns["__dca_question"][i]
            for k, question_index in enumerate(columns["__dca_question_index"][i]):
                values = {**self.dca, "question_index": question_index, "question": questions[k],
                          "truncated_tokens": columns["__dca_truncated"][i]}
                result = answers.get((i, k))
                if result is None:  # rejected before the engine: invalid input or question
                    values.update(status="error", error_type=columns["__dca_error_type"][i] or INVALID_INPUT,
                                  error_message=columns["__dca_error_message"][i][k])
                else:
                    values.update(
                        output=result.output if result.status == "ok" else None, status=result.status,
                        error_type=result.error_type, error_message=result.error_message,
                        prompt_tokens=result.prompt_tokens, output_tokens=result.output_tokens,
                        prefill_s=result.prefill_s, decode_s=result.decode_s, latency_s=result.wall_time_s,
                        gpu_time_s=result.gpu_time_s, peak_memory_bytes=result.peak_memory_bytes,
                        memory_kind=result.memory_kind, replica=f"{self.name}/{result.replica}",
                    )
                out.append(values)
                taken.append(i)
            self.metrics.document(out[first:])
        table = batch.drop_columns(list(_PROMPT_COLUMNS)).take(pa.array(taken, pa.int64()))
        for f in OUTPUT_FIELDS:
            table = table.append_column(f, pa.array([v.get(f.name) for v in out], f.type))
        return table

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            try:
                pool.shutdown()
            except Exception:  # noqa: BLE001 - the actor is going away
                pass


__all__ = ["DCAProcessorConfig", "Processor", "build_processor", "OUTPUT_COLUMNS"]

"""DCA inference as a Ray Data processor: `read_parquet -> processor -> write`, like ray.data.llm.

    import ray
    from pipeline.config.processor import DCAProcessorConfig
    from pipeline.dataflows.processor import build_processor

    config = DCAProcessorConfig(model="smollm2", task="summarize", tp_size=1, concurrency=1,
                                max_input_tokens=16384, max_new_tokens=64)
    processor = build_processor(config, postprocess=lambda row: {**row, "chars": len(row["output"] or "")})
    out = processor(ray.data.read_parquet("examples/corpus"))
    out.write_parquet("/tmp/summaries")

`processor(ds)` returns a Dataset with the input's columns plus the job's output columns
(pipeline.data.schema.PROCESSOR_COLUMNS), one row per (document, question). Two stages, both
callable classes that import torch/transformers in their constructors, so the driver stays light:

- `PromptStage` (CPU actors): checks each row (id, text, questions), tokenises, renders the
  task's prompt and truncates it, with the jobs' own row checks and row builder
  (pipeline.data.input.document_from_cells, pipeline.data.rows); a bad row leaves with its error
  rows and is never sent to a model.
- `EngineStage` (an actor pool of `concurrency` actors, autoscaling for a (min, max) pair): each
  actor owns one engine replica (pipeline.engine.ReplicaPool with one replica: `tp_size` rank
  actors in a STRICT_PACK placement group, DeepSpeed AutoTP on GPUs), sends a batch of prompts
  through it and explodes the results to one row per question. A rank that dies is rebuilt and
  its requests retried by the engine; an actor (or node) lost mid-batch is retried by Ray Data.

The rows follow pipeline.data.rows.PROCESSOR_ROWS, which says where they differ from the jobs'.
Live metrics (`ray.util.metrics`, so Ray's Prometheus endpoint and dashboard show them) are
listed in `pipeline.metrics.live`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import time
import uuid
from collections.abc import Callable

import pyarrow as pa

from pipeline.config.processor import DCAProcessorConfig
from pipeline.config.task import HIERARCHICAL
from pipeline.data.input import cells_as_bytes, document_from_cells
from pipeline.data.long_documents import LongDocumentPrompts, requests_with_follow_ups
from pipeline.data.prompts import PromptBuilder, load_templates
from pipeline.data.rows import (
    PROCESSOR_ROWS, dca_columns, prepare_document, result_rows, set_engine_attention, split_rows,
    stamp_engine_attention,
)
from pipeline.data.schema import PROCESSOR_COLUMNS, PROCESSOR_FIELDS
from pipeline.metrics.live import LiveMetrics
from pipeline.runtime.ray_data_output import quiet_execution

# The column the prompt stage adds for the engine stage (dropped from the output): each input
# row's prepared document (pickled pipeline.data.rows.PreparedDocument).
PREPARED_COLUMN = "__dca_prepared"


class Processor:
    """`processor(ds) -> ds`: the stages of `build_processor`, applied lazily (Ray Data plans them)."""

    def __init__(self, config: DCAProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                 postprocess: Callable[[dict], dict] | None = None, *, engine_stage: type | None = None) -> None:
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess
        # The engine stage's class: EngineStage, or a stand-in with its constructor and call
        # signature (benchmarks/data_plane.py measures the data plane with one that answers at once).
        self.engine_stage = engine_stage or EngineStage
        # Tags this run's live metrics (`run`), so runs sharing a cluster stay apart on a dashboard.
        self.run_id = f"ray-data-{config.task}-{uuid.uuid4().hex[:12]}"

    def __call__(self, ds):
        from ray.data import ActorPoolStrategy

        config = self.config
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        values = config.to_dict()
        ds = ds.map_batches(
            PromptStage, fn_constructor_kwargs={"config": values}, batch_format="pyarrow",
            batch_size=config.batch_size, compute=ActorPoolStrategy(size=config.prompt_concurrency), num_cpus=1,
        )
        size = config.concurrency
        pool = ActorPoolStrategy(size=size) if isinstance(size, int) else ActorPoolStrategy(min_size=size[0],
                                                                                             max_size=size[1])
        # The actor only coordinates: its replica's ranks reserve the CPUs/GPUs (placement group).
        # An actor lost mid-batch is restarted and its batch retried: Ray Data's default for actor
        # pools (max_restarts=-1, max_task_retries=-1; passing them is deprecated in Ray 2.60).
        ds = ds.map_batches(
            self.engine_stage, fn_constructor_kwargs={"config": values, "run_id": self.run_id}, batch_format="pyarrow",
            batch_size=config.batch_size, compute=pool, num_cpus=0,
        )
        if self.postprocess is not None:
            ds = ds.map(self.postprocess)
        # Ray Data's one global progress bar, no plan and no per-operator bars on the console (its
        # log file keeps them): the DataContext is the input dataset's own, which Ray Data shares
        # with every dataset derived from it (pipeline.runtime.ray_data_output).
        quiet_execution(ds.context, progress=True)
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


def _long_prompts(config: DCAProcessorConfig, tokenizer) -> LongDocumentPrompts | None:
    """The prompts of documents answered in sections (truncation "hierarchical"), else None."""
    if config.truncation != HIERARCHICAL:
        return None
    return LongDocumentPrompts(tokenizer, task=config.task, templates=load_templates(None),
                               max_input_tokens=config.max_input_tokens, use_chat_template=config.use_chat_template,
                               qa_combine=config.qa_combine)


def _base_row(config: DCAProcessorConfig) -> dict:
    """The columns every row of the processor shares: the DCA settings in effect."""
    from pipeline.engine.models import load_model_config

    spec = config.model_spec()
    return dca_columns(spec, load_model_config(spec))


def _prompt_builder(config: DCAProcessorConfig) -> PromptBuilder:
    from pipeline.engine.models import load_tokenizer

    return PromptBuilder(
        load_tokenizer(config.model_spec()), task=config.task, templates=load_templates(None),
        max_input_tokens=config.max_input_tokens, truncation=config.truncation,
        use_chat_template=config.use_chat_template,
    )


class PromptStage:
    """Checks rows and renders prompts (token ids), in CPU actors that hold the tokenizer."""

    def __init__(self, config: dict) -> None:
        self.config = DCAProcessorConfig.from_dict(config)
        self.builder = _prompt_builder(self.config)
        self.long_prompts = _long_prompts(self.config, self.builder.tokenizer)
        self.base = _base_row(self.config)
        self.sampling = self.config.sampling()

    def __call__(self, batch: pa.Table) -> pa.Table:
        c = self.config
        for column in (c.id_column, c.text_column) + ((c.question_column,) if c.question_column else ()):
            if column not in batch.column_names:
                raise ValueError(f"input column {column!r} is missing (columns: {batch.column_names}); set "
                                 "id_column / text_column / question_column in DCAProcessorConfig")
        clash = sorted(set(batch.column_names) & (set(PROCESSOR_COLUMNS) | {PREPARED_COLUMN}))
        if clash:
            raise ValueError(f"input columns {clash} clash with the processor's output columns; rename them "
                             "in preprocess")
        ids = cells_as_bytes(batch.column(c.id_column)).to_pylist()
        texts = cells_as_bytes(batch.column(c.text_column)).to_pylist()
        raw_qs = cells_as_bytes(batch.column(c.question_column)).to_pylist() if c.question_column else [None] * len(ids)
        is_list = bool(c.question_column) and (pa.types.is_list(batch.schema.field(c.question_column).type)
                                               or pa.types.is_large_list(batch.schema.field(c.question_column).type))
        prepared = []
        for i, (raw_id, raw_text, raw_q) in enumerate(zip(ids, texts, raw_qs)):
            where = f"id {raw_id!r}" if raw_id is not None else _row_source(i)
            doc = document_from_cells(raw_id, raw_text, raw_q, source=where, has_questions=c.task == "qa",
                                      questions_are_lists=is_list)
            prepared.append(pickle.dumps(prepare_document(doc, task=c.task, builder=self.builder, base=self.base,
                                                          sampling=self.sampling, rules=PROCESSOR_ROWS,
                                                          long_prompts=self.long_prompts), protocol=5))
        return batch.append_column(PREPARED_COLUMN, pa.array(prepared, pa.large_binary()))


class EngineStage:
    """One engine replica per actor; a batch of prompts in, one row per (document, question) out.
    Stand-ins (benchmarks, tests) override `_start_engine` and `_answer`."""

    _ids = itertools.count()

    def __init__(self, config: dict, run_id: str) -> None:
        self.config = DCAProcessorConfig.from_dict(config)
        self.base = _base_row(self.config)
        self.builder = _prompt_builder(self.config)  # outputs as the jobs write them (output_text)
        # Documents answered in sections (truncation hierarchical): their later calls.
        self.long_prompts = _long_prompts(self.config, self.builder.tokenizer)
        self.name = f"dca-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.metrics = LiveMetrics(run=run_id, replica=self.name)
        # The engine starts with the first batch that has a prompt for it: a dataset with none
        # (empty, or only bad rows) finishes at once, without reserving a replica.
        self.pool = None
        self.attention = None  # the replica's attention backend, known once the engine has started

    def _start_engine(self):
        from pipeline.engine import ReplicaPool

        pool = ReplicaPool(self.config.engine_config()).start()
        # The replica's attention backend, chosen at its start: every row this actor writes from
        # now on carries it (pipeline.engine.attention_record).
        attention = getattr(pool, "attention", None)  # a stand-in pool may not say
        self.attention = attention() if attention is not None else None
        set_engine_attention(self.base, self.attention)
        return pool

    def _answer(self, requests, max_in_flight: int):
        """Results of each request (a list per request, in completion order). `requests` is an
        iterable that may yield None: wait for a result (ReplicaPool.run's contract)."""
        return self.pool.run(requests, max_in_flight=max_in_flight)

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return self._answer_batch(batch)
        except BaseException:
            # A batch that raises fails the run (Ray Data does not retry a UDF's exception), but Ray
            # Data may keep this actor alive after the failed execution (restartable, referenced
            # by what it produced), and with it the replica's placement group: a later run in the
            # same Ray session would find those CPUs/GPUs taken. Release it now; a later batch to
            # this actor starts a new engine.
            self._release_engine()
            raise

    def _release_engine(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                pool.shutdown()  # kills the ranks and removes the placement group
            except Exception:  # noqa: BLE001 - the failure that brought us here is the one to report
                pass

    def _answer_batch(self, batch: pa.Table) -> pa.Table:
        prepared = [pickle.loads(p) for p in batch.column(PREPARED_COLUMN).to_pylist()]
        requests, row_of = [], {}
        for i, item in enumerate(prepared):
            if item.request is not None:
                request_id = f"{self.name}-{next(self._ids)}"  # ids may repeat in a processor's input
                requests.append(dataclasses.replace(item.request, request_id=request_id))
                row_of[request_id] = i
            elif item.pending is not None:  # answered in sections: its first calls
                item.pending.split.key = f"{self.name}-{next(self._ids)}"
                for call in item.pending.split.start(self.long_prompts):
                    requests.append(call)
                    row_of[call.request_id] = i
        answers: dict[int, list] = {}
        self.metrics.queued(len(requests))
        if requests and self.pool is None:
            self.pool = self._start_engine()
        start = time.monotonic()
        follow_ups: list = []
        open_splits = [sum(item.request is None and item.pending is not None for item in prepared)]
        source = requests_with_follow_ups(requests, follow_ups, lambda: open_splits[0] > 0)
        for results in (self._answer(source, max(1, len(requests))) if requests else ()):
            for result in results:
                result.replica = f"{self.name}/{result.replica}"
            i = row_of[results[0].request_id]
            self.metrics.answered(results)
            split = prepared[i].pending.split if prepared[i].pending is not None else None
            if split is None:
                answers[i] = results
                continue
            follow = split.on_results(results[0].request_id, results, self.long_prompts)
            for call in follow:
                row_of[call.request_id] = i
            self.metrics.queued(len(follow))
            follow_ups.extend(follow)
            if split.finished:
                open_splits[0] -= 1
                answers[i] = split.results
        self.metrics.throughput(sum(r.output_tokens for rs in answers.values() for r in rs), time.monotonic() - start)
        # The input's own columns are carried with Arrow `take`, never decoded: a non-UTF-8 text
        # is an error row here, and must not break the rows around it.
        taken, out = [], []
        for i, item in enumerate(prepared):
            if item.request is None and item.pending is not None:
                rows = split_rows(item.pending, base=self.base, rules=PROCESSOR_ROWS)
            elif item.request is None:
                rows = item.rows
                stamp_engine_attention(rows, self.attention)  # built by the prompt stage
            else:
                rows = result_rows(item.pending, answers.get(i, []), base=self.base, builder=self.builder,
                                   rules=PROCESSOR_ROWS)
            out.extend(rows)
            taken.extend([i] * len(rows))
            self.metrics.document(rows)
        table = batch.drop_columns([PREPARED_COLUMN]).take(pa.array(taken, pa.int64()))
        for f in PROCESSOR_FIELDS:
            table = table.append_column(f, pa.array([row.get(f.name) for row in out], f.type))
        return table

    def __del__(self) -> None:
        # Ray Data deletes the UDF when its actor exits gracefully (_MapWorker.__ray_shutdown__).
        if getattr(self, "pool", None) is not None:
            self._release_engine()


__all__ = ["Processor", "build_processor", "PromptStage", "EngineStage"]

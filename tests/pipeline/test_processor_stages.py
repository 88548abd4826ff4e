"""The Ray Data processor's stages called directly (no Ray): summaries written as the jobs write
them, and a batch with nothing for the model answered without starting an engine."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.processor import DCAProcessorConfig
from pipeline.data.schema import PROCESSOR_COLUMNS
from pipeline.dataflows.processor import EngineStage, PromptStage
from tests.jobs.conftest import TINY_DCA, FakePool, tiny_chat_model, write_corpus  # noqa: F401 (fixture)

# What a model writes after the chat prompt's response prefix ("Summary:"): a new line first.
GENERATED = "\nIn the story of Esther, a queen saves her people."


class _LeadingNewlinePool(FakePool):
    """FakePool whose every answer is GENERATED."""

    def _answer(self, request):
        results = super()._answer(request)
        for result in results:
            result.output = GENERATED
        return results


class _StandInEngineStage(EngineStage):
    started = 0

    def _start_engine(self):
        type(self).started += 1
        return _LeadingNewlinePool()


class _NoEngineStage(EngineStage):
    def _start_engine(self):
        raise AssertionError("the engine was started for a batch with nothing for it")


def _config(model, **kw) -> dict:
    return DCAProcessorConfig(model=model, dca=TINY_DCA, max_input_tokens=150, max_new_tokens=6, device="cpu",
                              **kw).to_dict()


def _through_stages(config: dict, table: pa.Table, engine_stage=_StandInEngineStage) -> pa.Table:
    return engine_stage(config, run_id="test")(PromptStage(config)(table))


def test_processor_summaries_are_the_jobs_text(tiny_chat_model, tmp_path):
    """The same generated text becomes the same output in the processor and in the job: the
    whitespace after the response prefix dropped (before: the processor kept "\\nIn the story")."""
    from pipeline.config.job import JobConfig
    from pipeline.config.model import ModelSpec
    from pipeline.data.writer import read_output
    from pipeline.job import run_job

    write_corpus(str(tmp_path / "corpus"), 4, bad_rows=False, files=1)
    table = pq.read_table(tmp_path / "corpus" / sorted(os.listdir(tmp_path / "corpus"))[0])
    out = _through_stages(_config(tiny_chat_model), table)
    processor = dict(zip(out["id"].to_pylist(), out["output"].to_pylist()))
    assert set(out["status"].to_pylist()) == {"ok"} and len(processor) == 4

    job = JobConfig(task="summarize", input_path=str(tmp_path / "corpus"), output_dir=str(tmp_path / "out"),
                    model_spec=ModelSpec(model=tiny_chat_model, dca=TINY_DCA), max_input_tokens=150,
                    max_new_tokens=6, progress=False, device="cpu")
    run_job(job, pool_factory=lambda c: _LeadingNewlinePool())
    by_job = {r["id"]: r["output"] for r in read_output(job.output_dir).to_pylist()}
    assert processor == by_job
    assert set(processor.values()) == {GENERATED.lstrip()}


@pytest.mark.parametrize("rows", ["none", "only_bad"])
def test_a_batch_with_nothing_for_the_model_starts_no_engine(tiny_chat_model, rows):
    """An empty batch (an empty dataset) or one of bad rows only: rows at once, no replica."""
    if rows == "none":
        table = pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    else:
        table = pa.table({"id": ["a", "b"], "text": [None, ""]})
    out = _through_stages(_config(tiny_chat_model), table, engine_stage=_NoEngineStage)
    assert set(PROCESSOR_COLUMNS) <= set(out.column_names)
    if rows == "none":
        assert out.num_rows == 0
    else:
        assert out["status"].to_pylist() == ["error", "error"]
        assert set(out["error_type"].to_pylist()) == {"invalid_input"}


class _RecordingDataset:
    """Stands in for a ray.data.Dataset: records each transform's keyword arguments."""

    def __init__(self) -> None:
        from ray.data import DataContext

        self.calls: list[tuple[str, dict]] = []
        self.context = DataContext()  # a Dataset's own context (the processor sets what Ray Data prints)

    def map_batches(self, fn, **kwargs):
        self.calls.append(("map_batches", kwargs))
        return self

    def map(self, fn, **kwargs):
        self.calls.append(("map", kwargs))
        return self


def test_the_processor_passes_ray_data_no_deprecated_remote_args(tiny_chat_model):
    """Every keyword the processor gives map/map_batches is one of their named parameters: the
    rest are Ray remote arguments, deprecated in Ray 2.60 (before: max_restarts and
    max_task_retries, a RayDeprecationWarning on every run)."""
    import inspect

    import ray.data

    from pipeline.dataflows.processor import build_processor

    config = DCAProcessorConfig.from_dict(_config(tiny_chat_model))
    ds = _RecordingDataset()
    build_processor(config, preprocess=lambda r: r, postprocess=lambda r: r)(ds)
    assert [name for name, _ in ds.calls] == ["map", "map_batches", "map_batches", "map"]
    # What Ray Data prints for the processor's dataset: its one global bar, no plan (issue 22 item 3).
    assert (ds.context.print_on_execution_start, ds.context.enable_operator_progress_bars,
            ds.context.enable_progress_bars) == (False, False, True)
    for name, kwargs in ds.calls:
        named = {p.name for p in inspect.signature(getattr(ray.data.Dataset, name)).parameters.values()
                 if p.kind is not inspect.Parameter.VAR_KEYWORD}
        assert set(kwargs) <= named, (name, sorted(set(kwargs) - named))

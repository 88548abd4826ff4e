"""The processor after a failed run: its engine's placement group is released, so a later run in
the same Ray session finds the CPUs (GPUs) free again (issue 22, item 21)."""

from __future__ import annotations

import time

import pytest

from pipeline.config.processor import DCAProcessorConfig
from pipeline.dataflows.processor import Processor
from tests.jobs.conftest import TINY_DCA, tiny_chat_model, write_corpus  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def ray_two_cpus():
    """A private local Ray of 2 CPUs: the prompt actor's and one engine rank's."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _failing_engine_stage() -> type:
    """The processor's engine stage, failing its first batch once its engine (and placement group)
    has started. Defined in a function so Ray pickles it by value."""
    from pipeline.dataflows.processor import EngineStage

    class FailingEngineStage(EngineStage):
        def _answer(self, requests, max_in_flight):
            raise RuntimeError("injected failure in the engine stage")

    return FailingEngineStage


def _engine_groups(ray) -> list[dict]:
    """Placement groups holding resources (an engine replica's: one bundle per rank)."""
    from ray.util import placement_group_table

    return [g for g in placement_group_table().values() if g["state"] not in ("REMOVED",)]


@pytest.mark.slow
def test_a_failed_processor_run_releases_its_engines_placement_group(ray_two_cpus, tiny_chat_model, tmp_path):
    ray = ray_two_cpus
    write_corpus(str(tmp_path / "corpus"), 4, bad_rows=False, max_words=40)
    config = DCAProcessorConfig(model=tiny_chat_model, dca=TINY_DCA, max_input_tokens=150, max_new_tokens=4,
                                device="cpu", batch_size=2)
    failing = Processor(config, engine_stage=_failing_engine_stage())
    with pytest.raises(Exception, match="injected failure in the engine stage"):
        failing(ray.data.read_parquet(str(tmp_path / "corpus"))).take_all()

    # Ray removes what it lets go asynchronously: a few seconds, not the run's lifetime.
    deadline = time.monotonic() + 60
    while (_engine_groups(ray) or ray.available_resources().get("CPU", 0) < 2) and time.monotonic() < deadline:
        time.sleep(1)
    assert _engine_groups(ray) == []
    assert ray.available_resources().get("CPU", 0) == 2

    # A later run in the same session gets its replica (it would wait placement_timeout_s, then fail).
    rows = Processor(config)(ray.data.read_parquet(str(tmp_path / "corpus"))).take_all()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}

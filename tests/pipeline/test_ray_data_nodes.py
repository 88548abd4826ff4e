"""The Ray Data processor on a multi-node cluster (a head and two worker nodes on this machine):
a node removed mid-run loses no row. Its own module: the state API must see this cluster only,
not a local Ray another module's fixture keeps running."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from pipeline.dataflows.processor import Processor, EngineStage
from tests.jobs.conftest import tiny_chat_model, write_corpus  # noqa: F401 (fixture)
from tests.pipeline.test_ray_data import _config


def _node_of_a_serving_rank(list_actors, address: str, workers, timeout_s: float = 60.0) -> str:
    """A worker node holding an alive rank actor (the state API can lag behind the actors)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # The address explicitly: without it the state API finds "the latest cluster started on
        # this machine", which is another one when other jobs run Ray beside the test.
        alive = list_actors(address=address, filters=[("class_name", "=", "RankWorker"), ("state", "=", "ALIVE")])
        serving = [a.node_id for a in alive if a.node_id in workers]
        if serving:
            return serving[0]
        time.sleep(0.5)
    raise AssertionError(f"no alive rank actor on a worker node within {timeout_s} s")


def _gated(stage: type, gate: str) -> type:
    """`stage` (an engine stage class: the processor's or the jobs' ray-data one), holding each
    actor's calls after its first until `gate` exists, and touching `gate`.first.<actor> once its
    first call is answered: the run cannot end before the test has removed a node (on a fast
    machine it otherwise could, leaving no rank to remove). Defined in a function so Ray pickles
    it by value, `gate` included."""

    class Gated(stage):
        def __call__(self, batch):
            import os
            import time

            self.calls = getattr(self, "calls", 0) + 1
            deadline = time.monotonic() + 300
            while self.calls > 1 and not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.1)
            out = super().__call__(batch)
            open(f"{gate}.first.{self.name}", "a").close()
            return out

    return Gated


def _remove_a_serving_node(cluster, list_actors, workers, nodes, gate, removed: list, answered: int = 1) -> None:
    """Once `answered` engine actors have answered a first call: removes the node of a serving
    rank, then opens the gate. (A thread: Ray Data hands rows on per finished task, so the
    consumer sees none before.)"""
    import time

    deadline = time.monotonic() + 300
    while len(list(gate.parent.glob(gate.name + ".first.*"))) < answered and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        node = _node_of_a_serving_rank(list_actors, cluster.address, workers)
        cluster.remove_node(nodes[node])
        removed.append(node)
    finally:
        gate.touch()


@pytest.mark.slow
def test_a_worker_node_removed_mid_run_loses_no_row(tiny_chat_model, tmp_path):
    """A head and two worker nodes on this machine; the node of a serving rank leaves after the
    first batch is answered (and before the rest can be), and every document still comes out exactly
    once, all ok."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    if ray.is_initialized():
        ray.shutdown()
    # Its own dashboard port: the state API goes through the dashboard, and another Ray on the
    # machine may hold the default one.
    from tests.pipeline.test_ray_data import _free_port

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": _free_port()})
    # 3 CPUs a node: after the removal the surviving node must hold its own rank, the lost
    # replica's rank (restarted there) and a prompt actor; with 2 the restarted replica waits
    # for a CPU that never frees and its start fails (placement_timeout_s).
    workers = {cluster.add_node(num_cpus=3).node_id: None for _ in range(2)}
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        write_corpus(str(tmp_path / "corpus"), 40, bad_rows=False, min_words=60, max_words=120, files=4)
        config = _config(tiny_chat_model, concurrency=2, batch_size=2, max_new_tokens=12)
        gate = tmp_path / "gate"
        processor = Processor(config, engine_stage=_gated(EngineStage, str(gate)))
        ds = processor(ray.data.read_parquet(str(tmp_path / "corpus"), override_num_blocks=8))
        removed: list[str] = []
        remover = threading.Thread(target=_remove_a_serving_node,
                                   args=(cluster, list_actors, workers, nodes, gate, removed), daemon=True)
        remover.start()
        rows = list(ds.iter_rows())
        remover.join(timeout=60)
        assert len(removed) == 1
        ids = Counter(r["id"] for r in rows)
        assert len(ids) == 40 and set(ids.values()) == {1}
        assert all(r["status"] == "ok" for r in rows), [r["error_message"] for r in rows if r["status"] != "ok"][:3]
    finally:
        ray.shutdown()
        cluster.shutdown()

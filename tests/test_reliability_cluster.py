"""Fault (c): a worker node removed from a two-node local Ray cluster in the middle of a restyle.

The head node has room for one generator actor, the worker node for another. The scenario is forced,
not left to the scheduler: a placeholder actor pinned to the head holds the head's only CPU until the
job has committed a shard, so the first generator actor runs, and commits, on the worker node (the only
CPU free). Then the worker node is removed and the placeholder killed: Ray Data replaces the lost actor
on the head and retries what was in flight; every input key ends up exactly once and the output equals
an uninterrupted run's, byte for byte. (Before the placeholder, the test's precondition "the removed
node had committed shards" failed when both actors started on the head first; issue 17.)
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from pipeline_fixtures import make_inputs, tiny_unet_dir, tree

from dclip_ray.stages.inputs import input_shards
from dclip_ray.stages.restyle import ShardRestyler
from dclip_ray.stages.restyle_config import build_restyle_config, write_declaration
from dclip_ray.stages.verify import verify

T0, N_INV, N_GEN = 200, 4, 4


@pytest.mark.slow
def test_a_worker_node_removed_mid_run_loses_and_duplicates_nothing(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from dclip_ray.pipeline.restyle import RestyleJob, run_restyle

    torch.set_num_threads(1)
    data, keys = make_inputs(tmp_path, n=96, shard_size=8)
    base = tiny_unet_dir(tmp_path / "base", 0)
    ft = tiny_unet_dir(tmp_path / "ft", 1, {"base_model": base, "config": {"t0": T0}})

    def config(out):
        return build_restyle_config(out, models=[ft], n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)

    clean = str(tmp_path / "clean")
    for n, p in input_shards(data):  # the reference: the same unit of work, no Ray, no fault
        ShardRestyler(config(clean)).run(n, p)
    write_declaration(config(clean), data)  # what the restyle driver writes beside the shards

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        head_id, worker_id = cluster.head_node.node_id, worker.node_id

        @ray.remote(num_cpus=1)
        class Placeholder:
            def node(self):
                return ray.get_runtime_context().get_node_id()

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        hold = Placeholder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote()
        assert ray.get(hold.node.remote(), timeout=60) == head_id, "the head's only CPU is held"
        out = str(tmp_path / "out")
        result: dict = {}

        def run():
            try:
                result["summary"] = run_restyle(RestyleJob(config(out), data, actors=2, cpus_per_actor=1.0),
                                                progress=False)
            except BaseException as e:  # noqa: BLE001
                result["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        deadline = time.time() + 240
        folder = os.path.join(out, "ft")  # the model's output folder
        while time.time() < deadline and not (os.path.isdir(folder) and any(f.endswith("_stats.json")
                                                                            for f in os.listdir(folder))):
            time.sleep(0.1)
        committed = [f for f in os.listdir(folder) if f.endswith("_stats.json")]
        # every shard committed so far ran on the worker node: the head's only CPU is held
        assert 1 <= len(committed) < 14, "the node is removed mid-run, after it committed a shard"
        cluster.remove_node(worker)
        ray.kill(hold)  # the head's CPU is free: the replacement actor starts there
        t.join(timeout=420)
        assert not t.is_alive(), "the job finished after losing a node"
        assert "error" not in result, result.get("error")
        s = result["summary"]
        assert s["n_images"] == 96 + 2 and s["n_errors"] == 4 and not s["failed"]
        nodes = [r.get("node") for r in s["shards"]]
        # (a row of a shard committed on the worker may have been lost with the node and recomputed on
        # the head, so the worker's id need not appear here; the commits before removal prove it worked)
        assert set(nodes) <= {head_id, worker_id} and head_id in nodes, "the rest ran on the head node"
        report = verify(out, data)
        assert report.ok, report.problems
        assert sum(x["n"] for x in report.shards) == sum(len(k) for k in keys.values())
        assert tree(out) == tree(clean), "every shard equals the uninterrupted run's"
    finally:
        ray.shutdown()
        cluster.shutdown()

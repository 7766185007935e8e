"""Fault (d) on Ray Train: a fine-tuning worker that raises once resumes from its last checkpoint and
ends with exactly the weights of an uninterrupted run of the same seed (CPU, deterministic).

Two prompts with the same settings train side by side; one of them has an injected failure after 3
batches (a callback from tests/train_faults.py, put in the Train loop by ``inject_failure``). (The
loop-level version, without Ray, is tests/test_finetune_mechanics.py.)
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel
from pipeline_fixtures import make_inputs, random_clip_weights, tiny_unet_dir
from train_faults import inject_failure, worker_pythonpath

from dclip_ray.config import Resources, TrainingSets
from dclip_ray.io.latents import LatentKey
from dclip_ray.models.cache import cached_base
from dclip_ray.stages.inputs import input_shards
from dclip_ray.stages.precompute import precompute_shard

T0, N_INV = 200, 4


@pytest.mark.slow
def test_a_failed_train_worker_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    import ray

    from dclip_ray.pipeline.finetune_many import FinetuneManyJob, run_finetune_many

    torch.set_num_threads(1)
    data, _ = make_inputs(tmp_path, n=8, shard_size=8)
    base = tiny_unet_dir(tmp_path / "base", 0)
    key = LatentKey(cached_base(base).sha256, T0, N_INV, 32)
    lat = str(tmp_path / "lat")
    for n, p in input_shards(data):
        precompute_shard(base, None, n, p, lat, key)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle -> blue circle name=plain\nred circle -> blue circle name=failing\n")
    job = FinetuneManyJob(prompts=str(prompts), model=base, out=str(tmp_path / "models"), latents=lat,
                          clip="toy_clip", clip_weights=random_clip_weights(tmp_path), resources=Resources(max_failures=1),
                          training_sets=TrainingSets(select="first"),  # the test's images are not its source: resume only
                          settings=dict(n_train=4, t0=T0, n_inv_steps=N_INV, n_gen_steps=2, epochs=2, lr=1e-4, aug_views=1,
                                        checkpoint_every=1, seed=0))
    inject_failure(monkeypatch, 3, tmp_path / "failed", "failing")
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath())  # the Train workers import train_faults
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="ERROR",
             log_to_driver=False)
    try:
        s = run_finetune_many(job, progress=False)
    finally:
        ray.shutdown()
    by_name = {p["name"]: p for p in s["prompts"]}
    assert (tmp_path / "failed").exists(), "the failure was injected"
    assert [p["status"] for p in s["prompts"]] == ["ok", "ok"], s
    # the failure came after 3 batches x 2 steps (efficient mode: an optimiser step per generation step)
    assert by_name["failing"]["resumed_from_step"] == 3 * 2 and not by_name["plain"]["resumed_from_step"]
    a = UNet2DModel.from_pretrained(by_name["plain"]["model_path"]).state_dict()
    b = UNet2DModel.from_pretrained(by_name["failing"]["model_path"]).state_dict()
    base_sd = UNet2DModel.from_pretrained(base).state_dict()
    assert any(not torch.equal(a[k], base_sd[k]) for k in a), "training changed the weights"
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights equal the uninterrupted run's, bit for bit"

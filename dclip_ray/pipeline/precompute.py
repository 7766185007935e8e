"""`dclip-ray precompute`: Ray tasks, one per input shard, DDIM-invert every image with the ORIGINAL model
and store the latents (:mod:`dclip_ray.io.latents`), keyed by (base-model sha256, t0, S_inv, resolution,
resize policy, dtype). Committed shards are skipped; a changed key writes to another folder."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import ray

from dclip_ray.errors import AbortedError
from dclip_ray.io.latents import LatentKey, LatentStore
from dclip_ray.io.leases import new_owner
from dclip_ray.progress import progress as progress_counter
from dclip_ray.stages.common import (
    device_for,
    raise_if_leased,
    set_threads,
)
from dclip_ray.stages.inputs import absolute, fingerprints, input_shards
from dclip_ray.stages.precompute import (
    PrecomputeJob,
    check_job,
    latent_key,
    precompute_shard,
    precompute_summary,
    split_current,
)
from dclip_ray.urls import redact

from .runtime import init_ray


@ray.remote(max_retries=3)
def _precompute_task(job: PrecomputeJob, key: LatentKey, shard: str, path: str, fingerprint: str,
                     owner: str) -> dict[str, Any]:
    set_threads(job.resources.cpus_per_task)
    device = device_for(job.resources.gpus_per_task)
    return precompute_shard(job.model, job.preset, shard, path, job.out, key, job.config.batch_size,
                            job.config.recon_psnr,
                            device, job.trust_checkpoint, fingerprint, owner).as_dict()


def run_precompute(job: PrecomputeJob, progress: bool = True) -> dict[str, Any]:
    """Invert every input shard not yet committed under the job's key, one Ray task per shard.

    Returns ``{"store", "key", "shards": [per-shard summaries], "n_images", "n_errors", "n_skipped"}``
    (:func:`~dclip_ray.stages.precompute.precompute_summary`).
    """
    job = replace(job, model=absolute(job.model) or job.model, out=absolute(job.out) or job.out)
    check_job(job)
    shards = input_shards(job.input)
    key = latent_key(job)
    store = LatentStore(job.out, key)
    prints = fingerprints(shards, plan=True)  # a local tar's size and time: the driver reads no input byte
    todo, results = split_current(store, shards, prints)
    if todo:
        results += _run_tasks(job, key, todo, prints, progress)
    summary = precompute_summary(store, results, prints)
    raise_if_leased(summary["leased"])
    return summary


def _run_tasks(job: PrecomputeJob, key: LatentKey, todo: list[tuple[str, str]], prints: dict[str, str],
               progress: bool) -> list[dict[str, Any]]:
    """One Ray task per shard of ``todo``; their rows. A shard that cannot be written fails the run
    (:class:`AbortedError`, exit 3) after the others have finished."""
    init_ray(job.address, job.num_cpus, verbose=job.verbose)
    opts: dict[str, Any] = {"num_cpus": job.resources.cpus_per_task}
    if job.resources.gpus_per_task:
        opts["num_gpus"] = job.resources.gpus_per_task
    owner = new_owner()
    refs = {_precompute_task.options(**opts).remote(job, key, n, p, prints[n], owner): n for n, p in todo}
    pending, results, failed = list(refs), [], {}
    with progress_counter(len(pending), "precompute", enabled=progress, unit="shards") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    results.append(ray.get(ref))
                except Exception as e:  # noqa: BLE001  (a full disk, a read-only store: the others go on)
                    cause = getattr(e, "cause", None) or e
                    failed[refs[ref]] = redact(f"{type(cause).__name__}: {cause}".splitlines()[0])[:300]
            bar.update(len(done))
    if failed:  # work was done and committed: not a configuration error (exit 1) but an aborted run
        first = next(iter(failed.items()))
        rest = ("none was committed" if len(failed) == len(todo) else "the others are committed")
        raise AbortedError(f"{len(failed)} of {len(todo)} shard(s) could not be written (e.g. {first[0]}: "
                           f"{first[1]}); {rest}: fix the cause (disk space, permissions) "
                           "and re-run the same command to resume")
    return results

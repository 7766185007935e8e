"""`dclip-ray restyle`: Ray Data, streaming over input shards through an actor pool of generator workers.

The shard is the unit of work (as in img2dataset): the dataset is the list of uncommitted input
shards; each generator actor loads the models once (``__init__``) and, per call, reads and decodes one
whole shard (bad images become error rows), takes cached latents or inverts once per image, generates
in batches for every output variant, and writes the output tar, the Parquet manifest and the commit
marker last (:class:`dclip_ray.stages.restyle.ShardRestyler`). A retried or repeated call rewrites the
same names, so a key is never duplicated or lost; a re-run skips committed shards and leaves them
byte-identical. Memory is bounded by the shards in flight, not by the dataset.

On a 2-CPU machine actors get fractional CPUs (``--cpus-per-actor 0.5`` by default for several actors) so
that Ray Data's own tasks are never starved (../shared/REFERENCE.md sec. 5).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

import numpy as np
import ray

from dclip_ray.errors import AbortedError
from dclip_ray.io.leases import new_owner
from dclip_ray.progress import progress as progress_counter
from dclip_ray.stages.common import (
    RestyleResult,
    device_for,
    raise_if_leased,
    set_threads,
)
from dclip_ray.stages.restyle import RestyleConfig, ShardRestyler, model_shas
from dclip_ray.stages.restyle_config import restyle_plan, write_declaration
from dclip_ray.stages.restyle_run import (
    RestyleJob,
    check,
    first_cause,
    pool_size,
    run_with_timeout,
    split_committed,
    summarize,
    throughput,
)
from dclip_ray.urls import redact

from .runtime import check_local_ray, init_ray


class GeneratorActor:
    """A Ray Data actor: models loaded once; each call restyles the shards of its batch. A shard that
    has not finished after ``shard_timeout`` seconds is reported as stuck (the call returns, so the job
    goes on with the other shards; the shard stays uncommitted)."""

    COLUMNS = (*(f.name for f in fields(RestyleResult)), "node", "actor")

    def __init__(self, config: RestyleConfig, cpus: float, shard_timeout: float | None = None,
                 owner: str | None = None, restyler: Callable[[RestyleConfig], ShardRestyler] = ShardRestyler):
        set_threads(cpus)
        self.restyler = restyler(config)
        self.shard_timeout = shard_timeout
        self.owner = owner

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch``: ``{"shard": [names], "path": [paths], "fingerprint": [...]}`` -> one summary row per shard."""
        out: dict[str, list[Any]] = {k: [] for k in self.COLUMNS}
        ctx = ray.get_runtime_context()
        node, actor = ctx.get_node_id(), ctx.get_actor_id()
        for shard, path, fp in zip(batch["shard"], batch["path"], batch["fingerprint"], strict=True):
            r = self._one(str(shard), str(path), str(fp)).as_dict()
            r["truncated"] = r.get("truncated") or ""
            r["node"], r["actor"] = node, actor
            for k in out:
                out[k].append(r[k])
        return {k: np.asarray(v) for k, v in out.items()}

    def _one(self, shard: str, path: str, fingerprint: str) -> RestyleResult:
        """Restyle one shard; a failure or a timeout is reported in the result (the shard stays
        uncommitted; a re-run redoes it)."""
        try:
            res = run_with_timeout(lambda: self.restyler.run(shard, path, fingerprint, self.owner), self.shard_timeout)
        except Exception as e:  # noqa: BLE001  (the shard stays uncommitted; a re-run redoes it)
            return RestyleResult(shard, failed=redact(f"{type(e).__name__}: {e}"))
        if res is None:
            return RestyleResult(shard, seconds=float(self.shard_timeout or 0),
                                 stuck=f"no result after {self.shard_timeout:g} s (--shard-timeout)")
        return res


def plan(job: RestyleJob) -> dict[str, Any]:
    """``--dry-run``: shards, images and UNet evaluations the job would run (nothing is written); runs
    every check the real run does first. ``pool``: the actors it would start, sized from the cluster at
    ``--address`` (joined to read its resources) or, without one, from the local Ray it would start."""
    import os

    shards, prints, warnings = check(job)
    if job.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        resources = init_ray(job.address, job.num_cpus, verbose=job.verbose)
    else:
        resources = {"CPU": job.num_cpus or os.cpu_count() or 1}
    planned = restyle_plan(job.config, shards, prints)
    n_todo = sum(not r["committed"] for r in planned["shards"])
    return {**planned, "pool": pool_size(job, resources, n_todo), "warnings": warnings}


def _pool(n: int, most: int) -> Any:
    """The actor pool: all ``n`` actors start at once (growing from 1 on demand started the second actor
    only after the first had finished a shard), a smaller pool still runs when the cluster fits fewer,
    Ray Data may grow it to ``most`` when an autoscaling cluster adds nodes, and an actor holds one shard
    at a time (queueing shards on the first actor up left the late ones idle at the end)."""
    n = max(1, n)
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(n, most), initial_size=n,
                                      max_tasks_in_flight_per_actor=1)


def run_restyle(job: RestyleJob, progress: bool = True) -> dict[str, Any]:
    """Restyle every uncommitted input shard. Returns the summary
    (:func:`~dclip_ray.stages.restyle_run.summarize`: ``outputs``, ``shards``, ``n_images``, ``n_errors``,
    ``inv_evals``, ``gen_evals``, ``failed``, ``stuck``, ...); ``stuck`` names the shards that gave no
    result within ``job.shard_timeout`` seconds (the others are finished; the CLI exits 2). Raises
    :class:`AbortedError` (exit 3) when a shard failed: re-running redoes exactly the uncommitted shards."""
    cfg = job.config
    shards, prints, warnings = check(job)
    shas = model_shas(cfg)  # also validates every model before Ray starts
    hashes = [cfg.variant_hash(v, shas) for v in cfg.variants]
    todo, results = split_committed(cfg, hashes, shards, prints)
    if todo:
        check_local_ray(job.address)  # refused before the output folder is written
    write_declaration(cfg, job.input)
    pool, seconds = _run_actors(job, todo, prints, shas, results, progress) if todo else (None, 0.0)
    summary = summarize(cfg, hashes, shards, prints, todo, results, warnings, pool, seconds)
    if summary["failed"]:
        first = next(iter(summary["failed"].items()))
        raise AbortedError(f"{len(summary['failed'])} shard(s) failed (e.g. {first[0]}: {first[1]}); re-run the "
                           "same command to redo only the uncommitted shards")
    raise_if_leased(summary["leased"])
    return summary


def _run_actors(job: RestyleJob, todo: list[tuple[str, str]], prints: dict[str, str], shas: list[str],
                results: list[dict[str, Any]], progress: bool) -> tuple[dict[str, Any], float]:
    """Restyle the shards ``todo`` on a pool of :class:`GeneratorActor` s sized from the cluster, appending
    each shard's row to ``results``; returns ``(the pool, seconds since the workers started)``."""
    cfg = job.config
    pool = pool_size(job, init_ray(job.address, job.num_cpus, verbose=job.verbose), len(todo))
    pool["actors_started"] = min(pool["actors"], len(todo))
    cfg.device = device_for(job.gpus_per_actor)
    actor_cfg = replace(cfg, model_sha256s=shas)  # the actors do not hash the models again
    ds = ray.data.from_items([{"shard": n, "path": p, "fingerprint": prints[n]} for n, p in todo],
                             override_num_blocks=len(todo))
    ds = ds.map_batches(GeneratorActor, batch_size=1,
                        fn_constructor_args=(actor_cfg, pool["cpus_per_actor"], job.shard_timeout, new_owner(),
                                             ShardRestyler),  # the driver's name: a test patches it here
                        compute=_pool(pool["actors_started"], pool["max_actors"]),
                        num_cpus=pool["cpus_per_actor"], num_gpus=job.gpus_per_actor or None)
    t_work = time.monotonic()
    with progress_counter(len(todo), "restyle", enabled=progress, unit="shards") as bar:
        try:
            for row in ds.iter_rows():
                results.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
                bar.update(1)
                rate = throughput(results, time.monotonic() - t_work)
                bar.set_postfix({"images/s": rate["images_per_s"], "UNet evals/s": rate["unet_evals_per_s"]})
        except (ray.exceptions.RayError, RuntimeError, OSError, ValueError) as e:
            # the workers themselves failed (an actor that cannot load a model deleted after the checks,
            # a node lost for good): the shards they committed stay, the others are redone by a re-run
            raise AbortedError(f"the restyle workers stopped after {len(results)} of {len(todo)} shard(s): "
                               f"{first_cause(e)}; committed shards are kept: fix the cause and re-run the same "
                               "command to resume") from None
    return pool, time.monotonic() - t_work

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

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import ray

from dclip_ray.errors import AbortedError, ConfigError
from dclip_ray.io.leases import new_owner
from dclip_ray.io.shards import read_marker, shard_urls
from dclip_ray.progress import progress as progress_counter
from dclip_ray.stages.common import (
    RestyleResult,
    await_leased,
    device_for,
    raise_if_leased,
    set_threads,
    took_over_warnings,
    unreadable_shards,
)
from dclip_ray.stages.inputs import fingerprints, input_shards, io_threads, limit_shards, parallel_map
from dclip_ray.stages.restyle import RestyleConfig, ShardRestyler, model_shas, score_summary, shard_done
from dclip_ray.stages.restyle_config import check_restyle, latent_coverage, restyle_plan, write_declaration
from dclip_ray.urls import redact

from .runtime import check_local_ray, init_ray


@dataclass
class RestyleJob:
    """Arguments of `dclip-ray restyle` (see its --help) around a :class:`RestyleConfig`.

    ``restyler_factory``: a picklable callable ``config -> ShardRestyler`` (e.g. a subclass) each actor
    builds its restyler with; None: :class:`ShardRestyler`. An extension point (tests inject faults)."""

    config: RestyleConfig
    input: str
    limit: int | None = None
    actors: int | None = None  # None: from the cluster's resources once Ray is up (:func:`pool_size`)
    cpus_per_actor: float | None = None
    gpus_per_actor: float = 0.0
    address: str | None = None
    num_cpus: int | None = None
    verbose: bool = False
    shard_timeout: float | None = None
    require_latents: bool = False
    restyler_factory: Callable[[RestyleConfig], ShardRestyler] | None = None


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*")


def throughput(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The restyle's rate over the whole job so far: ``{"work_seconds", "images_done", "images_per_s",
    "unet_evals_per_s", "unet_share"}``, counting the shards this run worked on (not skipped ones) over
    ``seconds`` of wall time since the workers started (0 when nothing ran); ``unet_share`` is the share
    of the actors' time on those shards spent inside UNet calls (None when none ran)."""
    worked = [r for r in results if not r.get("skipped")]
    images = sum(int(r.get("n_ok", 0)) + int(r.get("n_error", 0)) for r in worked)
    evals = sum(int(r.get("inv_evals", 0)) + int(r.get("gen_evals", 0)) for r in worked)
    per = (lambda x: round(x / seconds, 2)) if seconds > 0 else (lambda x: 0.0)
    busy = sum(float(r.get("seconds", 0.0)) for r in worked)
    share = round(sum(float(r.get("unet_seconds", 0.0)) for r in worked) / busy, 3) if busy > 0 else None
    return {"work_seconds": round(seconds, 2), "images_done": images, "images_per_s": per(images),
            "unet_evals_per_s": per(evals), "unet_share": share}


def _first_cause(e: BaseException) -> str:
    """The original error of a Ray failure as one short line. Ray wraps it in several layers (a Ray Data
    ``SystemException`` with no text, an ``ActorDiedError`` whose text ends with the worker's traceback);
    the last ``SomeError: message`` line of the first layer that has one is the cause."""
    chain: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and x not in chain and len(chain) < 10:
        chain.append(x)
        x = getattr(x, "cause", None) or x.__cause__ or x.__context__
    for x in chain:
        lines = [ln.strip() for ln in str(x).splitlines() if _ERROR_LINE.match(ln.strip())]
        if lines:  # "dclip_ray.errors.InputFileError: M: no such ..." -> "InputFileError: M: no such ..."
            return redact(re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )", "", lines[-1]))[:300]
    text = next((ln.strip() for x in chain for ln in str(x).splitlines() if ln.strip()), "")
    return redact(f"{type(e).__name__}: {text}")[:300]


def _run_with_timeout(fn: Callable[[], RestyleResult], timeout: float | None) -> RestyleResult | None:
    """``fn()`` in a daemon thread; its result, or None when it has not returned after ``timeout`` s
    (the thread is left behind: it dies with the actor). Exceptions propagate."""
    if timeout is None:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="restyle-shard")
    t.start()
    t.join(timeout)
    if t.is_alive():
        return None
    if "error" in box:
        raise box["error"]
    return box["result"]


class GeneratorActor:
    """A Ray Data actor: models loaded once; each call restyles the shards of its batch. A shard that
    has not finished after ``shard_timeout`` seconds is reported as stuck (the call returns, so the job
    goes on with the other shards; the shard stays uncommitted)."""

    COLUMNS = (*(f.name for f in fields(RestyleResult)), "node", "actor")

    def __init__(self, config: RestyleConfig, cpus: float, shard_timeout: float | None = None,
                 owner: str | None = None, factory: Callable[[RestyleConfig], ShardRestyler] | None = None):
        set_threads(cpus)
        self.restyler = (factory or ShardRestyler)(config)
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
            res = _run_with_timeout(lambda: self.restyler.run(shard, path, fingerprint, self.owner), self.shard_timeout)
        except Exception as e:  # noqa: BLE001  (the shard stays uncommitted; a re-run redoes it)
            return RestyleResult(shard, failed=redact(f"{type(e).__name__}: {e}"))
        if res is None:
            return RestyleResult(shard, seconds=float(self.shard_timeout or 0),
                                 stuck=f"no result after {self.shard_timeout:g} s (--shard-timeout)")
        return res


def check(job: RestyleJob) -> tuple[list[tuple[str, str]], dict[str, str], list[str]]:
    """Everything the run checks before work starts: the arguments and locations
    (:func:`~dclip_ray.stages.restyle_config.check_restyle`), the input's shards and their content fingerprints, and what the latent
    store covers. Returns ``(shards, fingerprints, warnings)``; raises :class:`ConfigError` (exit 1)."""
    if job.shard_timeout is not None and job.shard_timeout <= 0:
        raise ConfigError(f"--shard-timeout {job.shard_timeout} must be > 0 seconds")
    if job.limit is not None and job.limit < 1:
        raise ConfigError(f"--limit {job.limit} must be >= 1")
    warnings = check_restyle(job.config, job.input)
    shards = limit_shards(input_shards(job.input), job.limit)
    prints = fingerprints(shards, plan=True)  # a local tar's size and time: the driver reads no input byte
    warnings += latent_coverage(job.config, shards, prints, job.require_latents)
    return shards, prints, warnings


def pool_size(job: RestyleJob, resources: dict[str, Any], n_shards: int | None = None) -> dict[str, Any]:
    """The actor pool for ``resources`` (``ray.cluster_resources()``: every node of the cluster, never the
    driver machine's cores): ``{"actors", "max_actors", "cpus_per_actor", "gpus_per_actor", "why",
    "cluster_cpus", "cluster_gpus"}`` by :meth:`~dclip_ray.config.Resources.restyle_pool`, the one rule of
    the CLI and the workflow. ``actors`` start at once; on a cluster joined at an address (which may
    autoscale) without ``--actors``, the pool may grow to ``max_actors`` = one per shard to do
    (``n_shards``) as nodes join; an embedded Ray or ``--actors`` keeps it at ``actors``."""
    import os

    from dclip_ray.config import Resources

    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    rule = Resources(actors=job.actors, cpus_per_actor=job.cpus_per_actor, gpus_per_actor=job.gpus_per_actor)
    actors, per_actor, why = rule.restyle_pool(cpus, gpus)
    joined = bool(job.address or os.environ.get("RAY_ADDRESS"))
    most = max(actors, n_shards or 0) if joined and not job.actors else actors
    if most > actors:
        why += f"; may grow to {most} (one per shard to do) as the cluster adds nodes"
    return {"actors": actors, "max_actors": most, "cpus_per_actor": per_actor, "gpus_per_actor": job.gpus_per_actor,
            "why": why, "cluster_cpus": cpus, "cluster_gpus": gpus}


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


def _marked(cfg: RestyleConfig, shard: str) -> tuple[int, int, int]:
    """``(n_ok, n_error, n_rejected)`` of a committed shard from its markers: keys done in every output
    (written there or routed away), the most error rows and the most rejected rows of any output;
    zeros without markers."""
    marks = [read_marker(shard_urls(v.out, shard)["marker"]) or {} for v in cfg.variants]
    return (min(m.get("n_ok", 0) + m.get("n_skipped", 0) for m in marks),
            max(m.get("n_error", 0) for m in marks), max(m.get("n_rejected", 0) for m in marks))


def _count_commits_of_this_run(cfg: RestyleConfig, results: list[dict[str, Any]], todo: set[str]) -> None:
    """A shard that was uncommitted when the run started but found committed when its turn came was
    committed during the run: by this run when a node was lost after its commit and before its row came
    back (Ray retries the row), or by another run that held its lease. Its images count as done in this
    run's summary, read from its markers (``done_by`` says so), so ``n_images`` does not depend on when
    a node was lost. A shard whose input was only touched (``unchanged``: the worker found it committed
    from the same content) was done before the run and is not counted."""
    for r in results:
        if r["shard"] in todo and r.get("skipped") and not r.get("n_ok"):
            n_ok, r["n_error"], r["n_rejected"] = _marked(cfg, r["shard"])
            if r.get("unchanged"):  # committed before the run, like the shards planned as done: not counted
                r["done_by"] = "committed before: its input's time or size changed, its content did not"
            else:
                r["n_ok"] = n_ok
                r["done_by"] = r.get("done_by") or "committed during this run (a retried row, or another run)"


def _pool(n: int, most: int) -> Any:
    """The actor pool: all ``n`` actors start at once (growing from 1 on demand started the second actor
    only after the first had finished a shard), a smaller pool still runs when the cluster fits fewer,
    Ray Data may grow it to ``most`` when an autoscaling cluster adds nodes, and an actor holds one shard
    at a time (queueing shards on the first actor up left the late ones idle at the end)."""
    n = max(1, n)
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(n, most), initial_size=n,
                                      max_tasks_in_flight_per_actor=1)


def run_restyle(job: RestyleJob, progress: bool = True) -> dict[str, Any]:
    """Restyle every uncommitted input shard. Returns ``{"outputs", "shards", "n_images", "n_errors",
    "inv_evals", "gen_evals", "failed", "stuck"}``; ``stuck`` names the shards that gave no result within
    ``job.shard_timeout`` seconds (the others are finished; the CLI exits 2). Raises :class:`AbortedError`
    (exit 3) when a shard failed: re-running redoes exactly the uncommitted shards."""
    cfg = job.config
    shards, prints, warnings = check(job)
    shas = model_shas(cfg)  # also validates every model before Ray starts
    hashes = [cfg.variant_hash(v, shas) for v in cfg.variants]
    threads = io_threads(cfg.variants[0].out)  # markers: in threads on an object store
    done = parallel_map(lambda s: shard_done(cfg, hashes, s[0], prints[s[0]]), shards, threads)
    todo = [s for s, d in zip(shards, done, strict=True) if not d]
    if todo:
        check_local_ray(job.address)  # refused before the output folder is written
    write_declaration(cfg, job.input)
    committed = [n for (n, _), d in zip(shards, done, strict=True) if d]
    results: list[dict[str, Any]] = [
        RestyleResult(n, skipped=True, n_error=n_error, n_rejected=n_rejected).as_dict()
        for n, (_, n_error, n_rejected) in zip(committed, parallel_map(lambda n: _marked(cfg, n), committed, threads),
                                                      strict=True)]
    pool = None
    if todo:
        pool = pool_size(job, init_ray(job.address, job.num_cpus, verbose=job.verbose), len(todo))
        pool["actors_started"] = min(pool["actors"], len(todo))
        cfg.device = device_for(job.gpus_per_actor)
        actor_cfg = replace(cfg, model_sha256s=shas)  # the actors do not hash the models again
        factory = job.restyler_factory or ShardRestyler
        ds = ray.data.from_items([{"shard": n, "path": p, "fingerprint": prints[n]} for n, p in todo],
                                 override_num_blocks=len(todo))
        ds = ds.map_batches(GeneratorActor, batch_size=1,
                            fn_constructor_args=(actor_cfg, pool["cpus_per_actor"], job.shard_timeout, new_owner(),
                                                 factory),
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
                                   f"{_first_cause(e)}; committed shards are kept: fix the cause and re-run the same "
                                   "command to resume") from None
    results.sort(key=lambda r: r["shard"])
    failed = {r["shard"]: r["failed"] for r in results if r.get("failed")}
    stuck = {r["shard"]: r["stuck"] for r in results if r.get("stuck")}
    leased = {r["shard"]: r["leased"] for r in results if r.get("leased")}
    if leased:  # another run is writing them: wait for it, as this run would have done the work itself
        left = await_leased(leased, cfg.variants[0].out, lambda s: shard_done(cfg, hashes, s, prints[s]))
        for r in results:
            if r["shard"] in leased and r["shard"] not in left:
                r.update(leased="", skipped=True, done_by="another run")
        leased = left
    _count_commits_of_this_run(cfg, results, {n for n, _ in todo})
    if pool:  # what ran, as the shards' rows say: the actors and nodes that returned a shard
        pool["actors_ran"] = len({r["actor"] for r in results if r.get("actor")})
        pool["nodes_ran"] = len({r["node"] for r in results if r.get("node")})
    summary = {**throughput(results, time.monotonic() - t_work if todo else 0.0),
        "outputs": [redact(v.out) for v in cfg.variants], "shards": results, "stuck": stuck, "leased": leased,
        "warnings": warnings + took_over_warnings(results), "n_stale_latents": sum(r.get("n_stale", 0) for r in results),
        "n_images": sum(r.get("n_ok", 0) for r in results),
        "n_errors": sum(r.get("n_error", 0) for r in results),  # committed shards' error rows included
        "n_rejected": sum(r.get("n_rejected", 0) for r in results),
        "n_rethresholded": sum(1 for r in results if r.get("rethresholded")),
        "scores": score_summary(cfg, [n for n, _ in shards]), "min_score": cfg.min_score,
        "n_skipped": sum(1 for r in results if r.get("skipped")),
        "n_routed": sum(r.get("n_routed", 0) for r in results), "route": cfg.route, "t0s": cfg.t0s(),
        "inv_evals": sum(r.get("inv_evals", 0) for r in results), "gen_evals": sum(r.get("gen_evals", 0) for r in results),
        "failed": failed, "unreadable": unreadable_shards(results), "pool": pool,
    }
    if failed:
        first = next(iter(failed.items()))
        raise AbortedError(f"{len(failed)} shard(s) failed (e.g. {first[0]}: {first[1]}); re-run the same command "
                           "to redo only the uncommitted shards")
    raise_if_leased(leased)
    return summary

"""The restyle run without Ray: its arguments (:class:`RestyleJob`), the checks before any work, the
actor pool's size for a cluster's resources, the job's throughput, the one-line cause of a worker's
failure and the accounting of shards committed during the run. :mod:`dclip_ray.pipeline.restyle` runs it
on Ray Data."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dclip_ray.config import Resources
from dclip_ray.errors import ConfigError
from dclip_ray.io.shards import read_marker, shard_urls
from dclip_ray.urls import redact

from .common import RestyleResult, await_leased, took_over_warnings, unreadable_shards
from .inputs import fingerprints, input_shards, io_threads, limit_shards, parallel_map
from .restyle_config import check_restyle, latent_coverage
from .variants import RestyleConfig, score_summary, shard_done


@dataclass
class RestyleJob:
    """Arguments of `dclip-ray restyle` (see its --help) around a :class:`RestyleConfig`."""

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


def first_cause(e: BaseException) -> str:
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


def run_with_timeout(fn: Callable[[], RestyleResult], timeout: float | None) -> RestyleResult | None:
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
    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    rule = Resources(actors=job.actors, cpus_per_actor=job.cpus_per_actor, gpus_per_actor=job.gpus_per_actor)
    actors, per_actor, why = rule.restyle_pool(cpus, gpus)
    joined = bool(job.address or os.environ.get("RAY_ADDRESS"))
    most = max(actors, n_shards or 0) if joined and not job.actors else actors
    if most > actors:
        why += f"; may grow to {most} (one per shard to do) as the cluster adds nodes"
    return {"actors": actors, "max_actors": most, "cpus_per_actor": per_actor, "gpus_per_actor": job.gpus_per_actor,
            "why": why, "cluster_cpus": cpus, "cluster_gpus": gpus}


def marked(cfg: RestyleConfig, shard: str) -> tuple[int, int, int]:
    """``(n_ok, n_error, n_rejected)`` of a committed shard from its markers: keys done in every output
    (written there or routed away), the most error rows and the most rejected rows of any output;
    zeros without markers."""
    marks = [read_marker(shard_urls(v.out, shard)["marker"]) or {} for v in cfg.variants]
    return (min(m.get("n_ok", 0) + m.get("n_skipped", 0) for m in marks),
            max(m.get("n_error", 0) for m in marks), max(m.get("n_rejected", 0) for m in marks))


def count_commits_of_this_run(cfg: RestyleConfig, results: list[dict[str, Any]], todo: set[str]) -> None:
    """A shard that was uncommitted when the run started but found committed when its turn came was
    committed during the run: by this run when a node was lost after its commit and before its row came
    back (Ray retries the row), or by another run that held its lease. Its images count as done in this
    run's summary, read from its markers (``done_by`` says so), so ``n_images`` does not depend on when
    a node was lost. A shard whose input was only touched (``unchanged``: the worker found it committed
    from the same content) was done before the run and is not counted."""
    for r in results:
        if r["shard"] in todo and r.get("skipped") and not r.get("n_ok"):
            n_ok, r["n_error"], r["n_rejected"] = marked(cfg, r["shard"])
            if r.get("unchanged"):  # committed before the run, like the shards planned as done: not counted
                r["done_by"] = "committed before: its input's time or size changed, its content did not"
            else:
                r["n_ok"] = n_ok
                r["done_by"] = r.get("done_by") or "committed during this run (a retried row, or another run)"


def split_committed(cfg: RestyleConfig, hashes: list[str], shards: list[tuple[str, str]], prints: dict[str, str],
                    ) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """``(the shards to restyle, a skipped row for each committed one with its error and rejected counts
    from its markers)``; the markers are read in threads on an object store."""
    threads = io_threads(cfg.variants[0].out)
    done = parallel_map(lambda s: shard_done(cfg, hashes, s[0], prints[s[0]]), shards, threads)
    todo = [s for s, d in zip(shards, done, strict=True) if not d]
    committed = [n for (n, _), d in zip(shards, done, strict=True) if d]
    rows = [RestyleResult(n, skipped=True, n_error=n_error, n_rejected=n_rejected).as_dict()
            for n, (_, n_error, n_rejected) in zip(committed, parallel_map(lambda n: marked(cfg, n), committed, threads),
                                                   strict=True)]
    return todo, rows


def summarize(cfg: RestyleConfig, hashes: list[str], shards: list[tuple[str, str]], prints: dict[str, str],
              todo: list[tuple[str, str]], results: list[dict[str, Any]], warnings: list[str],
              pool: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    """The restyle's summary from every shard's row: shards leased by another run are waited for (done by
    it, or left ``leased``), shards committed during the run are counted (:func:`count_commits_of_this_run`),
    the pool says which actors and nodes ran; counts, throughput, scores, failed and stuck shards."""
    results.sort(key=lambda r: r["shard"])
    leased = {r["shard"]: r["leased"] for r in results if r.get("leased")}
    if leased:  # another run is writing them: wait for it, as this run would have done the work itself
        left = await_leased(leased, cfg.variants[0].out, lambda s: shard_done(cfg, hashes, s, prints[s]))
        for r in results:
            if r["shard"] in leased and r["shard"] not in left:
                r.update(leased="", skipped=True, done_by="another run")
        leased = left
    count_commits_of_this_run(cfg, results, {n for n, _ in todo})
    if pool:  # what ran, as the shards' rows say: the actors and nodes that returned a shard
        pool["actors_ran"] = len({r["actor"] for r in results if r.get("actor")})
        pool["nodes_ran"] = len({r["node"] for r in results if r.get("node")})

    def total(field: str) -> int:
        return sum(r.get(field, 0) for r in results)

    return {**throughput(results, seconds),
            "outputs": [redact(v.out) for v in cfg.variants], "shards": results,
            "stuck": {r["shard"]: r["stuck"] for r in results if r.get("stuck")}, "leased": leased,
            "warnings": warnings + took_over_warnings(results), "n_stale_latents": total("n_stale"),
            "n_images": total("n_ok"), "n_errors": total("n_error"),  # committed shards' error rows included
            "n_rejected": total("n_rejected"), "n_rethresholded": sum(1 for r in results if r.get("rethresholded")),
            "scores": score_summary(cfg, [n for n, _ in shards]), "min_score": cfg.min_score,
            "n_skipped": sum(1 for r in results if r.get("skipped")), "n_routed": total("n_routed"),
            "route": cfg.route, "t0s": cfg.t0s(), "inv_evals": total("inv_evals"), "gen_evals": total("gen_evals"),
            "failed": {r["shard"]: r["failed"] for r in results if r.get("failed")},
            "unreadable": unreadable_shards(results), "pool": pool}

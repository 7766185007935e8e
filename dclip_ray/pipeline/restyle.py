"""`dclip-ray restyle`: Ray Data, streaming over input shards through an actor pool of generator workers.

The shard is the unit of work (as in img2dataset): the dataset is the list of uncommitted input
shards; each generator actor loads the models once (``__init__``) and, per call, reads and decodes one
whole shard (bad images become error rows), takes cached latents or inverts once per image, generates
in batches for every output variant, and writes the output tar, the Parquet manifest and the commit
marker last (:class:`dclip_ray.pipeline.work.ShardRestyler`). A retried or repeated call rewrites the
same names, so a key is never duplicated or lost; a re-run skips committed shards and leaves them
byte-identical. Memory is bounded by the shards in flight, not by the dataset.

On a 2-CPU machine actors get fractional CPUs (``--cpus-per-actor 0.5`` by default for several actors) so
that Ray Data's own tasks are never starved (../shared/REFERENCE.md sec. 5).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from tqdm.auto import tqdm

from dclip_ray.errors import AbortedError, ConfigError
from dclip_ray.io.shards import read_marker, shard_urls
from dclip_ray.urls import redact

from . import work
from .runtime import init_ray


@dataclass
class RestyleJob:
    """Arguments of `dclip-ray restyle` (see its --help) around a :class:`work.RestyleConfig`."""

    config: work.RestyleConfig
    input: str
    limit: int | None = None
    actors: int = 2
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    address: str | None = None
    num_cpus: int | None = None
    verbose: bool = False
    shard_timeout: float | None = None
    require_latents: bool = False


def _run_with_timeout(fn: Callable[[], dict[str, Any]], timeout: float | None) -> dict[str, Any] | None:
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

    def __init__(self, config: work.RestyleConfig, cpus: float, shard_timeout: float | None = None,
                 owner: str | None = None):
        work.set_threads(cpus)
        self.restyler = work.ShardRestyler(config)
        self.shard_timeout = shard_timeout
        self.owner = owner

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch``: ``{"shard": [names], "path": [paths], "fingerprint": [...]}`` -> one summary row per shard."""
        out: dict[str, list[Any]] = {k: [] for k in ("shard", "skipped", "n", "n_ok", "n_error", "inv_evals",
                                                      "gen_evals", "n_cached", "n_stale", "seconds", "failed",
                                                      "truncated", "stuck", "leased", "node")}
        node = ray.get_runtime_context().get_node_id()
        for shard, path, fp in zip(batch["shard"], batch["path"], batch["fingerprint"], strict=True):
            empty = {"shard": str(shard), "skipped": False, "n": 0, "n_ok": 0, "n_error": 0, "inv_evals": 0,
                     "gen_evals": 0, "n_cached": 0, "n_stale": 0, "seconds": 0.0, "failed": "", "stuck": "",
                     "leased": ""}
            try:
                res = _run_with_timeout(lambda s=str(shard), p=str(path), f=str(fp): self.restyler.run(s, p, f, self.owner),
                                        self.shard_timeout)
                if res is None:
                    r = {**empty, "seconds": float(self.shard_timeout or 0),
                         "stuck": f"no result after {self.shard_timeout:g} s (--shard-timeout)"}
                else:
                    r = {**res, "failed": "", "stuck": ""}
            except Exception as e:  # noqa: BLE001  (the shard stays uncommitted; a re-run redoes it)
                r = {**empty, "failed": redact(f"{type(e).__name__}: {e}")}
            r["truncated"] = r.get("truncated") or ""
            r["node"] = node
            for k in out:
                out[k].append(r[k])
        return {k: np.asarray(v) for k, v in out.items()}


def _limit_shards(shards: list[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
    """The shards needed to cover the first ``limit`` input keys (whole shards: the unit of work)."""
    if limit is None:
        return shards
    out, n = [], 0
    for name, path in shards:
        if n >= limit:
            break
        out.append((name, path))
        n += len(work.shard_keys(path)[0])
    return out


def check(job: RestyleJob) -> tuple[list[tuple[str, str]], dict[str, str], list[str]]:
    """Everything the run checks before work starts: the arguments and locations
    (:func:`work.check_restyle`), the input's shards and their content fingerprints, and what the latent
    store covers. Returns ``(shards, fingerprints, warnings)``; raises :class:`ConfigError` (exit 1)."""
    if job.shard_timeout is not None and job.shard_timeout <= 0:
        raise ConfigError(f"--shard-timeout {job.shard_timeout} must be > 0 seconds")
    if job.limit is not None and job.limit < 1:
        raise ConfigError(f"--limit {job.limit} must be >= 1")
    work.check_restyle(job.config, job.input)
    shards = _limit_shards(work.input_shards(job.input), job.limit)
    prints = work.fingerprints(shards)
    warnings = work.latent_coverage(job.config, shards, prints, job.require_latents)
    return shards, prints, warnings


def plan(job: RestyleJob) -> dict[str, Any]:
    """``--dry-run``: shards, images and UNet evaluations the job would run (nothing is written); runs
    every check the real run does first."""
    shards, prints, warnings = check(job)
    return {**work.restyle_plan(job.config, shards, prints), "warnings": warnings}


def run_restyle(job: RestyleJob, progress: bool = True) -> dict[str, Any]:
    """Restyle every uncommitted input shard. Returns ``{"outputs", "shards", "n_images", "n_errors",
    "inv_evals", "gen_evals", "failed", "stuck"}``; ``stuck`` names the shards that gave no result within
    ``job.shard_timeout`` seconds (the others are finished; the CLI exits 2). Raises :class:`AbortedError`
    (exit 3) when a shard failed: re-running redoes exactly the uncommitted shards."""
    cfg = job.config
    shards, prints, warnings = check(job)
    shas = work.model_shas(cfg)  # also validates every model before Ray starts
    hashes = [cfg.variant_hash(v, shas) for v in cfg.variants]
    todo = [(n, p) for n, p in shards
            if not all(work.variant_committed(v, n, h, prints[n]) for v, h in zip(cfg.variants, hashes, strict=True))]
    work.write_declaration(cfg, job.input)
    results: list[dict[str, Any]] = []
    for n, p in shards:
        if (n, p) not in todo:
            marker = read_marker(shard_urls(cfg.variants[0].out, n)["marker"]) or {}
            results.append({"shard": n, "skipped": True, "n_ok": 0, "n_error": marker.get("n_error", 0)})
    if todo:
        init_ray(job.address, job.num_cpus, verbose=job.verbose)
        cfg.device = "cuda" if job.gpus_per_actor > 0 else "cpu"
        ds = ray.data.from_items([{"shard": n, "path": p, "fingerprint": prints[n]} for n, p in todo],
                                 override_num_blocks=len(todo))
        ds = ds.map_batches(GeneratorActor, batch_size=1,
                            fn_constructor_args=(cfg, job.cpus_per_actor, job.shard_timeout, work.new_run_id()),
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(job.actors, len(todo)))),
                            num_cpus=job.cpus_per_actor, num_gpus=job.gpus_per_actor or None)
        with tqdm(total=len(todo), desc="restyle shards", disable=not progress) as bar:
            for row in ds.iter_rows():
                results.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
                bar.update(1)
    results.sort(key=lambda r: r["shard"])
    failed = {r["shard"]: r["failed"] for r in results if r.get("failed")}
    stuck = {r["shard"]: r["stuck"] for r in results if r.get("stuck")}
    leased = {r["shard"]: r["leased"] for r in results if r.get("leased")}
    summary = {
        "outputs": [redact(v.out) for v in cfg.variants], "shards": results, "stuck": stuck, "leased": leased,
        "warnings": warnings, "n_stale_latents": sum(r.get("n_stale", 0) for r in results),
        "n_images": sum(r.get("n_ok", 0) for r in results),
        "n_errors": sum(r.get("n_error", 0) for r in results),  # committed shards' error rows included
        "n_skipped": sum(1 for r in results if r.get("skipped")),
        "inv_evals": sum(r.get("inv_evals", 0) for r in results), "gen_evals": sum(r.get("gen_evals", 0) for r in results),
        "failed": failed,
    }
    if failed:
        first = next(iter(failed.items()))
        raise AbortedError(f"{len(failed)} shard(s) failed (e.g. {first[0]}: {first[1]}); re-run the same command "
                           "to redo only the uncommitted shards")
    work.raise_if_leased(leased)
    return summary

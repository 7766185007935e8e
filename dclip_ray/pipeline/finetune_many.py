"""`dclip-ray finetune-many`: one Ray Train ``TorchTrainer`` per prompt line, several running at once.

Each prompt's ``fit()`` is called from its own zero-CPU Ray task (../shared/REFERENCE.md sec. 5, a
pattern that runs concurrently under Train V2 without deadlock), so as many prompts train at once as
the cluster has room for workers (``--cpus-per-prompt`` / ``--gpus-per-prompt``), the rest queue. The
train loop fine-tunes one :class:`~dclip_ray.stages.finetune_many.TrainRun` with a checkpoint folder and
reports every checkpoint to Ray Train, which persists it under ``OUT/_ray_train/{run name}``; after a
worker failure (``FailureConfig(max_failures)``) or on a re-run with the same ``--out`` the loop resumes
from ``ray.train.get_checkpoint()``. A prompt whose model is already saved with the same configuration
is skipped. The planning, training and judging themselves are Ray-free (:mod:`dclip_ray.stages.finetune_many`,
:mod:`dclip_ray.stages.prompt_models`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from dclip_ray.callbacks import Callback
from dclip_ray.stages.common import device_for
from dclip_ray.stages.finetune_many import (
    FinetuneManyJob,
    Plan,
    TrainRun,
    new_checkpoint_dir,
    plan,
    summary,
    train_run,
)
from dclip_ray.stages.prompt_models import existing, finish, storage_path

from .runtime import check_local_ray, init_ray


class ReportCheckpoints(Callback):
    """Reports every fine-tuning checkpoint folder, with its numeric metrics, to Ray Train (which
    persists it under the run's storage path and hands it back on a restart)."""

    def on_checkpoint(self, path: Path, metrics: dict[str, float]) -> None:
        import ray.train

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(str(path)))


def train_loop(run: TrainRun) -> None:
    """The Ray Train loop of one fine-tuning (runs in the Train worker): resume from Ray Train's last
    checkpoint, train, save from rank 0, report the metrics."""
    import ray.train

    ckpt_dir = new_checkpoint_dir()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(ckpt_dir)
    metrics = train_run(run, ckpt_dir, [ReportCheckpoints()], save=ray.train.get_context().get_world_rank() == 0)
    ray.train.report(metrics)


@ray.remote(num_cpus=0)
def _fit(run: TrainRun, loop: Callable[[TrainRun], None], storage: str, max_failures: int) -> dict[str, Any]:
    """Run one fine-tuning's TorchTrainer to the end (a zero-CPU task: only the Train worker holds resources)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": run.cpus, **({"GPU": run.gpus} if run.gpus else {})}
    backend = "nccl" if device_for(run.gpus) == "cuda" else "gloo"  # a GPU rehearsed on the CPU has no NCCL
    trainer = TorchTrainer(
        loop, train_loop_config=run, torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=run.gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage, name=run.run_name,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001  (reported in the summary; the run resumes on a re-run)
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500],
                "seconds": round(time.perf_counter() - start, 1)}
    if result.error is not None:
        return {"status": "failed", "error": str(result.error)[:500], "seconds": round(time.perf_counter() - start, 1)}
    return {"status": "ok", "metrics": dict(result.metrics or {}), "seconds": round(time.perf_counter() - start, 1)}


def run_finetune_many(job: FinetuneManyJob, progress: bool = True) -> dict[str, Any]:
    """Fine-tune one model per prompt line of ``job.prompts`` on Ray Train, each on the images chosen
    for its source; returns the summary (:func:`~dclip_ray.stages.finetune_many.summary`)."""
    p = plan(job)
    if p.runs:
        check_local_ray(p.job.address)  # refused before a model is written
    for row in p.judge_only:
        finish(row, p.job.check, p.preset)
    if p.runs:
        _train(p, progress)
    return summary(p)


def _train(p: Plan, progress: bool) -> None:
    """Run the fine-tunings (Train runs), at most ``max_concurrent`` at once, recording each one's end in
    its prompt's row; a prompt is judged (:func:`~dclip_ray.stages.prompt_models.finish`) when its last
    run ends."""
    from dclip_ray.progress import progress as progress_counter

    job = p.job
    init_ray(job.address, job.num_cpus, dashboard=True, verbose=job.verbose)
    storage, limit = storage_path(job.out), job.resources.max_concurrent or len(p.runs)
    queue, running, left = list(p.runs), {}, {}
    for row, _ in p.runs:
        left[row["name"]] = left.get(row["name"], 0) + 1
    with progress_counter(len(p.runs), "finetune-many", enabled=progress, unit="fine-tunings") as bar:
        while queue or running:
            while queue and len(running) < limit:
                row, run = queue.pop(0)
                running[_fit.remote(run, train_loop, storage, job.resources.max_failures)] = (row, run)
                row["status"] = "running"
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                row, run = running.pop(ref)
                res = ray.get(ref)
                if res["status"] == "ok" and existing(run.out_dir, run.config_sha256) is None:
                    res = {**res, "status": "failed", "error": "training ended but the model card was not written"}
                restart = next(r for r in row["restarts"] if r["path"] == run.out_dir)
                restart.update(status=res["status"], error=res.get("error"), seconds=res["seconds"])
                row["seconds"] = max(row["seconds"], res["seconds"])
                left[row["name"]] -= 1
                if left[row["name"]] == 0:
                    finish(row, job.check, p.preset)
                bar.update(1)

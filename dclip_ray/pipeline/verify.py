"""`dclip-ray verify` on a cluster: one Ray task per input shard (:func:`~dclip_ray.stages.verify.check_input_shard`),
the same report as the threads of one process (:func:`~dclip_ray.stages.verify.verify`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray

from dclip_ray.stages.verify import VerifyReport, verify

from .runtime import init_ray


@ray.remote(num_cpus=0.5, max_retries=3)
def _task(fn: Callable[[Any], Any], unit: Any) -> Any:
    return fn(unit)


def ray_map(fn: Callable[[Any], Any], units: list[Any]) -> list[Any]:
    """``[fn(u) for u in units]`` as one Ray task each (half a CPU: the work is reading), in order."""
    return ray.get([_task.remote(fn, u) for u in units])


def run_verify(out: str, input_url: str, address: str | None = None, folders: list[str] | None = None,
               verbose: bool = False) -> VerifyReport:
    """Verify ``out`` against ``input_url``: with a cluster (``address``, ``$RAY_ADDRESS``, or Ray already
    up, as in a workflow) one Ray task per input shard, so the reads spread over the nodes; otherwise
    threads in this process (no Ray started for a laptop's check)."""
    if address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        init_ray(address, verbose=verbose)
        return verify(out, input_url, folders, mapper=ray_map)
    return verify(out, input_url, folders)

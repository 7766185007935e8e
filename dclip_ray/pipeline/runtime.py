"""Starting or joining Ray: embedded ``ray.init()`` by default, a cluster with ``--address`` / ``RAY_ADDRESS``."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from dclip_ray.errors import ConfigError
from dclip_ray.interrupts import rearm
from dclip_ray.models.trust import TRUST_ENV, is_trusted


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False,
             verbose: bool = False) -> dict[str, Any]:
    """Make sure Ray is running and return ``ray.cluster_resources()``.

    An already initialised Ray (a test, a notebook, a Ray job's driver) is used as it is. Otherwise
    ``address`` or ``$RAY_ADDRESS`` joins a cluster; without either an embedded local Ray starts with
    ``num_cpus`` (default: the machine's), its dashboard (needed by Ray Train) bound to 127.0.0.1
    (never to all interfaces) when ``dashboard``. A trust scope (``--trust-checkpoint``) is passed to
    the job's workers. Ray's own logs stay quiet unless ``verbose``.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        level = logging.INFO if verbose else logging.ERROR
        kwargs: dict[str, Any] = {"logging_level": level, "log_to_driver": verbose, "configure_logging": True}
        if is_trusted():  # --trust-checkpoint reaches the workers that load models
            kwargs["runtime_env"] = {"env_vars": {TRUST_ENV: "1"}}
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=dashboard,
                         dashboard_host="127.0.0.1", **kwargs)
        except ConnectionError as e:
            raise ConfigError(f"cannot reach the Ray cluster at {address}: {e}; check --address / RAY_ADDRESS") from None
        rearm()  # ray.init replaced the CLI's SIGTERM handler (one line, exit 3): its own exits 1 or aborts
        if not verbose:
            quiet_raylet_messages()
    quiet_ray_data(verbose)
    return dict(ray.cluster_resources())


def quiet_raylet_messages() -> None:
    """Send the messages Ray's raylet pushes to the driver (``(raylet) WARNING: N PYTHON worker processes
    have been started ...``, printed by Ray on **stdout**, with ANSI colours) to the ``ray`` logger at
    WARNING instead, which stays silent without ``--verbose``: stdout holds only what our commands print
    (tables, ``--json``). What those messages are about (a worker killed, a task failed) reaches the user
    through the task's own error. Ray's driver thread looks the printer up by name at each message, so
    replacing the module function is enough; other streams (``autoscaler``) pass through unchanged."""
    from ray._private import worker as ray_worker

    original = getattr(ray_worker.print_to_stdstream, "__wrapped__", ray_worker.print_to_stdstream)

    def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            for line in data.get("lines") or []:
                logging.getLogger("ray").warning("raylet: %s", line)
            return
        original(data, ignore_prefix)

    print_to_stdstream.__wrapped__ = original  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's own progress bars and logs only with ``verbose`` (ours show per-shard progress)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if not verbose:
        for name in ("ray.data", "ray.train", "ray.tune", "ray"):
            logging.getLogger(name).setLevel(logging.ERROR)

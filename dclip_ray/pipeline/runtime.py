"""Starting or joining Ray: embedded ``ray.init()`` by default, a cluster with ``--address`` / ``RAY_ADDRESS``."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray

from dclip_ray.errors import ConfigError
from dclip_ray.interrupts import deferred_interrupts
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
            if not address:
                local_ray_environment()
            with deferred_interrupts():  # a SIGINT/SIGTERM now is raised once Ray is up (one line, exit 3)
                if address:
                    ray.init(address=address, **kwargs)
                else:
                    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=dashboard,
                             dashboard_host="127.0.0.1", **kwargs)
        except ConnectionError as e:
            raise ConfigError(f"cannot reach the Ray cluster at {address}: {e}; check --address / RAY_ADDRESS") from None
        if not verbose:
            quiet_raylet_messages()
    quiet_ray_data(verbose)
    return dict(ray.cluster_resources())


_held_ports: list[socket.socket] = []
"""Sockets bound (never listening) for the life of the process: the ports of Ray's fixed metrics exporters."""


def check_local_ray(address: str | None = None) -> None:
    """Before anything is written: a command that will start an embedded local Ray (no ``address``, no
    ``$RAY_ADDRESS``, Ray not running yet) refuses ``RAY_AUTH_MODE=disabled`` (:class:`ConfigError`, exit 1):
    its ports listen on every interface and only the token keeps others out."""
    if address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        raise ConfigError("RAY_AUTH_MODE=disabled: the embedded local Ray listens on every interface and only its "
                          "token keeps others out; unset RAY_AUTH_MODE (or join a cluster with --address)")


def local_ray_environment() -> None:
    """Close what an embedded local Ray would open to the network without authentication (Ray 2.60).

    Ray binds its gRPC servers (GCS, raylet, object manager, core workers, agents) to all interfaces,
    with no setting to narrow that; they refuse any call without the cluster's token. So token
    authentication must stay on: with ``RAY_AUTH_MODE=disabled`` the embedded Ray is refused
    (:class:`ConfigError`; a cluster joined with ``--address`` keeps its own mode). What answers without a token are
    Prometheus exporters on 0.0.0.0: the node's metrics (turned off: ``RAY_enable_metrics_collection=0``
    unless the environment sets it) and the autoscaler's and dashboard's, whose ports come from
    ``AUTOSCALER_METRIC_PORT`` / ``DASHBOARD_METRIC_PORT`` and cannot be turned off: both are pointed at
    a port this process holds bound but not listening, so they fail to start (Ray logs that and goes
    on) and the port refuses connections. ``docs/DEPLOY.md`` lists what stays exposed on a cluster.
    """
    check_local_ray()
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    if not _held_ports and "AUTOSCALER_METRIC_PORT" not in os.environ and "DASHBOARD_METRIC_PORT" not in os.environ:
        held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        held.bind(("0.0.0.0", 0))  # bound, never listening: connections to it are refused
        _held_ports.append(held)
        port = str(held.getsockname()[1])
        os.environ["AUTOSCALER_METRIC_PORT"] = port
        os.environ["DASHBOARD_METRIC_PORT"] = port


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
        # Ray Data logs a failed dataset's whole stack trace ("Full stack trace: ..."), ~100 lines, before
        # the exception reaches us; our one-line error names its cause (--verbose shows it all)
        logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)

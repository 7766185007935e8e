"""Building a Ray Job submission of a workflow spec, without Ray: the validated spec's entrypoint and
runtime_env (:func:`build_submission`), the cluster's token (:func:`read_token`), a finished job's exit
code and the log follower (any client with ``get_job_info`` / ``get_job_logs``).
:mod:`dclip_ray.pipeline.submit` talks to the cluster (see its docstring for the whole story)."""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dclip_ray.errors import EXIT_ABORTED, EXIT_USAGE, ConfigError, InputFileError
from dclip_ray.urls import is_url

from .load import load_spec

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXCLUDES = [".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
            ".hypothesis", "demo-out", "bench-out"]
PASS_ENV = ("HF_HUB_OFFLINE", "OMP_NUM_THREADS")


@dataclass
class SubmitJob:
    """Arguments of `dclip-ray submit` (see its --help)."""

    spec: str
    address: str
    overrides: list[str] = field(default_factory=list)
    working_dir: str | None = None
    upload: bool = True
    ship_code: bool = False
    submission_id: str | None = None
    token_file: str | None = None
    entrypoint_num_cpus: float | None = None
    wait: bool = True
    poll_seconds: float = 1.0


def read_token(token_file: str | None = None) -> str | None:
    """The cluster's authentication token (see the module docstring for the order), or None."""
    if token_file:
        try:
            return Path(token_file).expanduser().read_text().strip() or None
        except OSError as e:
            raise InputFileError(f"--token-file {token_file}: cannot read it ({e.strerror}); give the file "
                                 "holding the cluster's token (`ray get-auth-token` on the head prints it)") from None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).expanduser().read_text().strip() or None
    except OSError:
        return None


def auth_headers(token_file: str | None = None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` when a token is found, else ``{}``."""
    token = read_token(token_file)
    return {"Authorization": f"Bearer {token}"} if token else {}


def build_submission(job: SubmitJob, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Validate the spec and build the ``submit_job`` arguments: ``entrypoint``, ``runtime_env``,
    ``metadata`` (and ``submission_id`` / ``entrypoint_num_cpus`` when given). No Ray, no network."""
    warn = warn or (lambda _m: None)
    spec = load_spec(job.spec, job.overrides)  # fail here, before anything reaches the cluster
    spec_path = os.path.abspath(job.spec)
    runtime_env: dict[str, Any] = {}
    if job.upload:
        wd = os.path.abspath(job.working_dir or os.getcwd())
        rel = os.path.relpath(spec_path, wd)
        if rel.startswith(".."):
            raise ConfigError(f"spec {job.spec} is outside the working dir {wd}; run from a folder holding it or "
                              "pass --working-dir")
        excludes = list(EXCLUDES)
        for where in (spec.outputs.root, spec.input_url if spec.input.toyworld else None):
            if where and not is_url(where) and os.path.abspath(where).startswith(wd + os.sep):
                excludes.append("/" + os.path.relpath(where, wd))
        root = spec.outputs.root
        if not is_url(root) and os.path.abspath(root).startswith(wd + os.sep):
            warn(f"outputs.root {root} is inside the uploaded working dir: on the cluster it lands in the job's "
                 "temporary copy; use an absolute path on shared storage or a URL (--set outputs.root=s3://...)")
        runtime_env["working_dir"] = wd
        runtime_env["excludes"] = excludes
        spec_arg = rel
    else:
        spec_arg = job.spec  # a path on the cluster (inside the image)
    if job.ship_code:
        import dclip_ray

        runtime_env["py_modules"] = [os.path.dirname(os.path.abspath(dclip_ray.__file__))]
    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    if env:
        runtime_env["env_vars"] = env
    entrypoint = " ".join(["dclip-ray", "run", shlex.quote(spec_arg)]
                          + [f"--set {shlex.quote(o)}" for o in job.overrides])
    out: dict[str, Any] = {"entrypoint": entrypoint, "runtime_env": runtime_env,
                           "metadata": {"dclip_ray_spec": spec.name, "dclip_ray_spec_file": os.path.basename(spec_path)}}
    if job.submission_id:
        out["submission_id"] = job.submission_id
    if job.entrypoint_num_cpus is not None:
        out["entrypoint_num_cpus"] = job.entrypoint_num_cpus
    return out


def exit_code_of(status: str, driver_exit_code: int | None) -> int:
    """The CLI exit code of a finished job (see the module docstring)."""
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_ABORTED
    return int(driver_exit_code) if driver_exit_code else EXIT_USAGE


def auth_error(address: str, headers: dict[str, str]) -> ConfigError:
    how = "the token sent was refused" if headers else "no token was found"
    return ConfigError(f"Ray at {address} requires token authentication and {how}; pass --token-file FILE or set "
                       "RAY_AUTH_TOKEN (the head's `ray get-auth-token` prints it)")


def follow(client: Any, job_id: str, write: Callable[[str], None], poll_seconds: float = 1.0) -> Any:
    """Print the job's log as it grows until the job ends; returns its ``JobDetails``."""
    shown, n = 0, 0
    while True:
        n += 1
        info = client.get_job_info(job_id)
        terminal = str(info.status) in TERMINAL or getattr(info.status, "value", None) in TERMINAL
        try:
            logs = client.get_job_logs(job_id)
        except RuntimeError:
            logs = ""
        if len(logs) > shown:
            write(logs[shown:])
            shown = len(logs)
        if terminal:
            return info
        time.sleep(min(poll_seconds * (1 + n / 30), 5.0))  # 1 s at first, every 5 s on long runs


def status_name(info: Any) -> str:
    return getattr(info.status, "value", None) or str(info.status)

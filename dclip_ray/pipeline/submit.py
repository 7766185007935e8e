"""`dclip-ray submit SPEC --address http://HEAD:8265` and `dclip-ray status JOB_ID`: a workflow run as a Ray Job.

The spec is validated here first (a bad spec never reaches the cluster). The job's entrypoint is
``dclip-ray run SPEC`` (plus any ``--set`` overrides), run by the cluster's own ``dclip-ray`` (the
project's image installs it); the runtime_env uploads the working directory (default: the current
one, Ray honours its ``.gitignore``) so that the spec and its prompt file are there, or nothing when
``upload=False`` (the spec is then a path inside the cluster's image, e.g. ``workflows/nightly.yaml``).
``ship_code=True`` also ships the local ``dclip_ray`` package as a ``py_module`` (for trying a change
on a cluster whose image is older).

Authentication (Ray 2.60 turns token authentication on by default): the token is read from
``token_file``, else ``$RAY_AUTH_TOKEN``, else the file at ``$RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` (where ``ray start`` writes it), and sent as ``Authorization: Bearer ...``
on every request; it is never printed or put into the job's environment. A cluster with
``RAY_AUTH_MODE=disabled`` needs no token.

Exit codes: SUCCEEDED -> 0, FAILED -> the driver's exit code (``dclip-ray run``'s: 1, 2 or 3), else 1,
STOPPED -> 3.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dclip_ray.errors import EXIT_ABORTED, EXIT_USAGE, AbortedError, ConfigError, InputFileError
from dclip_ray.urls import is_url
from dclip_ray.workflow import load_spec

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


def _auth_error(address: str, headers: dict[str, str]) -> ConfigError:
    how = "the token sent was refused" if headers else "no token was found"
    return ConfigError(f"Ray at {address} requires token authentication and {how}; pass --token-file FILE or set "
                       "RAY_AUTH_TOKEN (the head's `ray get-auth-token` prints it)")


@contextlib.contextmanager
def _calls(address: str, headers: dict[str, str]) -> Iterator[None]:
    """Map the SDK's errors to one-line :class:`ConfigError` naming the address and the fix (no token shown)."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise _auth_error(address, headers) from None
    except ConnectionError as e:
        msg = str(e).replace(headers.get("Authorization", "\0"), "<token>").splitlines()[0][:300]
        raise ConfigError(f"cannot reach the Ray dashboard at {address} ({msg}); check --address "
                          "(http://HEAD:8265) and that the dashboard is up") from None


def client_for(address: str, token_file: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for ``address`` with the token header (raises :class:`ConfigError`
    naming the address and the fix when it cannot connect or authenticate; never shows the token)."""
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers(token_file)
    with _calls(address, headers):
        try:
            client = JobSubmissionClient(address, headers=headers)
        except (RuntimeError, ValueError) as e:
            msg = str(e).replace(headers.get("Authorization", "\0"), "<token>").splitlines()[0][:300]
            raise ConfigError(f"cannot reach the Ray dashboard at {address} ({msg}); check --address "
                              "(http://HEAD:8265) and that the dashboard is up") from None
    client._dclip_headers = headers  # for error messages of later calls
    return client


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


def _status_name(info: Any) -> str:
    return getattr(info.status, "value", None) or str(info.status)


def submit(job: SubmitJob, write: Callable[[str], None] | None = None,
           warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Submit the spec as a Ray Job; with ``job.wait`` follow its logs to the end.

    Returns ``{"job_id", "status", "exit_code", "message", "address", "entrypoint"}`` (``exit_code``
    None when not waiting). Ctrl-C while following raises :class:`AbortedError` (the job keeps running).
    """
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    kwargs = build_submission(job, warn)
    client = client_for(job.address, job.token_file)
    with _calls(job.address, client._dclip_headers):
        job_id = client.submit_job(**kwargs)
    out: dict[str, Any] = {"job_id": job_id, "status": "PENDING", "exit_code": None, "message": None,
                           "address": job.address, "entrypoint": kwargs["entrypoint"]}
    if not job.wait:
        return out
    try:
        with _calls(job.address, client._dclip_headers):
            info = follow(client, job_id, write, job.poll_seconds)
    except KeyboardInterrupt:
        raise AbortedError(f"stopped following job {job_id}; it keeps running: dclip-ray status {job_id} "
                           f"--address {job.address}") from None
    status = _status_name(info)
    out.update(status=status, message=info.message, driver_exit_code=getattr(info, "driver_exit_code", None),
               exit_code=exit_code_of(status, getattr(info, "driver_exit_code", None)))
    return out


def job_status(job_id: str, address: str, token_file: str | None = None, logs: bool = False) -> dict[str, Any]:
    """``{"job_id", "status", "message", "exit_code" (None while running), "start_time", "end_time",
    "entrypoint", "logs"?}`` of a submitted job."""
    client = client_for(address, token_file)
    try:
        with _calls(address, client._dclip_headers):
            info = client.get_job_info(job_id)
    except RuntimeError as e:
        raise ConfigError(f"job {job_id} not found at {address} ({str(e).splitlines()[0][:200]}); "
                          "check the id printed by `dclip-ray submit`") from None
    status = _status_name(info)
    driver = getattr(info, "driver_exit_code", None)
    out = {"job_id": job_id, "status": status, "message": info.message, "driver_exit_code": driver,
           "exit_code": exit_code_of(status, driver) if status in TERMINAL else None,
           "start_time": info.start_time, "end_time": info.end_time, "entrypoint": info.entrypoint}
    if logs:
        with _calls(address, client._dclip_headers):
            out["logs"] = client.get_job_logs(job_id)
    return out

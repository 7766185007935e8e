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
import sys
from collections.abc import Callable, Iterator
from typing import Any

from dclip_ray.errors import AbortedError, ConfigError
from dclip_ray.workflow.submission import (
    TERMINAL,
    SubmitJob,
    auth_error,
    auth_headers,
    build_submission,
    exit_code_of,
    follow,
    status_name,
)


@contextlib.contextmanager
def _calls(address: str, headers: dict[str, str]) -> Iterator[None]:
    """Map the SDK's errors to one-line :class:`ConfigError` naming the address and the fix (no token shown)."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise auth_error(address, headers) from None
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
    status = status_name(info)
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
    status = status_name(info)
    driver = getattr(info, "driver_exit_code", None)
    out = {"job_id": job_id, "status": status, "message": info.message, "driver_exit_code": driver,
           "exit_code": exit_code_of(status, driver) if status in TERMINAL else None,
           "start_time": info.start_time, "end_time": info.end_time, "entrypoint": info.entrypoint}
    if logs:
        with _calls(address, client._dclip_headers):
            out["logs"] = client.get_job_logs(job_id)
    return out

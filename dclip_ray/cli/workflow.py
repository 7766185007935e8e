"""`dclip-ray run`, `submit` and `status`: workflow specs run here or as Ray Jobs (parse and call).

Ray is imported only inside the commands that need it.
"""

from __future__ import annotations

import json
import sys

import typer

from dclip_ray import plain
from dclip_ray.config import RunOptions

from .common import app
from .pipeline import _setup
from .settings import NO_OPTIONS, run_options
from .terminal import to_stderr, to_stdout

SET_HELP = "Override a spec field, FIELD.PATH=VALUE (VALUE read as YAML); repeatable, e.g. --set finetune.epochs=2."


@app.command("run", epilog="""Examples:\n
  dclip-ray run workflows/toy.yaml                    (renders the toy input, runs every step)\n
  dclip-ray run workflows/nightly-restyle.yaml --set input.url=s3://bucket/uploads/ --json\n
Re-running a spec processes only new input shards; each run appends a record to OUTPUTS/runs.jsonl.""")
@run_options("as_json", "verbose", "quiet", helps={"as_json": "Print the run record as JSON."})
def run_cmd(
    spec: str = typer.Argument(..., help="Workflow spec (YAML), see workflows/toy.yaml."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    check: bool = typer.Option(False, "--check", help="Only validate the spec and print it resolved; run nothing."),
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Run a workflow spec: precompute -> finetune-many -> restyle -> verify -> report, skipping committed work."""
    from dclip_ray.workflow import load_spec

    s = load_spec(spec, list(set_ or []))
    if check:
        from dclip_ray.pipeline.workflow_run import preflight

        preflight(s)  # the same checks as a run makes before any work
        resolved = {"input": s.input_url, "latents": s.latent_store, "models": s.models_dir,
                    "restyled": s.restyled_dir, "ledger": s.ledger}
        print(json.dumps({"spec": s.source, "resolved": resolved, **s.model_dump(mode="json")}, indent=2))
        raise typer.Exit(0)
    _setup(opts.verbose)
    from dclip_ray.pipeline.workflow_run import run_workflow

    record = run_workflow(s, progress=opts.progress, verbose=opts.verbose,
                          log=None if opts.as_json else (lambda m: to_stderr().print(m, highlight=False, markup=False)))
    if opts.as_json:
        print(plain.dumps(record))
    else:
        to_stdout().print(f"run {record['run_id']}: [bold]{record['status']}[/] (exit {record['exit_code']}) in "
                        f"{record['seconds']} s; record appended to {s.ledger}")
    raise typer.Exit(record["exit_code"])


@app.command("submit", epilog="""Examples:\n
  dclip-ray submit workflows/toy.yaml --address http://127.0.0.1:8265 --set outputs.root=/shared/toy-out\n
  dclip-ray submit workflows/nightly-restyle.yaml --address http://head:8265 --no-upload --no-wait\n
The token (Ray 2.60 auth is on by default) comes from --token-file, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token. Exit code: the job's (0 succeeded, 1-3 as `dclip-ray run`, 3 stopped).""")
@run_options("as_json", helps={"as_json": "Print the outcome as JSON (logs go to stderr)."})
def submit_cmd(
    spec: str = typer.Argument(..., help="Workflow spec (YAML); validated here before submitting."),
    address: str = typer.Option(..., help="The Ray dashboard, e.g. http://HEAD:8265."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    working_dir: str = typer.Option(None, help="Folder uploaded as the job's working dir (default: the current one)."),
    upload: bool = typer.Option(True, help="--no-upload: upload nothing; SPEC is a path inside the cluster's image."),
    ship_code: bool = typer.Option(False, help="Also ship the local dclip_ray package (py_modules)."),
    submission_id: str = typer.Option(None, help="Job id to use (default: Ray picks one)."),
    token_file: str = typer.Option(None, help="File holding the cluster's auth token."),
    wait: bool = typer.Option(True, help="--no-wait: print the job id and return at once."),
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Submit a workflow spec as a Ray Job, follow its logs and exit with its status."""
    _setup(False)
    from dclip_ray.pipeline.submit import SubmitJob, submit

    job = SubmitJob(spec=spec, address=address, overrides=list(set_ or []), working_dir=working_dir, upload=upload,
                    ship_code=ship_code, submission_id=submission_id, token_file=token_file, wait=wait)
    stream = sys.stderr if opts.as_json else sys.stdout
    out = submit(job, write=lambda s: (stream.write(s), stream.flush()),
                 warn=lambda m: to_stderr().print(f"[yellow]warning[/] {m}", highlight=False))
    if opts.as_json:
        print(plain.dumps(out))
    elif wait:
        to_stdout().print(f"job {out['job_id']}: [bold]{out['status']}[/] (exit {out['exit_code']})")
    else:
        to_stdout().print(f"submitted job {out['job_id']}; follow it with: dclip-ray status {out['job_id']} "
                        f"--address {address}")
    raise typer.Exit(out["exit_code"] or 0)


@app.command("status", epilog="""Example: dclip-ray status raysubmit_XyZ --address http://127.0.0.1:8265 --logs\n
Exit code: 0 while pending/running or succeeded; a finished job's code otherwise (as `dclip-ray submit`).""")
@run_options("as_json", helps={"as_json": "Print the status as JSON."})
def status_cmd(
    job_id: str = typer.Argument(..., help="The job id printed by `dclip-ray submit`."),
    address: str = typer.Option(..., help="The Ray dashboard, e.g. http://HEAD:8265."),
    token_file: str = typer.Option(None, help="File holding the cluster's auth token."),
    logs: bool = typer.Option(False, help="Also print the job's log."),
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Show a submitted job's status (and log)."""
    _setup(False)
    from dclip_ray.pipeline.submit import job_status

    s = job_status(job_id, address, token_file, logs=logs)
    if opts.as_json:
        print(plain.dumps(s))
    else:
        if logs:
            print(s["logs"], end="")
        to_stdout().print(f"job {job_id}: [bold]{s['status']}[/]" + (f" (exit {s['exit_code']})" if s["exit_code"] is not None
                                                                   else "") + (f": {s['message']}" if s["message"] else ""))
    raise typer.Exit(s["exit_code"] or 0)

"""What `dclip-ray run` checks and decides without Ray: the spec's local paths, the places its steps write
and the names it gives (:func:`check_spec`), the toy-world input, which models a restyle step uses
(:func:`restyle_plan`) and the report step."""

from __future__ import annotations

import os
from typing import Any

import fsspec

from dclip_ray.errors import ConfigError
from dclip_ray.urls import is_remote, is_url, local_path

from .spec import WorkflowSpec


def check_spec(spec: WorkflowSpec) -> None:
    """Fail before any work when a local path the run needs is missing, a step would write where a step
    reads, or a model, CLIP or input name does not resolve.

    Checked here, on the machine that runs the spec, not at load time: a spec submitted from a laptop
    names paths of the cluster. Raises :class:`ConfigError` naming the spec field."""
    where = spec.source or spec.name
    needed = [("model", spec.model), ("finetune.clip_weights", spec.finetune.clip_weights)]
    if spec.input.url is not None:
        needed.append(("input.url", spec.input.url))
    for field, value in needed:
        if not value or is_remote(value):
            continue
        path = local_path(value)
        if os.path.isabs(path) and not any(c in path for c in "*?{[") and not os.path.exists(path):
            raise ConfigError(f"workflow spec {where}: {field}: {path} not found on this machine; fix the path "
                              "(relative paths resolve against the spec's folder)")
    check_locations(spec)
    _check_names(spec, where)


def ensure_toyworld_input(spec: WorkflowSpec) -> int:
    """Render the toy-world input under ``spec.input_url`` if a shard of it is missing; returns the
    number of shards written (0 when all were there: the render is deterministic)."""
    tw = spec.input.toyworld
    if tw is None:
        return 0
    from dclip_ray.toyworld.data import write_shards

    fs, root = fsspec.core.url_to_fs(spec.input_url)
    names = [f"{i:05d}.tar" for i in range((tw.n + tw.shard_size - 1) // tw.shard_size)]
    if all(fs.exists(f"{root.rstrip('/')}/{n}") for n in names):
        return 0
    # the render is deterministic: shards already there are rewritten byte for byte (their fingerprints,
    # and so their committed work, stay), the missing ones are added
    return len(write_shards(spec.input_url, tw.n, seed=tw.seed, shard_size=tw.shard_size, kinds=tw.kind_pairs(),
                            overwrite=True))


def _check_names(spec: WorkflowSpec, where: str) -> None:
    """The model and CLIP names resolve (a preset, a path, a URL, or an open_clip model name) and the
    input URL holds shards: existence only, no weights are loaded. Raises :class:`ConfigError`."""
    import difflib

    from dclip_ray.models.presets import list_presets

    presets = list_presets()
    named = [("model", spec.model, presets)]
    if spec.finetune.clip:
        named.append(("finetune.clip", spec.finetune.clip, list_presets("clip")))
    for field, value, choices in named:
        if value in presets or is_url(value) or os.sep in value or "/" in value or os.path.exists(value):
            continue
        if field == "finetune.clip":
            import open_clip

            if value in open_clip.list_models():
                continue
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"workflow spec {where}: {field}: {value!r} is no preset and no path; {hint}the presets are "
                          f"{', '.join(choices)} (`dclip-ray models list`)")
    if spec.input.url is not None:
        from dclip_ray.errors import InputFileError
        from dclip_ray.stages.inputs import input_shards

        try:
            input_shards(spec.input.url)  # a glob or URL that lists nothing, an unreachable bucket
        except (InputFileError, ConfigError) as e:
            raise ConfigError(f"workflow spec {where}: input.url: {e}") from None


def check_locations(spec: WorkflowSpec, ledger_only: bool = False) -> None:
    """No step writes where a step reads: latents, models and restyled outputs apart from the input, the
    base model and each other (raises :class:`ConfigError` naming the spec fields). ``ledger_only``:
    only the ledger's place (checked before the run writes its record there)."""
    from dclip_ray.io.locations import check_outputs

    where = spec.source or spec.name
    given_input = {"input.url": spec.input.url} if spec.input.url else {}
    read = {**given_input, "model": spec.model, "prompts.file": spec.prompts.file,
            "latents store": spec.latent_store, "models folder": spec.models_dir, "restyled folder": spec.restyled_dir}
    try:
        # the files a run writes beside its folders: never inside (or onto) what any step reads
        check_outputs({"outputs.ledger": spec.ledger}, read)
        if ledger_only:
            return
        if spec.outputs.report:
            check_outputs({"the report": os.path.join(spec.outputs.root, "report.html")}, {**given_input,
                                                                                        "model": spec.model})
        check_outputs({"latents store": spec.latent_store}, {**given_input, "model": spec.model})
        check_outputs({"models folder": spec.models_dir}, {**given_input, "model": spec.model,
                                                           "latents store": spec.latent_store})
        check_outputs({"restyled folder": spec.restyled_dir}, {**given_input, "model": spec.model,
                                                               "latents store": spec.latent_store,
                                                               "models folder": spec.models_dir})
    except ConfigError as e:
        raise ConfigError(f"workflow spec {where}: {e}") from None


def prompt_names(spec: WorkflowSpec) -> list[str]:
    from dclip_ray.prompts import parse_prompt_file

    return [s.name for s in parse_prompt_file(spec.prompts.text() or spec.prompts.file or "")]


def restyle_plan(spec: WorkflowSpec, ok_models: set[str]) -> tuple[str, list[str] | None, dict[str, Any] | None, list[str]]:
    """(output root, model folders or None, mix or None, prompt names left out because their model
    failed). Outputs go to ``restyled/{name}`` per variant and ``restyled/mix`` for a mix, whatever
    their number (:func:`~dclip_ray.stages.restyle_config.build_restyle_config`), so the layout never
    changes when a variant is added."""
    rs, root = spec.restyle, spec.restyled_dir.rstrip("/")
    models_root = spec.models_dir.rstrip("/")
    if rs.mix is not None:
        missing = [n for n in rs.mix.models if n not in ok_models]
        if missing:
            return root, None, None, missing
        mix = {"models": [f"{models_root}/{n}" for n in rs.mix.models], "gamma": dict(rs.mix.gamma)}
        return root, None, mix, []
    names = rs.variants or prompt_names(spec)
    kept = [n for n in names if n in ok_models]
    return root, [f"{models_root}/{n}" for n in kept], None, [n for n in names if n not in ok_models]


def report_step(spec: WorkflowSpec) -> dict[str, Any]:
    if not spec.outputs.report:
        return {"status": "skipped (outputs.report: false)"}
    if is_remote(spec.outputs.root):
        return {"status": "skipped (the report is written for a local outputs.root only)"}
    try:
        from dclip_ray.evaluation.report import write_report
    except ModuleNotFoundError as e:
        if e.name in ("dclip_ray.evaluation", "dclip_ray.evaluation.report"):
            return {"status": "skipped (not available)"}
        raise
    except ImportError as e:  # the module is there but has no write_report
        if "write_report" in str(e):
            return {"status": "skipped (not available)"}
        raise
    config = {"workflow spec (as run, paths resolved)": spec.model_dump(mode="json")}
    return {"status": "ok", "path": write_report(spec.outputs.root, config=config)}

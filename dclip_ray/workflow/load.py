"""Reading a workflow spec: YAML -> :class:`~dclip_ray.workflow.spec.WorkflowSpec`, with ``--set``
overrides, relative paths resolved against the spec file's folder, and the prompt lines, restyle
variants and mix checked. Every error is one line naming the field and the fix."""

from __future__ import annotations

import os
from typing import Any

import yaml
from pydantic import ValidationError

from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.io.locations import too_broad
from dclip_ray.urls import is_url
from dclip_ray.yamlfile import load_yaml

from .messages import fail, message
from .spec import WorkflowSpec

PATH_FIELDS = [("input", "url"), ("prompts", "file"), ("latents", "store"), ("finetune", "clip_weights"),
               ("outputs", "root"), ("outputs", "models"), ("outputs", "restyled"), ("outputs", "ledger")]


def _resolve(value: str, here: str) -> str:
    if is_url(value) or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(here, os.path.expanduser(value)))


def _looks_local(value: str, here: str) -> bool:
    """A model reference that is a path (not a preset name): has a separator, starts with '.' or exists."""
    return (not is_url(value) and (os.sep in value or "/" in value or value.startswith(".")
                                    or os.path.exists(os.path.join(here, value))))


def _resolve_paths(spec: WorkflowSpec, here: str) -> WorkflowSpec:
    for section, name in PATH_FIELDS:
        obj = getattr(spec, section)
        v = getattr(obj, name)
        if isinstance(v, str):
            setattr(obj, name, _resolve(v, here))
    if _looks_local(spec.model, here):
        spec.model = _resolve(spec.model, here)
    return spec


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None, origin: str = "spec") -> dict[str, Any]:
    """Apply ``KEY.PATH=VALUE`` overrides (VALUE read as YAML, e.g. ``finetune.epochs=2``) to a raw spec."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD.PATH=VALUE, e.g. --set finetune.epochs=2")
        try:
            parsed = load_yaml(value, f"--set {key}") if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        node: Any = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict):
                raise fail(origin, key, f"cannot set a field inside {part!r} (not a mapping)")
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            node = nxt
        if not isinstance(node, dict):
            raise fail(origin, key, "cannot set a field inside a non-mapping value")
        node[parts[-1]] = parsed
    return raw


def parse_spec(raw: Any, origin: str = "spec", here: str | None = None) -> WorkflowSpec:
    """Validate a raw (YAML-loaded) spec; relative paths resolve against ``here`` (default: the cwd).

    Raises :class:`ConfigError` naming the first bad field as a dotted path and the fix.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"workflow spec {origin}: expected a mapping with name, input, model, prompts and outputs "
                          f"(got {type(raw).__name__}); see workflows/toy.yaml")
    try:
        spec = WorkflowSpec.model_validate(raw)
    except ValidationError as e:
        where, msg = message(e.errors()[0], WorkflowSpec)
        raise fail(origin, where, msg) from None
    spec = _resolve_paths(spec, os.path.abspath(here or os.getcwd()))
    for section, name in (("outputs", "root"), ("outputs", "models"), ("outputs", "restyled"), ("latents", "store")):
        value = getattr(getattr(spec, section), name)
        why = too_broad(value) if isinstance(value, str) else None
        if why:
            raise fail(origin, f"{section}.{name}", f"{value} {why}: every run writes folders and files there; "
                                                    "give a folder of its own")
    _check_prompts(spec, origin)
    return spec


def _check_prompts(spec: WorkflowSpec, origin: str) -> None:
    """Prompt lines parse; restyle variants and mix models name existing prompts; the gamma spec is valid."""
    from dclip_ray.mixing import gamma_from_spec, validate_gamma
    from dclip_ray.prompts import parse

    if spec.prompts.lines is not None:
        for i, line in enumerate(spec.prompts.lines):
            if line.strip() and not line.strip().startswith("#"):
                try:
                    parse.parse_prompt_text(line + "\n", origin=f"prompts.lines[{i}]")
                except ConfigError as e:
                    raise fail(origin, f"prompts.lines[{i}]", str(e).split(": ", 1)[-1]) from None
        names = [s.name for s in parse.parse_prompt_text(spec.prompts.text() or "", origin="prompts.lines")]
    else:
        file = spec.prompts.file or ""
        if not is_url(file) and not os.path.isfile(file):
            raise fail(origin, "prompts.file", f"{file} not found; give a prompts.txt path (relative to the spec's "
                        "folder) or list the edits under prompts.lines")
        try:
            names = [s.name for s in parse.parse_prompt_file(file)]
        except (ConfigError, InputFileError) as e:
            raise fail(origin, "prompts.file", str(e)) from None
    for field, wanted in (("restyle.variants", spec.restyle.variants),
                          ("restyle.mix.models", spec.restyle.mix.models if spec.restyle.mix else None)):
        for i, n in enumerate(wanted or []):
            if n not in names:
                raise fail(origin, f"{field}[{i}]", f"{n!r} is not a prompt name; the prompts are {names} "
                            "(name=NAME on a prompt line sets it)")
    if spec.restyle.mix is not None:
        try:  # weights per model summing to 1 over the generation steps 0..t0 (eq. 14)
            validate_gamma(gamma_from_spec(spec.restyle.mix.gamma), len(spec.restyle.mix.models),
                           range(0, spec.latents.t0 + 1, max(1, spec.latents.t0 // 50)))
        except (ConfigError, ValueError, TypeError, KeyError) as e:
            raise fail(origin, "restyle.mix.gamma", str(e)) from None


def load_spec(path: str | os.PathLike[str], overrides: list[str] | None = None) -> WorkflowSpec:
    """Read and validate the workflow spec at ``path`` (a local YAML file).

    ``overrides``: ``FIELD.PATH=VALUE`` items applied before validation (`--set`). Relative paths
    (in the file and in overrides) resolve against the spec file's folder. Raises
    :class:`InputFileError` for a missing or unreadable file and :class:`ConfigError` for a bad spec,
    each as one line naming the field and the fix.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = load_yaml(f, f"workflow spec {path}")
    except FileNotFoundError:
        raise InputFileError(f"workflow spec {path} not found; see workflows/toy.yaml for an example") from None
    except IsADirectoryError:
        raise InputFileError(f"workflow spec {path} is a folder; give the .yaml file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"workflow spec {path}: {at}not valid YAML ({problem}); fix the syntax there") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"workflow spec {path} is not readable ({e}); give a UTF-8 YAML file") from None
    raw = raw if raw is not None else {}
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides, origin=path)
    spec = parse_spec(raw, origin=path, here=os.path.dirname(os.path.abspath(path)))
    spec.source = os.path.abspath(path)
    return spec

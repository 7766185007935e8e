"""The workflow spec (`workflows/*.yaml`): one file naming the input, base model, prompts, latent
store, fine-tuning and restyle settings and the outputs of a whole pipeline run.

`load_spec(path)` reads and validates it; a bad spec raises :class:`ConfigError` with ONE line naming
the field by its dotted path and the fix, e.g.
``workflow spec x.yaml: finetune.epochs: must be >= 1 (got 0)``. Unknown fields are refused by name.
Relative paths in a spec resolve against the spec file's folder (so a spec runs the same from any
working directory). No Ray here: this is core code, run by `dclip-ray run` and read by `submit`.

Minimal spec::

    name: toy
    input: {toyworld: {n: 64, shard_size: 32}}   # or: input: {url: data/shards/}
    model: toy_shapes
    prompts: ["red circle -> blue circle name=blue"]   # or: prompts: prompts.txt
    outputs: {root: ../toy-out}
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from dclip_ray.config import FinetuneConfig, SettingInfo, settings_of
from dclip_ray.errors import ConfigError, InputFileError

__all__ = [
    "FinetuneSpec", "InputSpec", "LatentsSpec", "MixSpec", "OutputsSpec", "PromptsSpec", "RaySpec", "RestyleSpec",
    "ToyworldInput", "WorkflowSpec", "apply_overrides", "load_spec", "parse_spec",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToyworldInput(_Strict):
    """Render the embedded toy world's shapes as the input (written once under ``outputs.root/input``)."""

    n: int = Field(64, ge=1, description="images")
    shard_size: int = Field(32, ge=1, description="images per shard")
    seed: int = Field(0, ge=0, description="dataset seed (keys '{seed}_{index:06d}')")


class InputSpec(_Strict):
    """Where the images come from: ``url`` (WebDataset shards, img2dataset output or a folder; local or
    fsspec URL) or ``toyworld`` (rendered). New shards appearing under ``url`` are processed by the next run."""

    url: str | None = None
    toyworld: ToyworldInput | None = None
    resize_policy: Literal["center-crop", "resize", "pad"] = "center-crop"

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        if (self.url is None) == (self.toyworld is None):
            raise ValueError("give exactly one of input.url (shards) or input.toyworld ({n: 64, shard_size: 32})")
        return self


class PromptsSpec(_Strict):
    """The edits: a prompt file (``file``) or inline prompt-file lines (``lines``), one edit each."""

    file: str | None = None
    lines: list[str] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PromptsSpec:
        if (self.file is None) == (self.lines is None):
            raise ValueError("give exactly one of prompts.file (a prompts.txt) or prompts.lines (a list of edits)")
        if self.lines is not None and not [ln for ln in self.lines if ln.strip() and not ln.strip().startswith("#")]:
            raise ValueError("prompts.lines holds no edit; add lines like 'red circle -> blue circle name=blue'")
        return self

    def text(self) -> str | None:
        """The inline lines as prompt-file text (``None`` for a file)."""
        return None if self.lines is None else "\n".join(self.lines) + "\n"


class LatentsSpec(_Strict):
    """The latent store written by precompute and read by fine-tuning and restyle."""

    store: str | None = Field(None, description="default: outputs.root/latents")
    t0: int = Field(500, ge=1, le=999)
    n_inv: int = Field(40, ge=1)
    dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = Field(16, ge=1)
    recon_psnr: bool = False


class _FinetuneJobSpec(_Strict):
    """The fine-tuning job's own fields (not fine-tuning settings)."""

    clip: str | None = None
    clip_weights: str | None = None
    face_weights: str | None = None
    n_train: int = Field(16, ge=1)
    max_failures: int = Field(2, ge=0)
    max_concurrent: int | None = Field(None, ge=1)

    def settings(self) -> dict[str, Any]:
        """The fine-tuning settings given here, as ``{FinetuneConfig field: value}`` (unset ones left out)."""
        return {s.name: getattr(self, s.spec) for s in SPEC_SETTINGS if getattr(self, s.spec) is not None}


def _spec_field(s: SettingInfo) -> tuple[Any, Any]:
    """A pydantic field for a declared setting: optional (None = not given), same rule as everywhere."""
    if s.choices is not None:
        return (Literal[(*s.choices, *s.aliases)] | None, None)  # type: ignore[valid-type]
    rule: dict[str, Any] = {}
    if s.lo is not None:
        rule["gt" if s.lo_strict else "ge"] = s.lo
    if s.hi is not None:
        rule["le"] = s.hi
    return (s.type | None, Field(None, description=s.help, **rule))


SPEC_SETTINGS = [s for s in settings_of(FinetuneConfig) if s.spec]
"""The fine-tuning settings of a spec's ``finetune`` section, by spec key (t0 and S_inv come from ``latents``)."""

FinetuneSpec = create_model(
    "FinetuneSpec", __base__=_FinetuneJobSpec, __module__=__name__,
    **{s.spec: _spec_field(s) for s in SPEC_SETTINGS},  # type: ignore[misc]
)
FinetuneSpec.__doc__ = """Defaults of every prompt line (a line's own ``lr=`` ... wins), see `dclip-ray finetune-many`:
the job fields above plus every fine-tuning setting by its spec key (``lr``, ``n_gen``, ``aug_views``,
``clip_weight``, ...; declared in :class:`dclip_ray.config.FinetuneConfig`). A key left out is not given."""


class MixSpec(_Strict):
    """One mixed output: the fine-tuned models of these prompt names, weighted by ``gamma`` (eq. 14)."""

    models: list[str] = Field(..., min_length=1)
    gamma: dict[str, Any]


class RestyleSpec(_Strict):
    """Restyle the input with the fine-tuned models: ``variants`` (prompt names, one output each;
    default every prompt) or one ``mix``."""

    variants: list[str] | None = Field(None, min_length=1)
    mix: MixSpec | None = None
    strength: float = Field(1.0, ge=0.0, le=1.0)
    n_gen: int = Field(40, ge=1)
    format: Literal["png", "jpg"] = "png"
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1)
    actors: int | None = Field(None, ge=1)
    cpus_per_actor: float | None = Field(None, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _variants_or_mix(self) -> RestyleSpec:
        if self.variants is not None and self.mix is not None:
            raise ValueError("give either restyle.variants or restyle.mix, not both")
        return self


class OutputsSpec(_Strict):
    """Where everything goes. ``root`` holds ``latents/``, ``models/``, ``restyled/``, the report and
    the run ledger ``runs.jsonl`` unless the other fields say otherwise."""

    root: str
    models: str | None = None
    restyled: str | None = None
    ledger: str | None = None
    report: bool = True


class RaySpec(_Strict):
    """Which Ray and how much of it each unit of work takes (defaults suit a CPU machine)."""

    address: str | None = Field(None, description="default: $RAY_ADDRESS, else an embedded local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of an embedded Ray (default: the machine's)")
    cpus_per_task: float = Field(1.0, gt=0)
    gpus_per_task: float = Field(0.0, ge=0)
    cpus_per_prompt: float = Field(1.0, gt=0)
    gpus_per_prompt: float = Field(0.0, ge=0)


class WorkflowSpec(_Strict):
    """A validated workflow spec with every local path absolute (see the module docstring)."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    input: InputSpec
    model: str = Field(..., min_length=1)
    preset: str | None = None
    prompts: PromptsSpec
    latents: LatentsSpec = LatentsSpec()
    finetune: FinetuneSpec = FinetuneSpec()
    restyle: RestyleSpec = RestyleSpec()
    outputs: OutputsSpec
    ray: RaySpec = RaySpec()
    source: str | None = Field(None, exclude=True, description="the spec file (set by load_spec)")

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"file": v}
        if isinstance(v, list):
            return {"lines": v}
        return v

    # -- derived locations -------------------------------------------------------------------------------
    def _under_root(self, sub: str) -> str:
        return f"{self.outputs.root.rstrip('/')}/{sub}"

    @property
    def latent_store(self) -> str:
        """Latent store root."""
        return self.latents.store or self._under_root("latents")

    @property
    def models_dir(self) -> str:
        """Fine-tuned models root (one folder per prompt name)."""
        return self.outputs.models or self._under_root("models")

    @property
    def restyled_dir(self) -> str:
        """Restyle output root."""
        return self.outputs.restyled or self._under_root("restyled")

    @property
    def ledger(self) -> str:
        """The run ledger (JSON lines, one record per run)."""
        return self.outputs.ledger or self._under_root("runs.jsonl")

    @property
    def input_url(self) -> str:
        """The input shards (``outputs.root/input`` for a toy-world input)."""
        return self.input.url or self._under_root("input")


# -- paths -----------------------------------------------------------------------------------------------
PATH_FIELDS = [("input", "url"), ("prompts", "file"), ("latents", "store"), ("finetune", "clip_weights"),
               ("outputs", "root"), ("outputs", "models"), ("outputs", "restyled"), ("outputs", "ledger")]


def _resolve(value: str, here: str) -> str:
    if "://" in value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(here, os.path.expanduser(value)))


def _looks_local(value: str, here: str) -> bool:
    """A model reference that is a path (not a preset name): has a separator, starts with '.' or exists."""
    return ("://" not in value and (os.sep in value or "/" in value or value.startswith(".")
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


# -- errors ----------------------------------------------------------------------------------------------
def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    model: Any = WorkflowSpec
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
    return [n for n in (model.model_fields if model else {}) if n != "source"]


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _message(err: dict[str, Any]) -> tuple[str, str]:
    """(dotted field, 'what is wrong and the fix') of one pydantic error."""
    loc = tuple(err.get("loc", ()))
    typ, ctx, got = err.get("type", ""), err.get("ctx") or {}, err.get("input")
    where = _dotted(loc)
    if typ == "extra_forbidden":
        allowed = _allowed_fields(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return where, f"unknown field; {hint}allowed here: {', '.join(allowed)}"
    if typ == "missing":
        return where, "required field is missing; add it"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if typ in bounds:
        bound = next(iter(ctx.values())) if ctx else "?"
        bound = f"{bound:g}" if isinstance(bound, float) else bound
        return where, f"must be {bounds[typ]} {bound} (got {_short(got)})"
    if typ == "literal_error":
        return where, f"must be one of {ctx.get('expected', '?')} (got {_short(got)})"
    if typ in ("int_parsing", "int_type", "int_from_float"):
        return where, f"must be an integer (got {_short(got)})"
    if typ in ("float_parsing", "float_type"):
        return where, f"must be a number (got {_short(got)})"
    if typ in ("bool_parsing", "bool_type"):
        return where, f"must be true or false (got {_short(got)})"
    if typ in ("string_type",):
        return where, f"must be a string (got {_short(got)})"
    if typ in ("list_type",):
        return where, f"must be a list (got {_short(got)})"
    if typ in ("model_type", "model_attributes_type", "dict_type"):
        return where, f"must be a mapping of fields (got {_short(got)})"
    if typ == "too_short":
        return where, f"must not be empty (got {_short(got)})"
    if typ == "string_pattern_mismatch":
        return where, f"must be letters, digits, '_', '.' or '-' (got {_short(got)})"
    if typ == "value_error":
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        return where, msg
    return where, f"{err.get('msg', 'invalid value')} (got {_short(got)})"


def _fail(origin: str, where: str, msg: str) -> ConfigError:
    return ConfigError(f"workflow spec {origin}: {where}: {msg}")


# -- loading ---------------------------------------------------------------------------------------------
def apply_overrides(raw: dict[str, Any], overrides: list[str] | None, origin: str = "spec") -> dict[str, Any]:
    """Apply ``KEY.PATH=VALUE`` overrides (VALUE read as YAML, e.g. ``finetune.epochs=2``) to a raw spec."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD.PATH=VALUE, e.g. --set finetune.epochs=2")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        node: Any = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict):
                raise _fail(origin, key, f"cannot set a field inside {part!r} (not a mapping)")
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            node = nxt
        if not isinstance(node, dict):
            raise _fail(origin, key, "cannot set a field inside a non-mapping value")
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
        where, msg = _message(e.errors()[0])
        raise _fail(origin, where, msg) from None
    spec = _resolve_paths(spec, os.path.abspath(here or os.getcwd()))
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
                    raise _fail(origin, f"prompts.lines[{i}]", str(e).split(": ", 1)[-1]) from None
        names = [s.name for s in parse.parse_prompt_text(spec.prompts.text() or "", origin="prompts.lines")]
    else:
        file = spec.prompts.file or ""
        if "://" not in file and not os.path.isfile(file):
            raise _fail(origin, "prompts.file", f"{file} not found; give a prompts.txt path (relative to the spec's "
                        "folder) or list the edits under prompts.lines")
        try:
            names = [s.name for s in parse.parse_prompt_file(file)]
        except (ConfigError, InputFileError) as e:
            raise _fail(origin, "prompts.file", str(e)) from None
    for field, wanted in (("restyle.variants", spec.restyle.variants),
                          ("restyle.mix.models", spec.restyle.mix.models if spec.restyle.mix else None)):
        for i, n in enumerate(wanted or []):
            if n not in names:
                raise _fail(origin, f"{field}[{i}]", f"{n!r} is not a prompt name; the prompts are {names} "
                            "(name=NAME on a prompt line sets it)")
    if spec.restyle.mix is not None:
        try:  # weights per model summing to 1 over the generation steps 0..t0 (eq. 14)
            validate_gamma(gamma_from_spec(spec.restyle.mix.gamma), len(spec.restyle.mix.models),
                           range(0, spec.latents.t0 + 1, max(1, spec.latents.t0 // 50)))
        except (ConfigError, ValueError, TypeError, KeyError) as e:
            raise _fail(origin, "restyle.mix.gamma", str(e)) from None


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
            raw = yaml.safe_load(f)
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

"""The workflow spec (`workflows/*.yaml`): one file naming the input, base model, prompts, latent
store, fine-tuning and restyle settings and the outputs of a whole pipeline run.

`load_spec(path)` (:mod:`.load`) reads and validates it; a bad spec raises :class:`ConfigError` with ONE line naming
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

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)

from dclip_ray.config import (
    FinetuneConfig,
    PrecomputeConfig,
    QualityCheck,
    Resources,
    RestyleSettings,
    RunOptions,
    SettingInfo,
    TrainingSets,
    settings_of,
    spec_settings,
)

__all__ = [
    "FinetuneSpec", "InputSpec", "LatentsSpec", "MixSpec", "OutputsSpec", "PromptsSpec", "RaySpec", "RestyleSpec",
    "ToyworldInput", "WorkflowSpec",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _spec_field(s: SettingInfo, given_only: bool = False) -> tuple[Any, Any]:
    """A pydantic field for a declared setting, with the same rule as every other surface; ``given_only``:
    optional with None = not given (fine-tuning settings, which a prompt line or preset may still set)."""
    rule: dict[str, Any] = {}
    if s.lo is not None:
        rule["gt" if s.lo_strict else "ge"] = s.lo
    if s.hi is not None:
        rule["le"] = s.hi
    tp: Any = Literal[(*s.choices, *s.aliases)] if s.choices is not None else s.type  # type: ignore[valid-type]
    if given_only or s.optional:
        tp = tp | None
    default = None if given_only else s.default
    return (tp, Field(default, description=s.help, **({} if s.choices is not None else rule)))


def _section(name: str, base: type[BaseModel], settings: list[SettingInfo], doc: str,
             given_only: list[SettingInfo] = ()) -> Any:  # type: ignore[assignment]
    """The spec section ``name``: ``base``'s own fields plus one field per declared setting."""
    model = create_model(
        name, __base__=base, __module__=__name__,
        **{s.spec_key: _spec_field(s) for s in settings},  # type: ignore[misc]
        **{s.spec_key: _spec_field(s, given_only=True) for s in given_only},  # type: ignore[misc]
    )
    model.__doc__ = doc
    return model


def _of(section: str, cls: type) -> list[SettingInfo]:
    """The settings of config ``cls`` that are fields of spec ``section``."""
    return [s for s in settings_of(cls) if s.spec_section == section]


def _values(obj: BaseModel, cls: type) -> dict[str, Any]:
    """``{cls field: value}`` of the settings of ``cls`` that ``obj`` (a spec section) holds."""
    section = {f: getattr(obj, f) for f in type(obj).model_fields}
    return {s.name: section[s.spec_key] for s in settings_of(cls) if s.spec_key in section
            and s.spec_section == getattr(obj, "_SECTION", None)}


class ToyworldInput(_Strict):
    """Render the embedded toy world's shapes as the input (written once under ``outputs.root/input``)."""

    n: int = Field(64, ge=1, description="images")
    shard_size: int = Field(32, ge=1, description="images per shard")
    seed: int = Field(0, ge=0, description="dataset seed (keys '{seed}_{index:06d}')")
    kinds: list[str] | None = Field(None, description="exactly these kinds, 'COLOUR SHAPE' each, interleaved "
                                    "(default: every colour and shape)")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str] | None) -> list[str] | None:
        from dclip_ray.toyworld.render import COLOURS, SHAPES

        for k in v or []:
            parts = k.split()
            if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
                raise ValueError(f"{k!r}: expected 'COLOUR SHAPE' with a colour of {', '.join(COLOURS)} and a "
                                 f"shape of {', '.join(SHAPES)}")
        return v

    def kind_pairs(self) -> list[tuple[str, str]] | None:
        """``kinds`` as (colour, shape) pairs (None: every kind)."""
        return [tuple(k.split()) for k in self.kinds] if self.kinds else None  # type: ignore[misc]


class _InputBase(_Strict):
    _SECTION = "input"
    url: str | None = None
    toyworld: ToyworldInput | None = None

    @model_validator(mode="after")
    def _one_source(self) -> _InputBase:
        if (self.url is None) == (self.toyworld is None):
            raise ValueError("give exactly one of input.url (shards) or input.toyworld ({n: 64, shard_size: 32})")
        return self


InputSpec = _section("InputSpec", _InputBase, spec_settings("input"), """Where the images come from: ``url``
(WebDataset shards, img2dataset output or a folder; local or fsspec URL) or ``toyworld`` (rendered), and
how images of another size are fitted (``resize_policy``). New shards appearing under ``url`` are
processed by the next run.""")


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


class _LatentsBase(_Strict):
    _SECTION = "latents"
    store: str | None = Field(None, description="default: outputs.root/latents")


LatentsSpec = _section("LatentsSpec", _LatentsBase, spec_settings("latents"), """The latent store written by
precompute and read by fine-tuning and restyle: ``store`` and the :class:`~dclip_ray.config.PrecomputeConfig`
settings (``t0`` and ``n_inv`` are also every prompt's, unless its line says otherwise).""")


class _FinetuneBase(_Strict):
    """The fine-tuning job's own fields (not fine-tuning settings)."""

    _SECTION = "finetune"

    def settings(self) -> dict[str, Any]:
        """The fine-tuning settings given here, as ``{FinetuneConfig field: value}`` (unset ones left out)."""
        return {k: v for k, v in _values(self, FinetuneConfig).items() if v is not None}


FinetuneSpec = _section(
    "FinetuneSpec", _FinetuneBase, [*_of("finetune", RunOptions), *_of("finetune", Resources),
                                    *_of("finetune", TrainingSets), *_of("finetune", QualityCheck)],
    """Defaults of every prompt line (a line's own ``lr=`` ... wins), see `dclip-ray finetune-many`: the job
options (``clip``, ``clip_weights``, ``face_weights``; :class:`dclip_ray.config.RunOptions`), the Train resources (``max_failures``, ``max_concurrent``), how training images are chosen
(``select``, ``allow_fewer``; :class:`dclip_ray.config.TrainingSets`), the check each model passes
before its prompt is done (``check_images``, ``min_quality``, ``min_spread``, ``accept_low_quality``;
:class:`dclip_ray.config.QualityCheck`) and every fine-tuning setting by its
spec key (``lr``, ``n_gen``, ``aug_views``, ``clip_weight``, ...; declared in
:class:`dclip_ray.config.FinetuneConfig`). A fine-tuning key left out is not given.""",
    given_only=_of("finetune", FinetuneConfig))
SPEC_SETTINGS = _of("finetune", FinetuneConfig)
"""The fine-tuning settings of a spec's ``finetune`` section (t0 and S_inv come from ``latents``)."""


class MixSpec(_Strict):
    """One mixed output: the fine-tuned models of these prompt names, weighted by ``gamma`` (eq. 14)."""

    models: list[str] = Field(..., min_length=1)
    gamma: dict[str, Any]


class _RestyleBase(_Strict):
    _SECTION = "restyle"
    variants: list[str] | None = Field(None, min_length=1)
    mix: MixSpec | None = None

    @model_validator(mode="after")
    def _variants_or_mix(self) -> _RestyleBase:
        if self.variants is not None and self.mix is not None:
            raise ValueError("give either restyle.variants or restyle.mix, not both")
        return self


RestyleSpec = _section(
    "RestyleSpec", _RestyleBase, spec_settings("restyle"),
    """Restyle the input with the fine-tuned models: ``variants`` (prompt names, one output each; default
every prompt) or one ``mix``, the :class:`~dclip_ray.config.RestyleSettings` and the actors'
:class:`~dclip_ray.config.Resources`.""")


class OutputsSpec(_Strict):
    """Where everything goes. ``root`` holds ``latents/``, ``models/``, ``restyled/``, the report and
    the run ledger ``runs.jsonl`` unless the other fields say otherwise."""

    root: str
    models: str | None = None
    restyled: str | None = None
    ledger: str | None = None
    report: bool = True


class _RayBase(_Strict):
    _SECTION = "ray"
    num_cpus: int | None = Field(None, ge=1, description="CPUs of an embedded Ray (default: the machine's)")


RaySpec = _section("RaySpec", _RayBase, spec_settings("ray"), """Which Ray and how much of it each unit of
work takes (defaults suit a CPU machine; see :class:`~dclip_ray.config.Resources`).""")


class _WorkflowBase(_Strict):
    """A validated workflow spec with every local path absolute (see the module docstring); its top-level
    job options (``preset``) are declared in :class:`dclip_ray.config.RunOptions`."""

    _SECTION = ""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    input: InputSpec
    model: str = Field(..., min_length=1)
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

    # -- derived configs ---------------------------------------------------------------------------------
    def _all(self, cls: type) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section in (self, self.input, self.latents, self.finetune, self.restyle, self.ray):
            out.update({k: v for k, v in _values(section, cls).items() if k not in out})
        return out

    def precompute_config(self) -> PrecomputeConfig:
        """The precompute settings of this spec (``latents`` and ``input.resize_policy``)."""
        return PrecomputeConfig(**self._all(PrecomputeConfig))

    def restyle_settings(self) -> RestyleSettings:
        """The restyle settings of this spec (``restyle``, ``latents.n_inv``, ``input.resize_policy``)."""
        return RestyleSettings(**self._all(RestyleSettings))

    def training_sets(self) -> TrainingSets:
        """How each prompt's training images are chosen and fitted (``finetune.select``, ``finetune.allow_fewer``,
        ``input.resize_policy``)."""
        return TrainingSets(**self._all(TrainingSets))

    def quality_check(self) -> QualityCheck:
        """The check each fine-tuned model passes (``finetune.check_images``, ``min_quality``, ...)."""
        return QualityCheck(**self._all(QualityCheck))

    def run_options(self) -> RunOptions:
        """The job options a spec sets (``preset``, ``finetune.clip``, ``finetune.clip_weights``,
        ``finetune.face_weights``, ``ray.address``); the others keep their defaults."""
        return RunOptions(**self._all(RunOptions))

    def resources(self) -> Resources:
        """What each unit of Ray work takes (``ray`` and the resource fields of ``finetune``/``restyle``)."""
        return Resources(**self._all(Resources))

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


WorkflowSpec = _section("WorkflowSpec", _WorkflowBase, spec_settings(""), _WorkflowBase.__doc__ or "")

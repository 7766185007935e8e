"""The settings of the jobs around fine-tuning, declared like :class:`dclip_ray.config.FinetuneConfig`
(:func:`dclip_ray.settings.setting`): precompute's (:class:`PrecomputeConfig`), restyle's
(:class:`RestyleSettings`), how training images are chosen (:class:`TrainingSets`), the check of a
fine-tuned model (:class:`QualityCheck`), what each unit of Ray work takes (:class:`Resources`) and the
options every command shares (:class:`RunOptions`). Import them from :mod:`dclip_ray.config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from dclip_ray.io.formats import OUTPUT_FORMATS
from dclip_ray.settings import setting, shared, validate_settings


@dataclass(frozen=True)
class PrecomputeConfig:
    """Everything that determines `dclip-ray precompute`'s latents (the store key and how they are
    made); the spec's ``latents`` section. Frozen and validated on creation."""

    SPEC_SECTION: ClassVar[str] = "latents"

    t0: int = shared("t0", help="Return step t0 (the fine-tuning and restyle t0 the latents are for).")
    n_inv_steps: int = shared("n_inv_steps", spec="latents.n_inv")
    resize_policy: str = shared("resize_policy")
    dtype: str = setting("float32", "Stored latent dtype.", cli="dtype", choices=("float32", "float16"))
    batch_size: int = shared("batch_size", help="Images per inversion batch.")
    recon_psnr: bool = setting(False, "Also regenerate with the base model and store the reconstruction PSNR.",
                               cli="recon-psnr")

    def __post_init__(self) -> None:
        validate_settings(self)


@dataclass(frozen=True)
class RestyleSettings:
    """The settings of a restyle (`dclip-ray restyle`, `edit`; the spec's ``restyle`` section): steps,
    strength, image handling. Frozen and validated on creation. ``t0`` None: the models' own t0
    (:func:`dclip_ray.models.base.edit_t0`); in a workflow it is always the latents' t0."""

    SPEC_SECTION: ClassVar[str] = "restyle"

    t0: int | None = shared("t0", default=None, help="Return step (default: the t0 the models were fine-tuned "
                            "with).", spec=None)
    n_inv_steps: int = shared("n_inv_steps", spec="latents.n_inv")
    n_gen_steps: int = shared("n_gen_steps")
    strength: float = setting(1.0, "Edit strength r in 0..1: eps = r*finetuned + (1-r)*original.",
                              cli="strength", lo=0, hi=1)
    resize_policy: str = shared("resize_policy")
    image_format: str = setting("png", "Output image format: png (lossless), jpg (quality 95) or webp (lossless).",
                                cli="format", choices=tuple(OUTPUT_FORMATS))
    batch_size: int = shared("batch_size", help="Images per generation batch.")
    route: str = setting("auto", "Which images each model edits: 'source' (only those matching the model's "
                         "source, by caption or zero-shot CLIP; the others get a 'skipped' manifest row), 'all' "
                         "(every image), or 'auto': source when the models have two or more different sources "
                         "(a mixed prompt file), else all.", cli="route", choices=("auto", "source", "all"))
    limit: int | None = setting(None, "Process only the whole shards holding the first N input keys (the shard is "
                                "the unit of work; a folder of images is one shard).", cli="limit", lo=1)
    min_score: float | None = setting(None, "Reject every edit whose judge-free score (directional CLIP similarity "
                                      "- 0.5*(1 - structure SSIM) - 4*outer-frame change, written per image in the "
                                      "manifest) is under this: a 'rejected' manifest row with its scores, its image "
                                      "kept in rejected/SHARD.tar beside the output, never in it. A re-run with "
                                      "another value re-sorts the stored edits and generates nothing.",
                                      cli="min-score")

    def __post_init__(self) -> None:
        validate_settings(self)


@dataclass(frozen=True)
class TrainingSets:
    """How `finetune-many` (and a workflow) chooses each prompt's training images from a mixed dataset
    (:mod:`dclip_ray.stages.selection`); the spec's ``finetune`` section. A prompt line's ``images=``
    overrides the choice for that line; its ``n_train=`` sets how many."""

    SPEC_SECTION: ClassVar[str] = "finetune"

    select: str = setting("source", "How each prompt's training images are chosen: 'source' (the first images "
                          "whose caption, else zero-shot CLIP, matches the prompt's source) or 'first' (the "
                          "first images of the input, whatever they show).", cli="select",
                          choices=("source", "first"))
    allow_fewer: bool = setting(False, "Train a prompt on fewer matching images than n_train (a warning) instead "
                                "of failing (at least one is always needed).", cli="allow-fewer")
    resize_policy: str = shared("resize_policy", help="How a training image of another size becomes the model's: "
                                "center-crop, resize or pad (a latent store is used only when precomputed with "
                                "the same policy).")

    def __post_init__(self) -> None:
        validate_settings(self)


@dataclass(frozen=True)
class QualityCheck:
    """The check a fine-tuned model passes before `finetune` or `finetune-many` calls its prompt done
    (:mod:`dclip_ray.quality`): its edits of held-aside images of the source, scored without a judge
    (the spec's ``finetune`` section). A prompt that fails it is a failure with its reason (exit 2; the
    model is kept apart, under ``_failed/``), unless a restart passes or ``accept_low_quality``."""

    SPEC_SECTION: ClassVar[str] = "finetune"

    check_images: int = setting(8, "Held-aside images of the source (not trained on) the fine-tuned model edits "
                                "for its check (0: no check). With fewer left after the training images, the "
                                "training images are used and the card says so.", cli="check-images", lo=0)
    min_quality: float | None = setting(None, "The bar of the check: the mean judge-free score of those edits "
                                        "(the --min-score of restyle, per image) under which the prompt fails "
                                        "(default: the model preset's quality_bar; none for a model without one).",
                                        cli="min-quality")
    min_spread: float = setting(0.3, "Fail a model whose outputs vary less than this fraction of how much their "
                                "inputs do (a collapse: the same picture whatever the input).", cli="min-spread",
                                lo=0)
    accept_low_quality: bool = setting(False, "Keep a model that fails the check, with a warning, instead of "
                                       "failing its prompt.", cli="accept-low-quality")

    def __post_init__(self) -> None:
        validate_settings(self)

    def bar(self, preset: Any) -> float | None:
        """The score bar in force: ``min_quality``, else the model preset's ``quality_bar`` (None: none)."""
        return self.min_quality if self.min_quality is not None else getattr(preset, "quality_bar", None)


@dataclass(frozen=True)
class Resources:
    """What each unit of Ray work takes (the spec's ``ray`` section and the per-stage fields named in
    each setting's spec path). None: chosen from the cluster (see each help text)."""

    SPEC_SECTION: ClassVar[str] = "ray"

    cpus_per_task: float = setting(1.0, "CPUs per precompute shard task.", cli="cpus-per-task", lo=0,
                                   lo_strict=True)
    gpus_per_task: float = setting(0.0, "GPUs per precompute shard task (0 on CPU machines).", cli="gpus-per-task",
                                   lo=0)
    cpus_per_prompt: float = setting(1.0, "CPUs of each prompt's Train worker.", cli="cpus-per-prompt", lo=0,
                                     lo_strict=True)
    gpus_per_prompt: float = setting(0.0, "GPUs of each prompt's Train worker.", cli="gpus-per-prompt", lo=0)
    max_failures: int = setting(2, "Worker failures tolerated per prompt (resumes from the last checkpoint).",
                                cli="max-failures", spec="finetune.max_failures", lo=0)
    max_concurrent: int | None = setting(None, "At most this many fine-tunings at once (each restart or search "
                                         "trial of a prompt counts; default: as resources allow).",
                                         cli="max-concurrent", spec="finetune.max_concurrent", lo=1)
    actors: int | None = setting(None, "Restyle generator actors (default: the CPUs, or the GPUs with "
                                 "--gpus-per-actor).", cli="actors", spec="restyle.actors", lo=1)
    cpus_per_actor: float | None = setting(None, "CPUs per restyle actor (default 0.5 when the actors take every "
                                           "CPU: leaves room for reads; else 1).", cli="cpus-per-actor",
                                           spec="restyle.cpus_per_actor", lo=0, lo_strict=True)
    gpus_per_actor: float = setting(0.0, "GPUs per restyle actor.", cli="gpus-per-actor",
                                    spec="restyle.gpus_per_actor", lo=0)
    shard_timeout: float | None = setting(None, "Report a restyle shard as stuck when it has no result after this "
                                          "many seconds; the others finish and the exit code is 2 (default: wait "
                                          "forever).", cli="shard-timeout", spec="restyle.shard_timeout", lo=0,
                                          lo_strict=True)

    def __post_init__(self) -> None:
        validate_settings(self)

    def restyle_pool(self, cpus: float, gpus: float = 0.0) -> tuple[int, float, str]:
        """``(actors, CPUs per actor, why)`` of the restyle actor pool on a cluster of ``cpus`` CPUs and
        ``gpus`` GPUs (all its nodes: ``ray.cluster_resources()``, read after Ray is up): ``--actors``
        when given, else one actor per ``--gpus-per-actor`` GPUs with it, else one per CPU. Each actor
        takes ``--cpus-per-actor``, else 0.5 CPU when the actors take every CPU (Ray Data's read tasks are
        never starved: a pool claiming every CPU hangs), else 1. ``why`` says which rule chose, in words."""
        cpus_n = max(1, int(cpus))
        if self.actors:
            actors, why = self.actors, f"--actors {self.actors}"
        elif self.gpus_per_actor:
            actors = max(1, int(gpus // self.gpus_per_actor))
            why = (f"one per {self.gpus_per_actor:g} GPU of the cluster's {gpus:g}" if gpus else
                   "no GPU in the cluster yet: 1 (it starts when a GPU node joins)")
        else:
            actors, why = cpus_n, f"one per CPU of the cluster's {cpus:g}"
        per_actor = self.cpus_per_actor if self.cpus_per_actor is not None else (0.5 if actors >= cpus_n else 1.0)
        return actors, per_actor, f"{why}, {per_actor:g} CPU each"


TRUST_HELP = ("Allow checkpoints that can run code when loaded (pickles beyond tensors, TorchScript): "
              "trusted files only.")
QUIET_HELP = ("No progress output (a bar on a terminal; off a terminal, one plain line on stderr every 30 s at most "
              "and at least every minute; none with --json).")


@dataclass(frozen=True)
class RunOptions:
    """The options of a job rather than of a stage: which architecture, CLIP and face weights it loads,
    whether it may unpickle code, where Ray is, and how it talks (``--json``, ``--verbose``, ``--quiet``).
    Declared once here; every command takes the ones it uses (:func:`dclip_ray.cli.settings.config_options`
    with ``only=``, a command may word the help for its use) and the workflow spec has the ones a spec
    sets (``preset``, ``finetune.clip``, ``finetune.clip_weights``, ``finetune.face_weights``,
    ``ray.address``)."""

    SPEC_SECTION: ClassVar[str] = ""

    preset: str | None = setting(None, "Architecture preset for a raw checkpoint (`dclip-ray models list`).",
                                 cli="preset")
    clip: str | None = setting(None, "CLIP preset or open_clip name (default: the model preset's).", cli="clip",
                               spec="finetune.clip")
    clip_weights: str | None = setting(None, "Local weights of --clip (required for CLIPs not bundled).",
                                       cli="clip-weights", spec="finetune.clip_weights")
    face_weights: str | None = setting(None, "Local InceptionResnetV1 weights (facenet-pytorch, VGGFace2): the "
                                       "identity loss (id > 0) of a fine-tuning, and the identity cosine in each "
                                       "edit's scores.", cli="face-weights", spec="finetune.face_weights")
    score_clip: str | None = setting(None, "CLIP that scores every edit per image (default: the one the models "
                                     "were fine-tuned with, from their dclip.json).", cli="score-clip", spec=None)
    score_clip_weights: str | None = setting(None, "Local weights of --score-clip.", cli="score-clip-weights",
                                             spec=None)
    trust_checkpoint: bool = setting(False, TRUST_HELP, cli="trust-checkpoint", flag=True, spec=None)
    address: str | None = setting(None, "Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray).",
                                  cli="address", spec="ray.address")
    as_json: bool = setting(False, "Print a machine-readable summary.", cli="json", flag=True, spec=None)
    verbose: bool = setting(False, "Show warnings and library logs (Ray's own too).", cli="verbose", spec=None)
    quiet: bool = setting(False, QUIET_HELP, cli="quiet", flag=True, spec=None)

    def __post_init__(self) -> None:
        validate_settings(self)

    @property
    def progress(self) -> bool:
        """Progress for long work unless ``--quiet`` or ``--json``: a bar on a terminal, plain lines off it
        (:func:`dclip_ray.progress.progress` decides which)."""
        return not (self.as_json or self.quiet)


@dataclass(frozen=True, kw_only=True)
class TranslateSettings:
    """The settings of `translate` and `from-strokes` (paper, Figure 4): the round trips into the trained
    domain and the edit after them (:class:`dclip_ray.applications.TranslateJob` extends it). Not in the
    workflow spec. ``from-strokes`` gives ``k`` its own default, 2."""

    t0: int = shared("t0", default=300, help="Step t0 the input is noised to (eq. 1); higher forgets more of the "
                     "source.", spec=None)
    k: int = setting(1, "Noise + denoise round trips with the original model (the official code's K).", cli="k",
                     spec=None, lo=1)
    t0_edit: int | None = setting(None, "Return step of the edit (default: the fine-tuned model's t0, else --t0).",
                                  cli="t0-edit", spec=None, lo=1)
    strength: float = setting(1.0, "Edit strength r in [0, 1] of the fine-tuned model.", cli="strength", spec=None,
                              lo=0, hi=1)
    n_inv_steps: int = shared("n_inv_steps", help="Inversion steps S_inv of the edit.", spec=None)
    n_gen_steps: int = shared("n_gen_steps", spec=None)
    n_domain_steps: int | None = setting(None, "Generation steps of each round trip (default: --n-gen).",
                                         cli="n-domain", spec=None, lo=2)
    eta: float = setting(0.0, "DDIM eta of the round trips (0 = deterministic generation).", cli="eta", spec=None,
                         lo=0)
    seed: int = setting(0, "Seed of the forward noise (same seed, same output).", cli="seed", spec=None, lo=0)
    limit: int | None = setting(None, "Process at most this many images.", cli="limit", spec=None, lo=1)
    batch_size: int = shared("batch_size", spec=None)
    grid: bool = setting(False, "Also write grid.png (input / trained domain / edited rows).", cli="grid", spec=None)
    min_score: float | None = setting(None, "With --finetuned: an edit scored under this goes to "
                                      "OUT/rejected/{key}.png, never OUT (a 'rejected' row with its scores in "
                                      "OUT/scores.parquet).", cli="min-score", spec=None)

    def __post_init__(self) -> None:
        validate_settings(self)

"""What a restyle makes (no Ray): its outputs (:class:`Variant`: models, mix weights, t0, edits, folder),
its whole configuration (:class:`RestyleConfig`), the hash that names a variant's committed work and
whether an input shard's outputs are committed (:func:`shard_done`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import fsspec

from dclip_ray.diffusion import generation_pairs
from dclip_ray.hashing import config_sha256
from dclip_ray.io.shards import read_marker, shard_urls
from dclip_ray.io.sources import same_source
from dclip_ray.mixing import GammaSchedule, gamma_from_spec
from dclip_ray.models.cache import cached_base, cached_unet_sha256
from dclip_ray.models.card import ModelCard, read_card
from dclip_ray.scoring import ScoreStats

SHARD_FORMAT = "dclip-ray/restyle-shard/1"
"""The ``format`` of a restyle commit marker."""


@dataclass
class Variant:
    """One output of a restyle: a combination of the base (index 0) and fine-tuned models (1..M),
    written under ``out``. ``gamma`` gives the weights over ``models`` (indices) at each step. ``t0``:
    its return step (the only t0 of a restyle); ``edits``: ``[source, target]`` of each of its models (from
    their cards; captions and provenance); ``sources``: what a routed restyle edits with it (empty:
    every image)."""

    name: str
    out: str
    models: list[int]
    gamma: dict[str, Any]
    t0: int
    description: dict[str, Any] = field(default_factory=dict)
    edits: list[list[str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


@dataclass
class RestyleConfig:
    """Everything a restyle worker needs (plain data: it travels to Ray actors). ``model_sha256s``: the
    sha256 of the base and each fine-tuned model, computed once by the driver (:func:`model_shas`) so
    that workers do not hash the models again (None: the worker hashes them)."""

    base: str
    finetuned: list[str]
    variants: list[Variant]
    n_inv_steps: int = 40
    n_gen_steps: int = 40
    preset: str | None = None
    latents: str | None = None
    resize_policy: str = "center-crop"
    image_format: str = "png"
    batch_size: int = 16
    device: str = "cpu"
    trust_checkpoint: bool = False  # allow pickles holding more than tensors (they can run code)
    root: str = ""  # the --out the variants are under (restyle.json, the run's declaration, is written there)
    model_sha256s: list[str] | None = None
    route: str = "all"  # "source": each variant edits only the images matching its sources
    clip: str | None = None  # the CLIP that routes uncaptioned images (zero-shot)
    clip_weights: str | None = None
    score_clip: str | None = None  # the CLIP that scores every edit (None: edits are not scored)
    score_clip_weights: str | None = None
    min_score: float | None = None  # an edit scored under it is a rejected row (not in the config hash)
    face_weights: str | None = None  # a face identity network: scores gain the identity cosine (faces)
    cards: list[ModelCard] | None = None  # the fine-tuned models' cards, read once by the driver (None: read on need)
    io_depth: int = 2  # batches decoded ahead and batches waiting to be written (0: in turn; not in the hash)

    def model_cards(self) -> list[ModelCard]:
        """The card of each fine-tuned model (as read by the driver, else read now)."""
        if self.cards is None:
            self.cards = [read_card(f) for f in self.finetuned]
        return self.cards

    def t0s(self) -> list[int]:
        """The distinct return steps of the variants, ascending (one inversion per image each)."""
        return sorted({v.t0 for v in self.variants})

    def routes(self, v: Variant) -> bool:
        """True when variant ``v`` edits only the images matching its sources."""
        return self.route == "source" and bool(v.sources)

    def scores(self, v: Variant) -> bool:
        """True when variant ``v``'s edits are scored (a scoring CLIP is given and it names its edits)."""
        return self.score_clip is not None and bool(v.edits)

    def variant_hash(self, v: Variant, model_shas: list[str]) -> str:
        """The config hash recorded in a variant's commit markers (a different hash redoes the shard)."""
        return config_sha256({
            "models": [model_shas[i] for i in v.models], "gamma": v.gamma, "t0": v.t0,
            "n_inv_steps": self.n_inv_steps, "n_gen_steps": self.n_gen_steps, "policy": self.resize_policy,
            "format": self.image_format, "edits": v.edits,
            "route": [sorted(v.sources), self.clip] if self.routes(v) else "all",
            **({"score": [self.score_clip, _basename(self.score_clip_weights)]
                          + ([_basename(self.face_weights)] if self.face_weights else [])} if self.scores(v) else {}),
        })


def _basename(path: str | None) -> str | None:
    return path.rstrip("/").rsplit("/", 1)[-1] if path else None


def gamma_of(v: Variant) -> GammaSchedule:
    """The gamma schedule of a variant."""
    return gamma_from_spec(v.gamma)


def gen_evals_per_image(v: Variant, t0: int, n_gen_steps: int) -> int:
    """UNet evaluations per image for generating one variant (models of weight 0 are skipped)."""
    g = gamma_of(v)
    return sum(sum(1 for w in g.weights(t) if w != 0.0) for t, _ in generation_pairs(t0, n_gen_steps))


def model_shas(cfg: RestyleConfig) -> list[str]:
    """sha256 of the base (index 0) and each fine-tuned model's weights (``cfg.model_sha256s`` when the
    driver set it; else the models are loaded, once per process, and hashed once per process)."""
    if cfg.model_sha256s is not None:
        return list(cfg.model_sha256s)
    base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint)
    return [base.sha256] + [cached_unet_sha256(f, cfg.device, cfg.trust_checkpoint, card)
                            for f, card in zip(cfg.finetuned, cfg.model_cards(), strict=True)]


def variant_committed(v: Variant, shard: str, config_hash: str, fingerprint: str | None = None) -> bool:
    """True when variant ``v`` has a commit marker for ``shard`` written under ``config_hash`` from the
    input content ``fingerprint`` (when given: an input rewritten since is not committed), and the tar
    it vouches for is there with the size it records (a half-uploaded or replaced tar is not committed:
    the shard is redone)."""
    urls = shard_urls(v.out, shard)
    m = read_marker(urls["marker"])
    if m is None or m.get("config_sha256") != config_hash:
        return False
    if fingerprint is not None and not same_source(m, fingerprint):  # content, or size and time for a stat print
        return False
    if "tar_bytes" in m:
        try:
            fs, p = fsspec.core.url_to_fs(urls["tar"])
            return int(fs.size(p)) == int(m["tar_bytes"])
        except (FileNotFoundError, OSError):
            return False
    return True


def shard_committed(cfg: RestyleConfig, hashes: list[str], shard: str, fingerprint: str | None = None) -> bool:
    """True when every variant of ``cfg`` has committed ``shard`` under its config hash (``hashes``, one
    per variant; see :func:`variant_committed`)."""
    return all(variant_committed(v, shard, h, fingerprint) for v, h in zip(cfg.variants, hashes, strict=True))


def threshold_current(cfg: RestyleConfig, v: Variant, shard: str) -> bool:
    """True when variant ``v``'s committed ``shard`` was sorted with this run's ``--min-score`` (an
    unscored variant always is)."""
    if not cfg.scores(v):
        return True
    m = read_marker(shard_urls(v.out, shard)["marker"]) or {}
    return m.get("min_score") == cfg.min_score


def shard_done(cfg: RestyleConfig, hashes: list[str], shard: str, fingerprint: str | None = None) -> bool:
    """True when there is nothing to do for ``shard``: committed (:func:`shard_committed`) and sorted with
    this run's threshold in every variant (:func:`threshold_current`)."""
    return (shard_committed(cfg, hashes, shard, fingerprint)
            and all(threshold_current(cfg, v, shard) for v in cfg.variants))


def score_summary(cfg: RestyleConfig, shards: list[str]) -> dict[str, dict[str, Any]]:
    """Per scored variant, the summary of its edits' scores over ``shards`` (committed ones, read from
    their markers: this run's and earlier runs' alike): count, mean, quantiles, rejected, the lowest."""
    out = {}
    for v in cfg.variants:
        if not cfg.scores(v):
            continue
        stats = ScoreStats()
        for shard in shards:
            m = read_marker(shard_urls(v.out, shard)["marker"]) or {}
            stats.merge(ScoreStats.from_dict(m.get("scores")))
        out[v.name] = {**stats.summary(), "min_score": cfg.min_score}
    return out

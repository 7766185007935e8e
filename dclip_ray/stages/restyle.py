"""Restyle, one input shard -> edited output shards (no Ray).

:class:`ShardRestyler` loads the base and fine-tuned models once; :meth:`ShardRestyler.run` restyles one
whole input shard. Variants (outputs) may differ in t0: per distinct t0, each image gets the cached
latent when the store has one for that t0, else ONE inversion to that t0 shared by every variant of that
t0 (inverting once to the largest t0 and reading the smaller ones on the way is not exact: each t0 has
its own time grid). With routing (``route="source"``) a variant edits only the images that match its
models' source (:mod:`dclip_ray.stages.selection`); the others get a ``skipped`` manifest row with the
reason. Each variant is written by one :class:`~dclip_ray.io.shards.ShardWriter` (tar, manifest with a
row for every input key, commit marker last).

Every edit of a variant that names its edits (its models' cards give source and target) is scored
per image with the judge-free score of :mod:`dclip_ray.scoring`, from the tensors already in memory
(the input and the generated image; the CLIP is ``score_clip``, by default the models' own); the scores
are manifest columns and their summary is in the commit marker. With ``min_score`` an edit scored under
it is a ``rejected`` row and its sample goes to ``rejected/{shard}.tar`` beside the output. The
threshold is not part of the config hash: a re-run with another one re-sorts the committed samples by
their stored scores (:meth:`ShardRestyler.rethreshold`) and generates nothing. :mod:`dclip_ray.pipeline.restyle` runs it in Ray Data
actors; ``dclip-ray edit`` runs it in-process.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch

from dclip_ray.diffusion import generate, generation_pairs, invert
from dclip_ray.errors import InputFileError
from dclip_ray.hashing import config_sha256
from dclip_ray.io.formats import OUTPUT_EXTS, output_format
from dclip_ray.io.images import encode_image, output_defect
from dclip_ray.io.latents import LatentShard
from dclip_ray.io.leases import LeaseKeeper
from dclip_ray.io.manifest import ManifestRow, read_manifest
from dclip_ray.io.shards import REJECTED, ShardWriter, read_marker, remove_temporaries, shard_urls
from dclip_ray.io.sources import STAT_PREFIX, content_fingerprint, duplicate_reason, same_source, shard_stat
from dclip_ray.mixing import GammaSchedule, gamma_from_spec, mixed_eps_fn
from dclip_ray.models import eps_fn_of
from dclip_ray.models.cache import cached_base, cached_unet_sha256, model_eps_fns
from dclip_ray.models.card import ModelCard, read_card
from dclip_ray.scoring import ScoreStats, image_scores, rows_of, stats_of_rows
from dclip_ray.urls import redact

from .common import CountingEps, RestyleResult, lease_text
from .inputs import Decoded, batched, decode_shard, image_sha256, iter_shard
from .overlap import Lane, prefetched
from .precompute import find_latent_store
from .provenance import output_members
from .selection import SourceMatcher, Verdict

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


@dataclass
class _ShardState:
    """Bookkeeping of one shard being restyled: input position of every key, repeated keys, and per t0
    the cached latent file and its latents."""

    cached: dict[int, LatentShard | None]
    position: dict[str, int] = field(default_factory=dict)
    dups: dict[str, int] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    exclude: Mapping[str, str] = field(default_factory=dict)
    n_cached: int = 0
    n_stale: int = 0
    n_routed: int = 0
    latents: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    lane: Lane = field(default_factory=lambda: Lane(0))  # where the writers are written to (one thread, in order)

    def __post_init__(self) -> None:
        self.latents = {t0: (c.as_dict() if c is not None else {}) for t0, c in self.cached.items()}


class ShardRestyler:
    """Loads the base and fine-tuned models once (LoRA adapters share one working copy of the base:
    :func:`~dclip_ray.models.cache.model_eps_fns`); :meth:`run` restyles one whole input shard.

    For each image and each distinct t0 of the variants: the cached latent when the store has it (same
    model hash, t0, steps, size, policy) for exactly these image bytes, else ONE inversion with the base
    model shared by every variant of that t0; then one generation per variant, of the images routed to
    it. Per variant it writes ``{shard}.tar``, ``{shard}.parquet`` (a row for every input key: ok,
    error, or skipped by routing) and ``{shard}_stats.json`` last. A generated image that is not finite
    or is one flat colour is never committed: it becomes an error row.
    """

    def __init__(self, cfg: RestyleConfig):
        self.cfg = cfg
        known = cfg.model_sha256s[0] if cfg.model_sha256s else None  # the driver hashed the models once
        self.base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint, sha256=known)
        eps_fns = model_eps_fns(cfg.base, cfg.preset, self.base, cfg.finetuned, cfg.device, cfg.trust_checkpoint,
                                cfg.model_cards())
        self.shas = model_shas(cfg)
        self.hashes = [cfg.variant_hash(v, self.shas) for v in cfg.variants]
        self.stores = {t0: (find_latent_store(cfg.latents, self.shas[0], t0, cfg.n_inv_steps, self.base.resolution,
                                              cfg.resize_policy) if cfg.latents else None) for t0 in cfg.t0s()}
        self.inv_eps = CountingEps(eps_fn_of(self.base.unet))
        self.model_eps = [CountingEps(f) for f in eps_fns]
        self.variant_eps = [mixed_eps_fn([self.model_eps[i] for i in v.models], gamma_of(v),
                                         self.base.schedule.num_timesteps) for v in cfg.variants]
        routed = [s for v in cfg.variants if cfg.routes(v) for s in v.sources]
        self.matcher = (SourceMatcher(routed, self._load_clip, others=[e[1] for v in cfg.variants for e in v.edits])
                        if routed else None)
        self._scorer: Any = None
        self._face: Any = None
        self.on_batch: Callable[[int], Any] | None = None  # called with the images of each batch done (progress)
        self.source_stats: dict[str, str | None] = {}  # shard -> its input's size and time when read

    def _load_clip(self) -> Any:
        """The routing CLIP, loaded on first need (only uncaptioned images need it; None: none given)."""
        if self.cfg.clip is None:
            return None
        from dclip_ray.models.clip import load_clip

        return load_clip(self.cfg.clip, weights=self.cfg.clip_weights, device=self.cfg.device)

    def face(self) -> Any:
        """The face identity network of the identity score (None without ``face_weights``), loaded once."""
        if self._face is None and self.cfg.face_weights:
            from dclip_ray.models.face import load_face

            self._face = load_face(self.cfg.face_weights, device=self.cfg.device)
        return self._face

    def scorer(self) -> Any:
        """The CLIP that scores the edits, loaded on first need (the routing CLIP when it is the same)."""
        if self._scorer is None:
            cfg = self.cfg
            if self.matcher is not None and (cfg.score_clip, cfg.score_clip_weights) == (cfg.clip, cfg.clip_weights):
                self._scorer = self.matcher.clip
            if self._scorer is None:
                from dclip_ray.models.clip import load_clip

                self._scorer = load_clip(str(cfg.score_clip), weights=cfg.score_clip_weights, device=cfg.device)
        return self._scorer

    def committed(self, shard: str, fingerprint: str | None = None) -> bool:
        """True when every variant has a commit marker for ``shard`` with this config's hash (and, when
        given, from this input content)."""
        return shard_committed(self.cfg, self.hashes, shard, fingerprint)

    def _cached(self, t0: int, shard: str) -> LatentShard | None:
        store = self.stores.get(t0)
        if store is None:
            return None
        try:
            return store.read(shard)
        except InputFileError:  # not precomputed, or a damaged or half-written latent file: invert instead
            return None

    def _gen_evals(self) -> int:
        return sum(e.evals for e in self.model_eps)

    def _unet_seconds(self) -> float:
        return self.inv_eps.seconds + sum(e.seconds for e in self.model_eps)

    def new_writer(self, v: Variant, shard: str) -> ShardWriter:
        """The writer of variant ``v``'s output shard ``shard``."""
        return ShardWriter(v.out, shard)

    def run(self, shard: str, path: str, fingerprint: str | None = None, owner: str | None = None,
            exclude: Mapping[str, str] | None = None) -> RestyleResult:
        """Restyle one input shard (idempotent; skipped when committed from the same input content).
        ``owner`` (a run id) takes the shard's lease first; a shard leased by another live run is left
        to it. ``exclude`` (key -> reason): keys that become error rows unedited (e.g. keys that name
        samples of other shards too). Evaluations count images x network calls; ``n_stale``: cached
        latents not used because their image has changed; ``n_routed``: (variant, image) pairs passed
        over by routing."""
        self.source_stats[shard] = shard_stat(path)  # before the content is read: a later change shows
        try:
            return self._run(shard, path, fingerprint, owner, exclude)
        finally:
            self.source_stats.pop(shard, None)  # an actor lives for many shards: keep only the current one's

    def _run(self, shard: str, path: str, fingerprint: str | None, owner: str | None,
             exclude: Mapping[str, str] | None) -> RestyleResult:
        planned, fingerprint = fingerprint, content_fingerprint(path, fingerprint)  # read here when planned by stat
        committed = self.committed(shard, fingerprint)
        if committed and all(threshold_current(self.cfg, v, shard) for v in self.cfg.variants):
            # committed from this content, but not from this size and time: the input was touched since
            touched = planned is not None and planned.startswith(STAT_PREFIX) and not self.committed(shard, planned)
            return RestyleResult(shard, skipped=True, unchanged=touched)
        root = self.cfg.variants[0].out  # the lease lives beside the first output (two runs of other models never wait)
        keeper = LeaseKeeper(root, shard, owner) if owner is not None else None
        with keeper or nullcontext() as held:
            if held is not None:
                return RestyleResult(shard, leased=lease_text(held))
            for v in self.cfg.variants:
                remove_temporaries(v.out, shard)  # left by a writer that died (a full disk, a kill)
                remove_temporaries(f"{v.out}/{REJECTED}", shard)
            if committed:  # only --min-score changed: re-sort the stored edits, generate nothing
                result = self.rethreshold(shard, path)
            else:
                result = self._restyle(shard, path, fingerprint, exclude or {})
        if keeper is not None and keeper.notes:
            result.took_over = "; ".join(keeper.notes)
        return result

    def _restyle(self, shard: str, path: str, fingerprint: str, exclude: Mapping[str, str]) -> RestyleResult:
        start, started = time.perf_counter(), time.time()
        inv0, gen0, unet0 = self.inv_eps.evals, self._gen_evals(), self._unet_seconds()
        state = _ShardState({t0: self._cached(t0, shard) for t0 in self.cfg.t0s()}, exclude=exclude,
                            lane=Lane(self.cfg.io_depth, name=f"write-{shard}"))
        writers = [self.new_writer(v, shard) for v in self.cfg.variants]
        try:
            # the writers are touched in the lane only, until it is joined; leaving early stops the reader
            with state.lane, closing(self._batches(path, writers, state)) as batches:
                for pending in batches:
                    self._edit_batch(shard, pending, writers, state)
                    if self.on_batch is not None:
                        state.lane.submit(self.on_batch, len(pending))  # when written
                state.lane.join()
            for w in writers:
                w.drop({k: duplicate_reason(k, n) for k, n in state.dups.items()})
            if state.status.get("truncated"):  # keys that cannot be read: an error of the shard, never "done"
                return RestyleResult(shard, n=len(writers[0].rows), truncated=state.status["truncated"],
                                     seconds=round(time.perf_counter() - start, 3), started=round(started, 3))
            self._commit(path, writers, state, fingerprint)
        finally:
            for w in writers:
                w.discard()
        counts = [w.counts() for w in writers]  # a routed-away key is done for that variant
        return RestyleResult(shard, n=len(writers[0].rows), n_ok=min(c[0] + c[2] for c in counts),
                             n_error=max(c[1] for c in counts), n_rejected=max(w.n_rejected for w in writers),
                             inv_evals=self.inv_eps.evals - inv0,
                             gen_evals=self._gen_evals() - gen0, n_cached=state.n_cached, n_stale=state.n_stale,
                             n_routed=state.n_routed, seconds=round(time.perf_counter() - start, 3),
                             started=round(started, 3), unet_seconds=round(self._unet_seconds() - unet0, 3),
                             truncated=state.status.get("truncated"))

    def _batches(self, path: str, writers: list[ShardWriter], state: _ShardState) -> Iterator[list[Decoded]]:
        """Yield the decodable images of the shard in batches of ``cfg.batch_size``; bad images become
        error rows, a repeated key is counted in ``state.dups`` (none of its samples is used)."""
        stream = decode_shard(path, self.base.resolution, self.cfg.resize_policy, state.status)
        for batch in prefetched(batched(iter(stream), self.cfg.batch_size), self.cfg.io_depth):
            pending = []
            for d in batch:
                if d.rec.key in state.position:
                    state.dups[d.rec.key] = state.dups.get(d.rec.key, 1) + 1
                    continue
                state.position[d.rec.key] = len(state.position)
                error = state.exclude.get(d.rec.key, d.error)
                if error is not None:
                    for w in writers:
                        state.lane.submit(w.error, d.rec.key, error)
                else:
                    pending.append(d)
            if pending:
                yield pending

    def _routing(self, pending: list[Decoded], writers: list[ShardWriter], state: _ShardState) -> list[list[int]]:
        """Per variant, the indices into ``pending`` it edits; the others get a skipped row with the reason."""
        verdicts = self.matcher.verdicts(pending) if self.matcher is not None else [{} for _ in pending]
        chosen = []
        for v, w in zip(self.cfg.variants, writers, strict=True):
            if not self.cfg.routes(v):
                chosen.append(list(range(len(pending))))
                continue
            mine = []
            for i, (d, verdict) in enumerate(zip(pending, verdicts, strict=True)):
                seen = [verdict[s] for s in v.sources if s in verdict]
                if not seen or any(x.match for x in seen):
                    mine.append(i)
                else:
                    state.lane.submit(w.skip, d.rec.key, _skip_reason(v, seen[0]))
                    state.n_routed += 1
            chosen.append(mine)
        return chosen

    def _latents(self, t0: int, items: list[Decoded], x0: torch.Tensor, state: _ShardState) -> tuple[torch.Tensor, bool]:
        """``(x_t0 [B,3,H,W], from the cache)``: every latent cached and fresh for these image bytes, else
        one inversion of the batch to ``t0``."""
        cached, lat = state.cached.get(t0), state.latents.get(t0, {})
        known = [d for d in items if d.rec.key in lat]
        fresh = [d for d in known if cached is not None and cached.is_fresh(d.rec.key, image_sha256(d.rec))]
        state.n_stale += len(known) - len(fresh)
        if len(fresh) == len(items):
            state.n_cached += len(items)
            return torch.stack([lat[d.rec.key] for d in items]).to(self.cfg.device), True
        return invert(self.inv_eps, x0, t0, self.cfg.n_inv_steps, self.base.schedule), False

    @torch.no_grad()
    def _edit_batch(self, shard: str, pending: list[Decoded], writers: list[ShardWriter], state: _ShardState) -> None:
        """Route the batch, then per t0 the latents of the images some variant of that t0 edits (cached or
        inverted once), then every variant generated on its images and written."""
        cfg = self.cfg
        chosen = self._routing(pending, writers, state)
        x0_all = torch.stack([d.x for d in pending]).to(cfg.device)
        for t0 in cfg.t0s():
            group = [vi for vi, v in enumerate(cfg.variants) if v.t0 == t0]
            need = sorted({i for vi in group for i in chosen[vi]})
            if not need:
                continue
            x0 = x0_all[need]
            x_t0, from_cache = self._latents(t0, [pending[i] for i in need], x0, state)
            for vi in group:
                idx = [need.index(i) for i in chosen[vi]]
                if not idx:
                    continue
                x = generate(self.variant_eps[vi], x_t0[idx], t0, cfg.n_gen_steps, self.base.schedule)
                self._write(cfg.variants[vi], shard, [pending[i] for i in chosen[vi]], x, x0[idx], writers[vi],
                            from_cache, t0, state.lane)

    def _provenance(self, v: Variant, shard: str, t0: int, latent: str) -> dict[str, Any]:
        """The ``dclip`` record of an edited sample of variant ``v`` (see :mod:`.provenance`)."""
        cfg = self.cfg
        return {"variant": v.name, **v.description, "edits": [{"source": a, "target": b} for a, b in v.edits],
                "t0": t0, "n_inv_steps": cfg.n_inv_steps, "n_gen_steps": cfg.n_gen_steps,
                "base_model_sha256": self.shas[0], "latent": latent, "source_shard": shard}

    def _place(self, v: Variant, shard: str, writer: ShardWriter, key: str, extras: Mapping[str, bytes], data: bytes,
               t0: int, metrics: dict[str, Any], scores: dict[str, float]) -> None:
        """Write one edited sample (image bytes ``data``) with its row: ok into the output, or, scored
        under ``min_score``, rejected into the rejected tar (its caption not edited: the edit is not
        claimed)."""
        cfg = self.cfg
        ext = output_format(cfg.image_format).ext
        dclip = self._provenance(v, shard, t0, str(metrics.get("latent", "inverted")))
        if scores:
            dclip["scores"] = scores
        low = cfg.min_score is not None and "score" in scores and scores["score"] < cfg.min_score
        if low:
            reason = f"edit scored {scores['score']:.4f} < --min-score {cfg.min_score:g}"
            members = output_members(extras, {**dclip, "rejected": reason}, [])
            members[ext] = data
            writer.reject(key, members, ManifestRow(key, shard, "rejected", error=reason, sha256=_sha256(data),
                                                    metrics=metrics, scores=scores))
            return
        members = output_members(extras, dclip, v.edits)
        members[ext] = data
        writer.write(key, members, ManifestRow(key, shard, "ok", sha256=_sha256(data), metrics=metrics, scores=scores))

    def _write(self, v: Variant, shard: str, items: list[Decoded], x: torch.Tensor, x0: torch.Tensor,
               writer: ShardWriter, cached: bool, t0: int, lane: Lane) -> None:
        """Score (when the variant is scored) and write one variant's generated batch ``x`` [B,3,H,W]
        (inputs ``x0`` [B,3,H,W]); a defective output becomes an error row. The tensor work runs here;
        encoding, hashing and writing run in ``lane`` (in order)."""
        cfg = self.cfg
        latent = "cache" if cached else "inverted"
        defects = [output_defect(x[i]) for i in range(len(items))]
        good = [i for i, d in enumerate(defects) if d is None]
        scores: dict[int, dict[str, float]] = {}
        if cfg.scores(v) and good:
            parts = image_scores(self.scorer(), x0[good].float(), x[good].float().clamp(-1, 1), v.edits,
                                 face=self.face())
            scores = dict(zip(good, rows_of(parts), strict=True))
        metrics: list[dict[str, Any]] = []
        for i in range(len(items)):
            change = float((x[i].float().clamp(-1, 1) - x0[i].float()).abs().mean())
            metrics.append({"latent": latent, **({"mean_abs_change": round(change, 6)} if math.isfinite(change) else {})})
        x = x.detach().cpu()  # the lane encodes from host memory (a no-op on the CPU)
        lane.submit(self._store, v, shard, items, x, writer, t0, defects, metrics, scores)

    def _store(self, v: Variant, shard: str, items: list[Decoded], x: torch.Tensor, writer: ShardWriter, t0: int,
               defects: list[str | None], metrics: list[dict[str, Any]], scores: dict[int, dict[str, float]]) -> None:
        """Encode and write the checked batch ``x`` [B,3,H,W] in [-1,1] (CPU) of variant ``v``: an error row
        for each defective output, else the sample and its row (ok or rejected)."""
        for i, d in enumerate(items):
            if defects[i] is not None:  # never commit NaN or a flat image (a NaN weight, a diverged model)
                writer.error(d.rec.key, str(defects[i]))
                continue
            self._place(v, shard, writer, d.rec.key, d.rec.extras, encode_image(x[i], self.cfg.image_format), t0,
                        metrics[i], scores.get(i, {}))

    def _commit(self, path: str, writers: list[ShardWriter], state: _ShardState, fingerprint: str) -> None:
        for v, h, w in zip(self.cfg.variants, self.hashes, writers, strict=True):
            w.commit(self._marker(v, w, {"source": redact(path), "config_sha256": h, "variant": v.name,
                                         "truncated": state.status.get("truncated"), "source_fingerprint": fingerprint,
                                         "source_stat": self.source_stats.get(writers[0].shard),
                                         "format": SHARD_FORMAT}), order=state.position)

    def _marker(self, v: Variant, w: ShardWriter, marker: dict[str, Any]) -> dict[str, Any]:
        """``marker`` plus, for a scored variant, the threshold it was sorted with and its score summary."""
        if not self.cfg.scores(v):
            return marker
        stats = stats_of_rows(w.rows, w.shard)
        return {**marker, "min_score": self.cfg.min_score, "scores": stats.as_dict()}

    def rethreshold(self, shard: str, path: str) -> RestyleResult:
        """Re-sort a committed shard's scored edits by this run's ``min_score`` without generating
        anything: each variant's ok and rejected samples are read back (output and rejected tars), placed
        again by their stored scores and committed anew (same bytes as a fresh run with this threshold).
        Call it holding the shard's lease."""
        start, started = time.perf_counter(), time.time()
        extras: dict[str, Mapping[str, bytes]] = {}
        for rec in iter_shard(path):
            extras.setdefault(rec.key, rec.extras)
        counts = []
        for v in self.cfg.variants:
            if threshold_current(self.cfg, v, shard):
                m = read_marker(shard_urls(v.out, shard)["marker"]) or {}
                counts.append((int(m.get("n", 0)), int(m.get("n_ok", 0)) + int(m.get("n_skipped", 0)),
                               int(m.get("n_error", 0)), int(m.get("n_rejected", 0))))
                continue
            counts.append(self._rethreshold_variant(v, shard, extras))
        return RestyleResult(shard, n=counts[0][0], n_ok=min(c[1] for c in counts), n_error=max(c[2] for c in counts),
                             n_rejected=max(c[3] for c in counts), seconds=round(time.perf_counter() - start, 3),
                             started=round(started, 3), rethresholded=True)

    def _rethreshold_variant(self, v: Variant, shard: str, extras: Mapping[str, Mapping[str, bytes]],
                             ) -> tuple[int, int, int, int]:
        urls = shard_urls(v.out, shard)
        old = read_marker(urls["marker"]) or {}
        rows = read_manifest(urls["manifest"])
        images = _tar_images(urls["tar"])
        if any(r.status == "rejected" for r in rows):
            images.update(_tar_images(urls["rejected"]))
        w = self.new_writer(v, shard)
        try:
            for r in rows:
                if r.status in ("ok", "rejected") and "score" in r.scores:
                    data = images.get(r.key)
                    if data is None or _sha256(data) != r.sha256:
                        raise InputFileError(f"{redact(urls['tar'])}: the image of {r.key!r} is missing or differs "
                                             "from its manifest row; delete the shard's _stats.json to redo it")
                    self._place(v, shard, w, r.key, extras.get(r.key, {}), data, v.t0, r.metrics, r.scores)
                else:
                    w.rows.append(r)
            kept = {k: old[k] for k in ("source", "config_sha256", "variant", "truncated", "source_fingerprint",
                                        "source_stat", "format") if k in old}
            w.commit(self._marker(v, w, kept))
            n_ok, n_error, n_skipped = w.counts()
            return len(w.rows), n_ok + n_skipped, n_error, w.n_rejected
        finally:
            w.discard()


def _tar_images(url: str) -> dict[str, bytes]:
    """``{key: image bytes}`` of an output tar (its image members: :data:`~dclip_ray.io.formats.OUTPUT_EXTS`)."""
    import io
    import tarfile

    from dclip_ray.io.sources import split_member

    out: dict[str, bytes] = {}
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:") as tar:
        for m in tar:
            key, ext = split_member(m.name)
            if m.isfile() and ext in OUTPUT_EXTS:
                fobj = tar.extractfile(m)
                if fobj is not None:
                    out[key] = fobj.read()
    return out


def _skip_reason(v: Variant, verdict: Verdict) -> str:
    """The skipped row's reason: which source the image did not match, how it was judged."""
    return f"routed away from {v.name}: {verdict.reason(v.sources[0])} (--route source)"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

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

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, nullcontext
from typing import Any

import torch

from dclip_ray.diffusion import generate, invert
from dclip_ray.errors import InputFileError
from dclip_ray.io.latents import LatentShard, find_latent_store
from dclip_ray.io.leases import LeaseKeeper
from dclip_ray.io.shards import REJECTED, ShardWriter, remove_temporaries
from dclip_ray.io.sources import STAT_PREFIX, content_fingerprint, duplicate_reason, shard_stat
from dclip_ray.mixing import mixed_eps_fn
from dclip_ray.models import eps_fn_of
from dclip_ray.models.cache import cached_base, model_eps_fns

from .common import CountingEps, RestyleResult, lease_text
from .inputs import Decoded, batched, decode_shard, image_sha256
from .overlap import Lane, prefetched
from .restyle_write import OutputWriting, ShardState
from .selection import SourceMatcher, Verdict
from .variants import (
    RestyleConfig,
    Variant,
    gamma_of,
    gen_evals_per_image,
    model_shas,
    score_summary,
    shard_committed,
    shard_done,
    threshold_current,
    variant_committed,
)

__all__ = ["RestyleConfig", "ShardRestyler", "Variant", "gen_evals_per_image", "model_shas", "score_summary",
           "shard_committed", "shard_done", "threshold_current", "variant_committed"]

class ShardRestyler(OutputWriting):
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
        state = ShardState({t0: self._cached(t0, shard) for t0 in self.cfg.t0s()}, exclude=exclude,
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

    def _batches(self, path: str, writers: list[ShardWriter], state: ShardState) -> Iterator[list[Decoded]]:
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

    def _routing(self, pending: list[Decoded], writers: list[ShardWriter], state: ShardState) -> list[list[int]]:
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

    def _latents(self, t0: int, items: list[Decoded], x0: torch.Tensor, state: ShardState) -> tuple[torch.Tensor, bool]:
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
    def _edit_batch(self, shard: str, pending: list[Decoded], writers: list[ShardWriter], state: ShardState) -> None:
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

    def rethreshold(self, shard: str, path: str) -> RestyleResult:
        """Re-sort a committed shard's scored edits by this run's ``min_score`` without generating anything
        (:func:`~dclip_ray.stages.rethreshold.rethreshold`). Call it holding the shard's lease."""
        from .rethreshold import rethreshold

        return rethreshold(self, shard, path)


def _skip_reason(v: Variant, verdict: Verdict) -> str:
    """The skipped row's reason: which source the image did not match, how it was judged."""
    return f"routed away from {v.name}: {verdict.reason(v.sources[0])} (--route source)"

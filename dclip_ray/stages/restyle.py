"""Restyle, one input shard -> edited output shards (no Ray).

:class:`ShardRestyler` loads the base and fine-tuned models once; :meth:`ShardRestyler.run` restyles one
whole input shard: for each image the cached latent when the store has it, else ONE inversion shared by
every output variant, then one generation per variant, written by one :class:`~dclip_ray.io.shards.
ShardWriter` per variant (tar, manifest with a row for every input key, commit marker last).
:mod:`dclip_ray.pipeline.restyle` runs it in Ray Data actors; ``dclip-ray edit`` runs it in-process.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from PIL import Image

from dclip_ray.diffusion import generate, generation_pairs, invert
from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.hashing import config_sha256
from dclip_ray.io.images import output_defect, tensor_to_uint8
from dclip_ray.io.latents import LatentShard
from dclip_ray.io.leases import LeaseKeeper
from dclip_ray.io.manifest import ManifestRow
from dclip_ray.io.shards import ShardWriter, read_marker, remove_temporaries, shard_urls
from dclip_ray.io.sources import duplicate_reason, shard_fingerprint
from dclip_ray.mixing import GammaSchedule, gamma_from_spec, mixed_eps_fn
from dclip_ray.models import eps_fn_of
from dclip_ray.models.cache import cached_base, cached_unet, cached_unet_sha256
from dclip_ray.urls import redact

from .common import CountingEps, RestyleResult, lease_text
from .inputs import Decoded, batched, decode_shard, image_sha256
from .precompute import find_latent_store

SHARD_FORMAT = "dclip-ray/restyle-shard/1"
"""The ``format`` of a restyle commit marker."""


@dataclass
class Variant:
    """One output of a restyle: a combination of the base (index 0) and fine-tuned models (1..M),
    written under ``out``. ``gamma`` gives the weights over ``models`` (indices) at each step."""

    name: str
    out: str
    models: list[int]
    gamma: dict[str, Any]
    description: dict[str, Any] = field(default_factory=dict)


@dataclass
class RestyleConfig:
    """Everything a restyle worker needs (plain data: it travels to Ray actors). ``model_sha256s``: the
    sha256 of the base and each fine-tuned model, computed once by the driver (:func:`model_shas`) so
    that workers do not hash the models again (None: the worker hashes them)."""

    base: str
    finetuned: list[str]
    variants: list[Variant]
    t0: int
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

    def variant_hash(self, v: Variant, model_shas: list[str]) -> str:
        """The config hash recorded in a variant's commit markers (a different hash redoes the shard)."""
        return config_sha256({
            "models": [model_shas[i] for i in v.models], "gamma": v.gamma, "t0": self.t0,
            "n_inv_steps": self.n_inv_steps, "n_gen_steps": self.n_gen_steps, "policy": self.resize_policy,
            "format": self.image_format,
        })


def gamma_of(v: Variant) -> GammaSchedule:
    """The gamma schedule of a variant."""
    return gamma_from_spec(v.gamma)


def gen_evals_per_image(v: Variant, t0: int, n_gen_steps: int) -> int:
    """UNet evaluations per image for generating one variant (models of weight 0 are skipped)."""
    g = gamma_of(v)
    return sum(sum(1 for w in g.weights(t) if w != 0.0) for t, _ in generation_pairs(t0, n_gen_steps))


def encode_image(x: torch.Tensor, fmt: str) -> bytes:
    """Tensor [3,H,W] in [-1,1] -> PNG (lossless) or JPEG (quality 95) bytes."""
    buf = io.BytesIO()
    img = Image.fromarray(tensor_to_uint8(x))
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False)
    elif fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=95)
    else:
        raise ConfigError(f"output format {fmt!r}: expected 'png' or 'jpg'")
    return buf.getvalue()


def model_shas(cfg: RestyleConfig) -> list[str]:
    """sha256 of the base (index 0) and each fine-tuned model's weights (``cfg.model_sha256s`` when the
    driver set it; else the models are loaded, once per process, and hashed once per process)."""
    if cfg.model_sha256s is not None:
        return list(cfg.model_sha256s)
    base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint)
    return [base.sha256] + [cached_unet_sha256(f, cfg.device, cfg.trust_checkpoint) for f in cfg.finetuned]


def variant_committed(v: Variant, shard: str, config_hash: str, fingerprint: str | None = None) -> bool:
    """True when variant ``v`` has a commit marker for ``shard`` written under ``config_hash`` from the
    input content ``fingerprint`` (when given: an input rewritten since is not committed), and the tar
    it vouches for is there with the size it records (a half-uploaded or replaced tar is not committed:
    the shard is redone)."""
    urls = shard_urls(v.out, shard)
    m = read_marker(urls["marker"])
    if m is None or m.get("config_sha256") != config_hash:
        return False
    if fingerprint is not None and m.get("source_fingerprint") != fingerprint:
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


def output_meta(rec_json: bytes | None, dclip: dict[str, Any]) -> dict[str, Any]:
    """The ``.json`` member of an output sample: the input's ``.json`` object (a non-object is kept
    under ``original``; invalid JSON is noted) plus the edit's provenance under ``dclip``."""
    meta: dict[str, Any] = {}
    if rec_json is not None:
        try:
            loaded = json.loads(rec_json)
            meta = loaded if isinstance(loaded, dict) else {"original": loaded}
        except ValueError:
            meta = {"original_json_error": "the input .json was not valid JSON"}
    meta["dclip"] = dclip
    return meta


@dataclass
class _ShardState:
    """Bookkeeping of one shard being restyled: input position of every key, repeated keys, latents."""

    latents: dict[str, torch.Tensor]
    position: dict[str, int] = field(default_factory=dict)
    dups: dict[str, int] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    exclude: Mapping[str, str] = field(default_factory=dict)
    n_cached: int = 0
    n_stale: int = 0


class ShardRestyler:
    """Loads the base and fine-tuned models once; :meth:`run` restyles one whole input shard.

    For each image: the cached latent when the store has it (same model hash, t0, steps, size,
    policy) for exactly these image bytes, else ONE inversion with the base model shared by every
    variant; then one generation per variant. Per variant it writes ``{shard}.tar``, ``{shard}.parquet``
    (a row for every input key) and ``{shard}_stats.json`` last. A generated image that is not finite
    or is one flat colour is never committed: it becomes an error row.
    """

    def __init__(self, cfg: RestyleConfig):
        self.cfg = cfg
        known = cfg.model_sha256s[0] if cfg.model_sha256s else None  # the driver hashed the models once
        self.base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint, sha256=known)
        self.models = [self.base.unet] + [cached_unet(f, cfg.device, cfg.trust_checkpoint) for f in cfg.finetuned]
        self.shas = model_shas(cfg)
        self.hashes = [cfg.variant_hash(v, self.shas) for v in cfg.variants]
        self.store = (find_latent_store(cfg.latents, self.shas[0], cfg.t0, cfg.n_inv_steps, self.base.resolution,
                                        cfg.resize_policy) if cfg.latents else None)
        self.inv_eps = CountingEps(eps_fn_of(self.base.unet))
        self.model_eps = [CountingEps(eps_fn_of(m)) for m in self.models]
        self.variant_eps = [mixed_eps_fn([self.model_eps[i] for i in v.models], gamma_of(v),
                                         self.base.schedule.num_timesteps) for v in cfg.variants]

    def committed(self, shard: str, fingerprint: str | None = None) -> bool:
        """True when every variant has a commit marker for ``shard`` with this config's hash (and, when
        given, from this input content)."""
        return shard_committed(self.cfg, self.hashes, shard, fingerprint)

    def _cached(self, shard: str) -> LatentShard | None:
        if self.store is None:
            return None
        try:
            return self.store.read(shard)
        except InputFileError:  # not precomputed, or a damaged or half-written latent file: invert instead
            return None

    def _gen_evals(self) -> int:
        return sum(e.evals for e in self.model_eps)

    def new_writer(self, v: Variant, shard: str) -> ShardWriter:
        """The writer of variant ``v``'s output shard ``shard``."""
        return ShardWriter(v.out, shard)

    def run(self, shard: str, path: str, fingerprint: str | None = None, owner: str | None = None,
            exclude: Mapping[str, str] | None = None) -> RestyleResult:
        """Restyle one input shard (idempotent; skipped when committed from the same input content).
        ``owner`` (a run id) takes the shard's lease first; a shard leased by another live run is left
        to it. ``exclude`` (key -> reason): keys that become error rows unedited (e.g. keys that name
        samples of other shards too). Evaluations count images x network calls; ``n_stale``: cached
        latents not used because their image has changed."""
        fingerprint = fingerprint or shard_fingerprint(path)
        if self.committed(shard, fingerprint):
            return RestyleResult(shard, skipped=True)
        root = self.cfg.variants[0].out
        with LeaseKeeper(root, shard, owner) if owner is not None else nullcontext() as held:
            if held is not None:
                return RestyleResult(shard, leased=lease_text(held))
            for v in self.cfg.variants:
                remove_temporaries(v.out, shard)  # left by a writer that died (a full disk, a kill)
            return self._restyle(shard, path, fingerprint, exclude or {})

    def _restyle(self, shard: str, path: str, fingerprint: str, exclude: Mapping[str, str]) -> RestyleResult:
        start = time.perf_counter()
        inv0, gen0 = self.inv_eps.evals, self._gen_evals()
        cached = self._cached(shard)
        state = _ShardState(cached.as_dict() if cached is not None else {}, exclude=exclude)
        writers = [self.new_writer(v, shard) for v in self.cfg.variants]
        try:
            for pending in self._batches(path, writers, state):
                self._edit_batch(shard, pending, cached, writers, state)
            for w in writers:
                w.drop({k: duplicate_reason(k, n) for k, n in state.dups.items()})
            self._commit(path, writers, state, fingerprint)
        finally:
            for w in writers:
                w.discard()
        counts = [w.counts() for w in writers]
        return RestyleResult(shard, n=len(writers[0].rows), n_ok=min(c[0] for c in counts),
                             n_error=max(c[1] for c in counts), inv_evals=self.inv_eps.evals - inv0,
                             gen_evals=self._gen_evals() - gen0, n_cached=state.n_cached, n_stale=state.n_stale,
                             seconds=round(time.perf_counter() - start, 3), truncated=state.status.get("truncated"))

    def _batches(self, path: str, writers: list[ShardWriter], state: _ShardState) -> Iterator[list[Decoded]]:
        """Yield the decodable images of the shard in batches of ``cfg.batch_size``; bad images become
        error rows, a repeated key is counted in ``state.dups`` (none of its samples is used)."""
        stream = decode_shard(path, self.base.resolution, self.cfg.resize_policy, state.status)
        for batch in batched(iter(stream), self.cfg.batch_size):
            pending = []
            for d in batch:
                if d.rec.key in state.position:
                    state.dups[d.rec.key] = state.dups.get(d.rec.key, 1) + 1
                    continue
                state.position[d.rec.key] = len(state.position)
                error = state.exclude.get(d.rec.key, d.error)
                if error is not None:
                    for w in writers:
                        w.error(d.rec.key, error)
                else:
                    pending.append(d)
            if pending:
                yield pending

    def _edit_batch(self, shard: str, pending: list[Decoded], cached: LatentShard | None,
                    writers: list[ShardWriter], state: _ShardState) -> None:
        """Latents of ``pending`` (all cached and fresh, or inverted once), then every variant generated
        and written."""
        cfg = self.cfg
        x0 = torch.stack([d.x for d in pending]).to(cfg.device)
        known = [d for d in pending if d.rec.key in state.latents]
        fresh = [d for d in known if cached is not None and cached.is_fresh(d.rec.key, image_sha256(d.rec))]
        state.n_stale += len(known) - len(fresh)
        use_cache = len(fresh) == len(pending)
        with torch.no_grad():
            if use_cache:
                x_t0 = torch.stack([state.latents[d.rec.key] for d in pending]).to(cfg.device)
                state.n_cached += len(pending)
            else:
                x_t0 = invert(self.inv_eps, x0, cfg.t0, cfg.n_inv_steps, self.base.schedule)
            for vi, v in enumerate(cfg.variants):
                x = generate(self.variant_eps[vi], x_t0, cfg.t0, cfg.n_gen_steps, self.base.schedule)
                self._write(v, shard, pending, x, x0, writers[vi], use_cache)

    def _write(self, v: Variant, shard: str, items: list[Decoded], x: torch.Tensor, x0: torch.Tensor,
               writer: ShardWriter, cached: bool) -> None:
        """Write one variant's generated batch ``x`` [B,3,H,W] (inputs ``x0`` [B,3,H,W]); a defective
        output becomes an error row."""
        cfg = self.cfg
        ext = "png" if cfg.image_format == "png" else "jpg"
        latent = "cache" if cached else "inverted"
        for i, d in enumerate(items):
            defect = output_defect(x[i])
            if defect is not None:  # never commit NaN or a flat image (a NaN weight, a diverged model)
                writer.error(d.rec.key, defect)
                continue
            data = encode_image(x[i], cfg.image_format)
            meta = output_meta(d.rec.extras.get("json"), {
                "variant": v.name, **v.description, "t0": cfg.t0, "n_inv_steps": cfg.n_inv_steps,
                "n_gen_steps": cfg.n_gen_steps, "base_model_sha256": self.shas[0], "latent": latent,
                "source_shard": shard})
            members = {"json": json.dumps(meta, sort_keys=True, default=str).encode(), ext: data}
            if "txt" in d.rec.extras:
                members["txt"] = d.rec.extras["txt"]
            change = float((x[i].float().clamp(-1, 1) - x0[i].float()).abs().mean())
            metrics: dict[str, Any] = {"latent": latent}
            if math.isfinite(change):
                metrics["mean_abs_change"] = round(change, 6)
            writer.write(d.rec.key, members, ManifestRow(d.rec.key, shard, "ok", sha256=_sha256(data), metrics=metrics))

    def _commit(self, path: str, writers: list[ShardWriter], state: _ShardState, fingerprint: str) -> None:
        for v, h, w in zip(self.cfg.variants, self.hashes, writers, strict=True):
            w.commit({"source": redact(path), "config_sha256": h, "variant": v.name,
                      "truncated": state.status.get("truncated"), "source_fingerprint": fingerprint,
                      "format": SHARD_FORMAT}, order=state.position)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

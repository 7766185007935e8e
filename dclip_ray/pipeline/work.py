"""The units of work of the pipeline, free of Ray: one input shard -> latents, one input shard -> edited
shards. The Ray layer (:mod:`.precompute`, :mod:`.restyle`) only schedules these functions, so they are
tested directly and every write they make is idempotent (deterministic names, commit marker last).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import torch
from PIL import Image

from dclip_ray.diffusion import EpsFn, Schedule, generate, generation_pairs, invert
from dclip_ray.errors import AbortedError, ConfigError, InputFileError
from dclip_ray.hashing import config_sha256, state_dict_sha256
from dclip_ray.io.images import ImageError, clean_reason, load_image_tensor, output_defect, tensor_to_uint8
from dclip_ray.io.latents import LatentKey, LatentShard, LatentStore, key_mismatch, store_root, stored_keys
from dclip_ray.io.locations import check_outputs
from dclip_ray.io.manifest import ManifestRow, manifest_bytes
from dclip_ray.io.shards import (
    LeaseKeeper,
    TarShardWriter,
    new_owner,
    put_bytes,
    read_marker,
    remove_temporaries,
    shard_urls,
    write_marker,
)
from dclip_ray.io.sources import (
    ImageRecord,
    duplicate_reason,
    iter_folder,
    iter_tar,
    list_shards,
    shard_fingerprint,
)
from dclip_ray.jobs import BaseModel, load_base, read_card
from dclip_ray.mixing import GammaSchedule, gamma_from_spec, mix_from_data, mixed_eps_fn, validate_gamma
from dclip_ray.models import eps_fn_of, load_unet
from dclip_ray.models.trust import trust_scope
from dclip_ray.urls import redact

# ---- inputs ---------------------------------------------------------------------------------------


def absolute(path: str | None) -> str | None:
    """A local path made absolute (Ray workers may run in another working directory); URLs, preset
    names and None unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(path) if os.path.exists(path) or os.sep in path or path.startswith(".") else path


def shard_name(path: str) -> str:
    """The name of an input shard (``.../00003.tar`` -> ``00003``; a folder -> its base name)."""
    base = posixpath.basename(path.rstrip("/"))
    return base[: -len(".tar")] if base.endswith(".tar") else base


def input_shards(url: str) -> list[tuple[str, str]]:
    """``[(shard name, shard path)]`` of an input (folder, tar, brace list or glob; local or fsspec).

    Raises :class:`InputFileError` when nothing is there and :class:`ConfigError` when two shards
    share a name (their outputs would collide).
    """
    fs, paths = list_shards(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("file", "local"):
        paths = [fs.unstrip_protocol(p) for p in paths]  # full URLs: workers open them with fsspec
    out, seen = [], {}
    for p in paths:
        name = shard_name(p)
        if name in seen:
            raise ConfigError(f"input shards {seen[name]} and {p} share the name {name!r}; outputs would collide; rename one")
        seen[name] = p
        out.append((name, p))
    return out


def iter_shard(path: str) -> Iterator[ImageRecord]:
    """The records of one input shard (tar or folder); a truncated tar raises :class:`InputFileError`
    after yielding an error record for the key it broke in."""
    fs, local = fsspec.core.url_to_fs(path)
    return iter_folder(fs, local) if fs.isdir(local) else iter_tar(fs, local)


def shard_keys(path: str) -> tuple[list[str], str | None]:
    """All keys of an input shard in order, and the truncation error (None when the shard is whole)."""
    keys: list[str] = []
    try:
        for rec in iter_shard(path):
            keys.append(rec.key)
    except InputFileError as e:
        return keys, str(e)
    return keys, None


def fingerprints(shards: list[tuple[str, str]], threads: int = 8) -> dict[str, str]:
    """``{shard name: content fingerprint}`` of input shards, read in parallel threads (I/O bound)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        prints = list(pool.map(shard_fingerprint, [p for _, p in shards]))
    return {n: f for (n, _), f in zip(shards, prints, strict=True)}


def new_run_id() -> str:
    """A fresh owner naming one run for the leases it takes (:func:`dclip_ray.io.shards.new_owner`)."""
    return new_owner()


@dataclass
class Decoded:
    """A decoded input: ``x`` [3,H,W] in [-1,1] or ``error`` (the reason), plus the record."""

    rec: ImageRecord
    x: torch.Tensor | None
    error: str | None


def decode_shard(path: str, size: int, policy: str = "center-crop", status: dict[str, Any] | None = None,
                 ) -> Iterator[Decoded]:
    """Stream one shard's records decoded to model tensors ``x`` [3,size,size] in [-1,1]; every key
    comes out exactly once.

    Bad images (undecodable, truncated, zero bytes, too small, non-file members) come out with their
    reason. A truncated tar ends the stream after an error record for the key it broke in, and sets
    ``status["truncated"]`` to the reason.
    """
    try:
        for rec in iter_shard(path):
            if rec.error is not None:
                yield Decoded(rec, None, rec.error)
                continue
            try:
                yield Decoded(rec, load_image_tensor(rec.image or b"", size, policy), None)  # type: ignore[arg-type]
            except ImageError as e:
                yield Decoded(rec, None, str(e))
            except Exception as e:  # noqa: BLE001  (never let one image fail the shard)
                yield Decoded(rec, None, clean_reason(f"undecodable image: {type(e).__name__}: {e}"))
    except InputFileError as e:
        if status is not None:
            status["truncated"] = str(e)
        return


def batched(items: Iterator[Any], n: int) -> Iterator[list[Any]]:
    """Consecutive lists of at most ``n`` items."""
    batch: list[Any] = []
    for it in items:
        batch.append(it)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def hang_forever(shard: str) -> None:
    """Test hook (``RestyleConfig.hang_on``): a worker that never returns."""
    del shard
    while True:
        time.sleep(3600)


def check_steps(schedule: Schedule, t0: int, n_inv_steps: int | None = None, n_gen_steps: int | None = None,
                batch_size: int | None = None) -> None:
    """Validate the step settings against the base model's schedule before any work starts (a bad
    value fails at once with exit 1, never after every shard was computed). Raises :class:`ConfigError`
    naming the option."""
    if not 1 <= t0 < schedule.num_timesteps:
        raise ConfigError(f"--t0 {t0} must be in [1, {schedule.num_timesteps - 1}] (the base model has "
                          f"T={schedule.num_timesteps} steps); the toy world and the paper use 300-600")
    check_step_counts(t0, n_inv_steps, n_gen_steps)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")


def check_step_counts(t0: int, n_inv_steps: int | None = None, n_gen_steps: int | None = None) -> None:
    """The step counts need no model: each in [2, t0 + 1]. Raises :class:`ConfigError` naming the option."""
    if t0 < 1:
        raise ConfigError(f"--t0 {t0} must be >= 1")
    for option, n in (("--n-inv", n_inv_steps), ("--n-gen", n_gen_steps)):
        if n is not None and not 2 <= n <= t0 + 1:
            raise ConfigError(f"{option} {n} must be in [2, t0 + 1 = {t0 + 1}] (steps between 0 and t0)")


def check_out_folder(out: str, option: str = "--out") -> None:
    """Refuse an output location that exists and is not a folder (a file), naming it."""
    try:
        fs, p = fsspec.core.url_to_fs(out)
        is_file = fs.isfile(p)
    except Exception:  # noqa: BLE001  (unreachable stores fail later with their own message)
        return
    if is_file:
        raise ConfigError(f"{option} {redact(out)} is a file; give a folder (it is created when missing)")


# ---- models (loaded once per process) -------------------------------------------------------------

_BASES: dict[tuple[str, str | None], BaseModel] = {}
_UNETS: dict[str, torch.nn.Module] = {}
_SHAS: dict[str, str] = {}


def cached_base(model: str, preset: str | None = None, device: str = "cpu", trust_checkpoint: bool = False,
                ) -> BaseModel:
    """:func:`dclip_ray.jobs.load_base`, loaded once per process (Ray workers reuse it across tasks).
    ``trust_checkpoint`` lets a pickle holding more than tensors load (it can run code)."""
    key = (model, preset)
    if key not in _BASES:
        with trust_scope(trust_checkpoint):
            _BASES[key] = load_base(model, preset)
    base = _BASES[key]
    base.unet.to(device)
    return base


def cached_unet(src: str, device: str = "cpu", trust_checkpoint: bool = False) -> torch.nn.Module:
    """:func:`dclip_ray.models.load_unet` of a fine-tuned folder, loaded once per process."""
    if src not in _UNETS:
        _UNETS[src] = load_unet(src, trust_checkpoint=trust_checkpoint)
    return _UNETS[src].to(device)


class CountingEps:
    """An eps function that counts its network calls and image evaluations (calls x batch size)."""

    def __init__(self, fn: EpsFn):
        self.fn = fn
        self.calls = 0
        self.evals = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` [B,C,H,W], ``t`` int64 [B] -> eps [B,C,H,W]."""
        self.calls += 1
        self.evals += int(x_t.shape[0])
        return self.fn(x_t, t)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image between ``x``, ``y``: [B,3,H,W] in [-1,1] (peak-to-peak 2) -> [B]."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


def set_threads(num_cpus: float) -> None:
    """Match torch's intra-op threads to the CPUs a Ray worker was given (at least 1)."""
    torch.set_num_threads(max(1, int(num_cpus)))


# ---- precompute: one input shard -> latents --------------------------------------------------------


def _skipped_precompute(shard: str, marker: dict[str, Any]) -> dict[str, Any]:
    errors = marker.get("errors") or {}
    return {"shard": shard, "skipped": True, "n": marker.get("n", 0) + len(errors), "n_ok": marker.get("n", 0),
            "n_error": len(errors), "errors": errors, "unet_evals": 0, "seconds": 0.0,
            "truncated": marker.get("truncated")}


def precompute_shard(
    model: str,
    preset: str | None,
    shard: str,
    path: str,
    store_root: str,
    key: LatentKey,
    batch_size: int = 16,
    recon_psnr: bool = False,
    device: str = "cpu",
    trust_checkpoint: bool = False,
    fingerprint: str | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    """DDIM-invert every good image of one input shard with the ORIGINAL model and store the latents.

    Skips a shard already committed under ``key`` from the same input content (``fingerprint``, see
    :func:`dclip_ray.io.sources.shard_fingerprint`; computed here when None); a shard whose input was
    rewritten since is redone. A key naming several samples of the shard is an error (none of its
    samples is inverted). ``owner`` (a run id) takes the shard's lease first: a shard leased by another
    live run is left to it (``"leased"`` names the holder). Returns ``{"shard", "skipped", "n", "n_ok",
    "n_error", "errors", "unet_evals", "seconds", "truncated", "leased"}``.
    """
    store = LatentStore(store_root, key)
    fingerprint = fingerprint or shard_fingerprint(path)
    if store.is_current(shard, fingerprint):
        return _skipped_precompute(shard, store.read_marker(shard) or {})
    with LeaseKeeper(store.dir, shard, owner) if owner is not None else nullcontext() as held:
        if held is not None:
            return {**_skipped_precompute(shard, {}), "skipped": False, "leased": lease_text(held)}
        return {**_invert_shard(model, preset, shard, path, store, batch_size, recon_psnr, device,
                                trust_checkpoint, fingerprint), "leased": ""}


def lease_text(held: dict[str, Any]) -> str:
    """One line naming the run that holds a lease and until when."""
    until = time.strftime("%H:%M:%S", time.localtime(float(held.get("expires", 0))))
    return f"being written by run {held.get('owner')} on {held.get('host')} (pid {held.get('pid')}), lease until {until}"


def raise_if_leased(leased: dict[str, str]) -> None:
    """Raise :class:`AbortedError` (exit 3) when shards were left to another run that holds their lease."""
    if leased:
        shard, why = next(iter(leased.items()))
        raise AbortedError(f"{len(leased)} shard(s) left to another run writing the same output (e.g. {shard}: "
                           f"{why}); the rest is done: re-run the same command after that run ends")


def _invert_shard(model: str, preset: str | None, shard: str, path: str, store: LatentStore, batch_size: int,
                  recon_psnr: bool, device: str, trust_checkpoint: bool, fingerprint: str) -> dict[str, Any]:
    key = store.key
    start = time.perf_counter()
    base = cached_base(model, preset, device, trust_checkpoint)
    if base.sha256 != key.base_sha256:
        raise ConfigError(f"model {model} has sha256 {base.sha256[:12]}..., the latent key says {key.base_sha256[:12]}...")
    if base.resolution != key.resolution:
        raise ConfigError(f"model {model} works at {base.resolution}px, the latent key says {key.resolution}px")
    eps = CountingEps(eps_fn_of(base.unet))
    keys, lats, psnrs, errors, shas = [], [], [], {}, {}
    status: dict[str, Any] = {}
    seen: dict[str, int] = {}
    stream = decode_shard(path, key.resolution, key.resize_policy, status)
    for batch in batched(iter(stream), batch_size):
        good = []
        for d in batch:
            seen[d.rec.key] = seen.get(d.rec.key, 0) + 1
            if seen[d.rec.key] > 1:
                continue
            if d.error is not None:
                errors[d.rec.key] = d.error
            else:
                good.append(d)
        if not good:
            continue
        x0 = torch.stack([d.x for d in good]).to(device)
        with torch.no_grad():
            x_t0 = invert(eps, x0, key.t0, key.n_inv_steps, base.schedule)
            if recon_psnr:
                psnrs.append(psnr(generate(eps, x_t0, key.t0, key.n_inv_steps, base.schedule), x0).cpu())
        keys.extend(d.rec.key for d in good)
        shas.update((d.rec.key, image_sha256(d.rec)) for d in good)
        lats.append(x_t0.cpu())
    truncated = status.get("truncated")
    h = w = key.resolution
    latents = torch.cat(lats) if lats else torch.zeros(0, 3, h, w)
    recon = torch.cat(psnrs) if psnrs else None
    dups = {k: n for k, n in seen.items() if n > 1}
    if dups:  # no sample of a duplicated key is used
        keep = [i for i, k in enumerate(keys) if k not in dups]
        keys, latents = [keys[i] for i in keep], latents[keep]
        recon = recon[keep] if recon is not None else None
        psnrs = [recon] if recon is not None else []
        for k, n in dups.items():
            errors[k] = duplicate_reason(k, n)
            shas.pop(k, None)
    store.write(shard, keys, latents, recon, errors, source=redact(path), extra={"truncated": truncated},
                image_sha256=shas, source_fingerprint=fingerprint)
    return {"shard": shard, "skipped": False, "n": len(keys) + len(errors), "n_ok": len(keys),
            "n_error": len(errors), "errors": errors, "unet_evals": eps.evals,
            "seconds": round(time.perf_counter() - start, 3), "truncated": truncated,
            "mean_recon_psnr": float(torch.cat(psnrs).mean()) if psnrs else None}


def image_sha256(rec: ImageRecord) -> str:
    """sha256 of a record's image bytes (what a cached latent is keyed to)."""
    return hashlib.sha256(rec.image or b"").hexdigest()


def find_latent_store(root: str, base_sha256: str, t0: int, n_inv_steps: int, resolution: int,
                      policy: str = "center-crop") -> LatentStore | None:
    """The store under ``root`` holding latents for this key in either dtype (float32 first), or None."""
    for dtype in ("float32", "float16"):
        store = LatentStore(root, LatentKey(base_sha256, t0, n_inv_steps, resolution, policy, dtype))  # type: ignore[arg-type]
        if store.committed_shards():
            return store
    return None


# ---- fine-tuning data ---------------------------------------------------------------------------


def training_data(
    base: BaseModel,
    n_train: int,
    t0: int,
    n_inv_steps: int,
    images: str | None = None,
    latents_root: str | None = None,
    policy: str = "center-crop",
) -> tuple[list[str], torch.Tensor, torch.Tensor, str]:
    """The first ``n_train`` good images and their latents for fine-tuning at ``t0``.

    Cached latents (``latents_root``, matched by the full key) are used when present, with the
    images re-read from the shard each latent came from (or ``images``); otherwise the images of
    ``images`` are inverted here. Returns ``(keys, x0 [N,3,H,W] in [-1,1], latents [N,3,H,W], origin)``
    where origin is ``"cache"`` or ``"inverted"``.
    """
    store = find_latent_store(latents_root, base.sha256, t0, n_inv_steps, base.resolution, policy) if latents_root else None
    if store is not None:
        keys, xs, zs = [], [], []
        for shard in store.committed_shards():
            cached = store.read(shard)
            wanted = dict(zip(cached.keys, range(len(cached.keys)), strict=True))
            src = cached.source
            if images is not None:
                matches = [p for n, p in input_shards(images) if n == shard]
                src = matches[0] if matches else None
            if src is None:
                continue
            for d in decode_shard(src, base.resolution, policy):
                if d.x is not None and d.rec.key in wanted and cached.is_fresh(d.rec.key, image_sha256(d.rec)):
                    keys.append(d.rec.key)
                    xs.append(d.x)
                    zs.append(cached.latents[wanted[d.rec.key]].float())
                    if len(keys) >= n_train:
                        break
            if len(keys) >= n_train:
                break
        if keys:
            return keys, torch.stack(xs), torch.stack(zs), "cache"
    if images is None:
        raise ConfigError(
            f"no cached latents for t0={t0}, n_inv={n_inv_steps} under {latents_root}; run `dclip-ray precompute` "
            "with those settings or pass --images"
        )
    keys, xs = [], []
    for name, path in input_shards(images):
        del name
        for d in decode_shard(path, base.resolution, policy):
            if d.x is not None:
                keys.append(d.rec.key)
                xs.append(d.x)
            if len(keys) >= n_train:
                break
        if len(keys) >= n_train:
            break
    if not keys:
        raise InputFileError(f"{images}: no usable image; check the --images input")
    x0 = torch.stack(xs)
    with torch.no_grad():
        lat = invert(eps_fn_of(base.unet), x0, t0, n_inv_steps, base.schedule)
    return keys, x0, lat, "inverted"


# ---- restyle: one input shard -> edited output shards ---------------------------------------------


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
    """Everything a restyle worker needs (plain data: it travels to Ray actors)."""

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
    crash_once: str | None = None  # test hook: a flag-file path; the first shard written kills its process
    hang_on: str | None = None  # test hook: the shard whose worker never returns
    kill_mid_batch: str | None = None  # test hook: a flag-file path; the first batch generated SIGKILLs its process

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
    """sha256 of the base (index 0) and each fine-tuned model's weights (models cached per process)."""
    base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint)
    for f in cfg.finetuned:
        if f not in _SHAS:
            _SHAS[f] = state_dict_sha256(cached_unet(f, cfg.device, cfg.trust_checkpoint))
    return [base.sha256] + [_SHAS[f] for f in cfg.finetuned]


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


def _skipped_restyle(shard: str, **kw: Any) -> dict[str, Any]:
    return {"shard": shard, "skipped": True, "n": 0, "n_ok": 0, "n_error": 0, "inv_evals": 0, "gen_evals": 0,
            "n_cached": 0, "n_stale": 0, "seconds": 0.0, "truncated": None, "leased": "", **kw}


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
        self.base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint)
        self.models = [self.base.unet] + [cached_unet(f, cfg.device, cfg.trust_checkpoint) for f in cfg.finetuned]
        self.shas = model_shas(cfg)
        self.hashes = [cfg.variant_hash(v, self.shas) for v in cfg.variants]
        self.store = (find_latent_store(cfg.latents, self.base.sha256, cfg.t0, cfg.n_inv_steps, self.base.resolution,
                                        cfg.resize_policy) if cfg.latents else None)
        self.inv_eps = CountingEps(eps_fn_of(self.base.unet))
        self.model_eps = [CountingEps(eps_fn_of(m)) for m in self.models]
        self.variant_eps = [mixed_eps_fn([self.model_eps[i] for i in v.models], gamma_of(v),
                                         self.base.schedule.num_timesteps) for v in cfg.variants]

    def committed(self, shard: str, fingerprint: str | None = None) -> bool:
        """True when every variant has a commit marker for ``shard`` with this config's hash (and, when
        given, from this input content)."""
        return all(variant_committed(v, shard, h, fingerprint)
                   for v, h in zip(self.cfg.variants, self.hashes, strict=True))

    def _cached(self, shard: str) -> LatentShard | None:
        if self.store is None or not self.store.is_committed(shard):
            return None
        try:
            return self.store.read(shard)
        except InputFileError:  # a damaged or half-written latent file: invert instead
            return None

    def _gen_evals(self) -> int:
        return sum(e.evals for e in self.model_eps)

    def run(self, shard: str, path: str, fingerprint: str | None = None, owner: str | None = None) -> dict[str, Any]:
        """Restyle one input shard (idempotent; skipped when committed from the same input content).
        ``owner`` (a run id) takes the shard's lease first; a shard leased by another live run is left
        to it. Returns ``{"shard", "skipped", "n", "n_ok", "n_error", "inv_evals", "gen_evals",
        "n_cached", "n_stale", "seconds", "truncated", "leased"}`` (evaluations count images x network
        calls; ``n_stale``: cached latents not used because their image has changed)."""
        fingerprint = fingerprint or shard_fingerprint(path)
        if self.committed(shard, fingerprint):
            return _skipped_restyle(shard)
        root = self.cfg.variants[0].out
        with LeaseKeeper(root, shard, owner) if owner is not None else nullcontext() as held:
            if held is not None:
                return _skipped_restyle(shard, skipped=False, leased=lease_text(held))
            for v in self.cfg.variants:
                remove_temporaries(v.out, shard)  # left by a writer that died (a full disk, a kill)
            return self._restyle(shard, path, fingerprint)

    def _restyle(self, shard: str, path: str, fingerprint: str) -> dict[str, Any]:
        if self.cfg.hang_on == shard:
            hang_forever(shard)
        start = time.perf_counter()
        cfg = self.cfg
        inv0, gen0 = self.inv_eps.evals, self._gen_evals()
        cached = self._cached(shard)
        latents = cached.as_dict() if cached is not None else {}
        writers = [TarShardWriter() for _ in cfg.variants]
        rows: list[list[ManifestRow]] = [[] for _ in cfg.variants]
        status: dict[str, Any] = {}
        n_cached = n_stale = 0
        position: dict[str, int] = {}
        dups: dict[str, int] = {}
        try:
            stream = decode_shard(path, self.base.resolution, cfg.resize_policy, status)
            for batch in batched(iter(stream), cfg.batch_size):
                pending = []
                for d in batch:
                    if d.rec.key in position:  # a repeated key: resolved below, none of its samples is used
                        dups[d.rec.key] = dups.get(d.rec.key, 1) + 1
                        continue
                    position[d.rec.key] = len(position)
                    if d.error is not None:
                        for r in rows:
                            r.append(ManifestRow(d.rec.key, shard, "error", error=d.error))
                    else:
                        pending.append(d)
                if not pending:
                    continue
                x0 = torch.stack([d.x for d in pending]).to(cfg.device)
                known = [d for d in pending if d.rec.key in latents]
                fresh = [d for d in known if cached is not None and cached.is_fresh(d.rec.key, image_sha256(d.rec))]
                n_stale += len(known) - len(fresh)
                use_cache = len(fresh) == len(pending)
                with torch.no_grad():
                    if use_cache:
                        x_t0 = torch.stack([latents[d.rec.key] for d in pending]).to(cfg.device)
                        n_cached += len(pending)
                    else:
                        x_t0 = invert(self.inv_eps, x0, cfg.t0, cfg.n_inv_steps, self.base.schedule)
                    for vi, v in enumerate(cfg.variants):
                        x = generate(self.variant_eps[vi], x_t0, cfg.t0, cfg.n_gen_steps, self.base.schedule)
                        self._write(v, shard, pending, x, x0, writers[vi], rows[vi], use_cache)
                        if cfg.kill_mid_batch and not os.path.exists(cfg.kill_mid_batch):
                            open(cfg.kill_mid_batch, "w").close()
                            os.kill(os.getpid(), signal.SIGKILL)  # the actor dies mid-shard, mid-batch
            if dups:
                for vi, w in enumerate(writers):
                    w.drop(set(dups))
                    rows[vi] = [r for r in rows[vi] if r.key not in dups]
                    rows[vi] += [ManifestRow(k, shard, "error", error=duplicate_reason(k, n)) for k, n in dups.items()]
            for r in rows:
                r.sort(key=lambda row: position[row.key])  # manifest rows in input order
            self._commit(shard, path, writers, rows, status.get("truncated"), fingerprint)
        finally:
            for w in writers:
                w.discard()
        n_ok = min(sum(1 for r in v_rows if r.status == "ok") for v_rows in rows)
        n_err = max(sum(1 for r in v_rows if r.status != "ok") for v_rows in rows)
        return {"shard": shard, "skipped": False, "n": len(rows[0]), "n_ok": n_ok, "n_error": n_err,
                "inv_evals": self.inv_eps.evals - inv0, "gen_evals": self._gen_evals() - gen0, "n_cached": n_cached,
                "n_stale": n_stale, "seconds": round(time.perf_counter() - start, 3),
                "truncated": status.get("truncated"), "leased": ""}

    def _write(self, v: Variant, shard: str, items: list[Decoded], x: torch.Tensor, x0: torch.Tensor,
               writer: TarShardWriter, rows: list[ManifestRow], cached: bool) -> None:
        cfg = self.cfg
        ext = "png" if cfg.image_format == "png" else "jpg"
        for i, d in enumerate(items):
            defect = output_defect(x[i])
            if defect is not None:  # never commit NaN or a flat image (a NaN weight, a diverged model)
                rows.append(ManifestRow(d.rec.key, shard, "error", error=defect))
                continue
            data = encode_image(x[i], cfg.image_format)
            meta: dict[str, Any] = {}
            if "json" in d.rec.extras:
                try:
                    loaded = json.loads(d.rec.extras["json"])
                    meta = loaded if isinstance(loaded, dict) else {"original": loaded}
                except ValueError:
                    meta = {"original_json_error": "the input .json was not valid JSON"}
            latent = "cache" if cached else "inverted"
            meta["dclip"] = {"variant": v.name, **v.description, "t0": cfg.t0, "n_inv_steps": cfg.n_inv_steps,
                             "n_gen_steps": cfg.n_gen_steps, "base_model_sha256": self.shas[0],
                             "latent": latent, "source_shard": shard}
            members = {"json": json.dumps(meta, sort_keys=True, default=str).encode(), ext: data}
            if "txt" in d.rec.extras:
                members["txt"] = d.rec.extras["txt"]
            writer.write(d.rec.key, members)
            change = float((x[i].float().clamp(-1, 1) - x0[i].float()).abs().mean())
            metrics: dict[str, Any] = {"latent": latent}
            if math.isfinite(change):
                metrics["mean_abs_change"] = round(change, 6)
            rows.append(ManifestRow(d.rec.key, shard, "ok", sha256=hashlib.sha256(data).hexdigest(), metrics=metrics))

    def _commit(self, shard: str, path: str, writers: list[TarShardWriter], rows: list[list[ManifestRow]],
                truncated: str | None, fingerprint: str) -> None:
        for v, h, w, r in zip(self.cfg.variants, self.hashes, writers, rows, strict=True):
            n_ok = sum(1 for row in r if row.status == "ok")
            n_err = len(r) - n_ok
            urls = shard_urls(v.out, shard)
            w.upload(urls["tar"])
            with open(w.local_path, "rb") as f:
                tar_data = f.read()
            tar_sha = hashlib.sha256(tar_data).hexdigest()
            put_bytes(manifest_bytes(r), urls["manifest"])
            if self.cfg.crash_once and not os.path.exists(self.cfg.crash_once):
                open(self.cfg.crash_once, "w").close()
                os._exit(1)  # a worker dying between the data and its commit marker
            write_marker(urls["marker"], {  # last: the commit
                "shard": shard, "source": redact(path), "n": n_ok + n_err, "n_ok": n_ok, "n_error": n_err,
                "config_sha256": h, "tar_sha256": tar_sha, "tar_bytes": len(tar_data), "variant": v.name, "truncated": truncated,
                "source_fingerprint": fingerprint, "format": "dclip-ray/restyle-shard/1",
            })


# ---- building restyle configs ------------------------------------------------------------------------


def _card_t0(finetuned: str) -> int | None:
    card = read_card(finetuned) if "://" not in finetuned else {}
    t0 = (card.get("config") or {}).get("t0")
    return int(t0) if t0 else None


def _card_base(finetuned: str) -> str | None:
    card = read_card(finetuned) if "://" not in finetuned else {}
    return card.get("base_model")


def variant_name(path: str) -> str:
    """Output sub-folder name of a fine-tuned model folder (its base name)."""
    from dclip_ray.prompts import safe_name

    return safe_name(posixpath.basename(path.rstrip("/")), fallback="model")


def build_restyle_config(
    out: str,
    models: list[str] | None = None,
    base: str | None = None,
    strength: float = 1.0,
    mix: dict[str, Any] | None = None,
    preset: str | None = None,
    t0: int | None = None,
    **kw: Any,
) -> RestyleConfig:
    """Turn the restyle options into a :class:`RestyleConfig`.

    ``models``: fine-tuned folders. One model: output at ``out``; several: one output per model under
    ``out/{name}`` sharing one inversion per image. ``mix``: ``{"models": [...], "gamma": spec}`` (one
    output at ``out``, eq. 14). ``strength`` r mixes each fine-tuned model with the base:
    ``(1 - r) * eps_base + r * eps_ft``. ``base`` defaults to the ``base_model`` in the cards.
    """
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"--strength {strength} must be in [0, 1] (1 = the fine-tuned model alone)")
    variants: list[Variant] = []
    if mix is not None:
        if models:
            raise ConfigError("give either --model or --mix, not both (the mix file lists its models)")
        spec = mix_from_data(mix, "mix")  # one weight per model, summing to 1 at every step
        finetuned = list(spec.models)
        variants.append(Variant("mix", out.rstrip("/"), list(range(1, len(finetuned) + 1)), dict(spec.gamma),
                                {"mix": spec.as_dict()}))
    else:
        if not models:
            raise ConfigError("restyle needs --model FT_DIR (repeatable) or --mix MIX.yaml")
        finetuned = list(models)
        names = [variant_name(m) for m in finetuned]
        if len(set(names)) != len(names):
            raise ConfigError(f"fine-tuned model folders must have distinct names, got {names}")
        for i, (m, name) in enumerate(zip(finetuned, names, strict=True), start=1):
            target = out.rstrip("/") if len(finetuned) == 1 else f"{out.rstrip('/')}/{name}"
            gamma = {"type": "constant", "weights": [1.0 - strength, strength]}
            variants.append(Variant(name, target, [0, i], gamma, {"model": m, "strength": strength}))
    base = base or _card_base(finetuned[0])
    if not base:
        raise ConfigError(f"{finetuned[0]} does not name its base model: pass --base MODEL (the original UNet)")
    t0s = {t for t in (_card_t0(m) for m in finetuned) if t}
    if t0 is None:
        if len(t0s) > 1:
            raise ConfigError(f"the fine-tuned models were trained at different t0 {sorted(t0s)}; pass --t0")
        t0 = t0s.pop() if t0s else 500
    check_step_counts(int(t0), int(kw.get("n_inv_steps", 40)), int(kw.get("n_gen_steps", 40)))
    steps = [t for t, _ in generation_pairs(int(t0), int(kw.get("n_gen_steps", 40)))]
    for v in variants:
        validate_gamma(gamma_of(v), len(v.models), steps)  # before any model loads or Ray starts
    if kw.get("latents"):
        kw["latents"] = absolute(kw["latents"])
    for v in variants:
        v.out = absolute(v.out) or v.out
    return RestyleConfig(base=absolute(base) or base, finetuned=[absolute(f) or f for f in finetuned],
                         variants=variants, t0=int(t0), preset=preset, root=absolute(out.rstrip("/")) or out, **kw)


DECLARATION = "restyle.json"


def write_declaration(cfg: RestyleConfig, input_url: str) -> None:
    """Write ``ROOT/restyle.json``: the variants this restyle writes (name, folder relative to ROOT) and
    its input, so that ``verify`` checks every declared variant (a deleted variant folder is a problem)."""
    root = (cfg.root or cfg.variants[0].out).rstrip("/")
    variants = [{"name": v.name, "folder": posixpath.relpath(v.out, root) if "://" not in v.out
                 else v.out[len(root):].strip("/") or "."} for v in cfg.variants]
    data = json.dumps({"format": "dclip-ray/restyle-run/1", "input": redact(input_url), "variants": variants},
                      indent=1, sort_keys=True).encode()
    url = f"{root}/{DECLARATION}"
    try:
        with fsspec.open(url, "rb") as f:
            if f.read() == data:
                return  # unchanged: a re-run touches nothing
    except (FileNotFoundError, OSError):
        pass
    put_bytes(data, url)


def check_restyle(cfg: RestyleConfig, input_url: str) -> None:
    """Validate a restyle before any work (the run, ``--dry-run`` and ``run --check`` call it): every
    output is a folder outside the input, the latent store and the models; the step settings fit the
    base model. Resolves ``cfg.latents`` when it names one key's digest folder. Raises
    :class:`ConfigError` (exit 1)."""
    inputs: dict[str, str | None] = {"--input": input_url, "--latents": cfg.latents, "--base": cfg.base}
    inputs.update({f"--model {f}": f for f in cfg.finetuned})
    for v in cfg.variants:
        check_out_folder(v.out)
    check_outputs({f"--out ({v.name})" if len(cfg.variants) > 1 else "--out": v.out for v in cfg.variants}, inputs)
    base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint)
    check_steps(base.schedule, cfg.t0, cfg.n_inv_steps, cfg.n_gen_steps, cfg.batch_size)
    if cfg.latents:
        cfg.latents = store_root(cfg.latents)


def latent_coverage(cfg: RestyleConfig, shards: list[tuple[str, str]], prints: dict[str, str],
                    require: bool = False) -> list[str]:
    """What ``--latents`` gives this restyle: warnings (one line each) when it gives nothing or not
    every shard, naming the key field that differs. With ``require`` (``--require-latents``) a shard
    without current latents is a :class:`ConfigError` instead (exit 1, nothing started)."""
    if not cfg.latents:
        if require:
            raise ConfigError("--require-latents needs --latents STORE (the root that `dclip-ray precompute --out` wrote)")
        return []
    base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint)
    key = LatentKey(base.sha256, cfg.t0, cfg.n_inv_steps, base.resolution, cfg.resize_policy)  # type: ignore[arg-type]
    store = find_latent_store(cfg.latents, base.sha256, cfg.t0, cfg.n_inv_steps, base.resolution, cfg.resize_policy)
    if store is None:
        stored = stored_keys(cfg.latents)
        if stored:
            diffs = "; ".join(", ".join(key_mismatch(key, k)) or "dtype only" for k in stored[:3])
            why = f"it holds latents of another key: {diffs}"
        else:
            why = "it holds no committed latents (run `dclip-ray precompute` with this run's settings)"
        msg = f"--latents {redact(cfg.latents)}: no cached latent matches this run, every image is inverted; {why}"
        if require:
            raise ConfigError(msg + "; match --t0/--n-inv/--resize-policy to the store, or drop --require-latents")
        return [msg]
    missing = [n for n, _ in shards if not (store.is_committed(n)
                                            and (store.read_marker(n) or {}).get("source_fingerprint") == prints[n])]
    if not missing:
        return []
    msg = (f"--latents {redact(cfg.latents)}: {len(missing)} of {len(shards)} input shard(s) have no current latents "
           f"(not precomputed, or the input changed since), e.g. {missing[:3]}; they are inverted here")
    if require:
        raise ConfigError(msg.replace("; they are inverted here", "; run `dclip-ray precompute` on this input first"))
    return [msg]


def restyle_plan(cfg: RestyleConfig, shards: list[tuple[str, str]], prints: dict[str, str] | None = None,
                 ) -> dict[str, Any]:
    """What a restyle would run (``--dry-run``): per shard the keys, whether it is committed, how many
    latents are cached; totals of images and UNet evaluations (images x network calls, inversion +
    generation). Loads the models (to hash them) but runs none."""
    shas = model_shas(cfg)
    hashes = [cfg.variant_hash(v, shas) for v in cfg.variants]
    base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint)
    store = (find_latent_store(cfg.latents, shas[0], cfg.t0, cfg.n_inv_steps, base.resolution, cfg.resize_policy)
             if cfg.latents else None)
    per_gen = sum(gen_evals_per_image(v, cfg.t0, cfg.n_gen_steps) for v in cfg.variants)
    rows, total_imgs, total_evals = [], 0, 0
    for name, path in shards:
        keys, truncated = shard_keys(path)
        fp = (prints or {}).get(name)
        done = all(variant_committed(v, name, h, fp) for v, h in zip(cfg.variants, hashes, strict=True))
        marker = store.read_marker(name) if store is not None and store.is_committed(name) else None
        if marker is not None and fp is not None and marker.get("source_fingerprint") != fp:
            marker = None  # latents of an older version of this input: not used
        n_cached = len(set(keys) & set((marker or {}).get("keys") or []))
        evals = 0 if done else (len(keys) - n_cached) * (cfg.n_inv_steps - 1) + len(keys) * per_gen
        rows.append({"shard": name, "path": redact(path), "images": len(keys), "cached_latents": n_cached,
                     "committed": done, "unet_evals": evals, "truncated": truncated})
        if not done:
            total_imgs += len(keys)
            total_evals += evals
    return {"shards": rows, "images": total_imgs, "unet_evals": total_evals,
            "variants": [asdict(v) for v in cfg.variants], "t0": cfg.t0, "n_inv_steps": cfg.n_inv_steps,
            "n_gen_steps": cfg.n_gen_steps}

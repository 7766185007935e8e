"""The latent store: cached DDIM inversions ``x_t0`` of input shards, one object per input shard.

Layout under a store root (local path or fsspec URL)::

    ROOT/{key.digest}/{shard}.safetensors   tensors "latents" [N,3,H,W] (float32 or float16, as the
                                            key's dtype says) and optionally "recon_psnr" [N] float32;
                                            metadata: the key fields and the N image keys (JSON)
    ROOT/{key.digest}/{shard}_stats.json    the commit marker, written LAST: the full key fields, the
                                            image keys, the per-key errors, the sha256 of the tensor file

``key.digest`` is a hash of everything that determines a latent: the base model's sha256, t0,
n_inv_steps, the resolution, the resize policy and the stored dtype. A changed key lands in another
folder, and the reader also compares the full key stored in the marker and in the tensor file, so a
latent computed under another key is never returned (``StaleLatentError``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.hashing import config_sha256
from dclip_ray.io.sources import same_source
from dclip_ray.urls import redact

LatentDType = Literal["float32", "float16"]
STORE_FORMAT = "dclip-ray/latents/1"


class StaleLatentError(InputFileError):
    """A stored latent whose key (model, t0, steps, size, policy, dtype) differs from the one asked for."""


@dataclass(frozen=True)
class LatentKey:
    """Everything that determines a cached latent; ``digest`` names its folder in the store."""

    base_sha256: str
    t0: int
    n_inv_steps: int
    resolution: int
    resize_policy: str = "center-crop"
    dtype: LatentDType = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"latent dtype {self.dtype!r}: expected 'float32' or 'float16'")

    def fields(self) -> dict[str, Any]:
        """The key as a JSON-serialisable dict (stored in every marker and tensor file)."""
        return {"format": STORE_FORMAT, **asdict(self)}

    @property
    def digest(self) -> str:
        """A 16-hex-digit hash of :meth:`fields` (the store folder name)."""
        return config_sha256(self.fields())[:16]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype latents are stored in."""
        return torch.float16 if self.dtype == "float16" else torch.float32


@dataclass
class LatentShard:
    """The cached latents of one input shard: ``latents[i]`` ([3,H,W], stored dtype) is the inversion
    of image ``keys[i]``; ``recon_psnr`` [N] (dB) when it was measured; ``errors`` maps the keys that
    could not be inverted to their reason; ``source`` is the input shard path."""

    keys: list[str]
    latents: torch.Tensor
    recon_psnr: torch.Tensor | None = None
    errors: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    image_sha256: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{image key: latent [3,H,W] float32}``."""
        return {k: self.latents[i].float() for i, k in enumerate(self.keys)}

    def is_fresh(self, key: str, image_sha256: str) -> bool:
        """True when the latent of ``key`` was inverted from exactly these image bytes (their sha256);
        False for a key whose image has changed since, or a store written before images were hashed."""
        return self.image_sha256.get(key) == image_sha256


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


class LatentStore:
    """Read and write the latents of one :class:`LatentKey` under ``root`` (local path or fsspec URL)."""

    def __init__(self, root: str, key: LatentKey):
        self.root = root
        self.key = key
        self.dir = _join(root, key.digest)
        self.fs, self._dir_path = fsspec.core.url_to_fs(self.dir)

    def _path(self, name: str) -> str:
        return _join(self._dir_path, name)

    def tensor_path(self, shard: str) -> str:
        """Filesystem path of the tensor file of ``shard``."""
        return self._path(f"{shard}.safetensors")

    def marker_path(self, shard: str) -> str:
        """Filesystem path of the commit marker of ``shard``."""
        return self._path(f"{shard}_stats.json")

    def read_marker(self, shard: str) -> dict[str, Any] | None:
        """The commit marker of ``shard`` (None when absent or unreadable: not committed)."""
        try:
            with self.fs.open(self.marker_path(shard), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None

    def is_committed(self, shard: str) -> bool:
        """True when ``shard`` has a marker holding exactly this store's key."""
        marker = self.read_marker(shard)
        return marker is not None and marker.get("key") == self.key.fields()

    def is_current(self, shard: str, fingerprint: str) -> bool:
        """True when ``shard`` is committed under this key from input content ``fingerprint`` (an input
        rewritten since, even under the same keys, is not current: precompute redoes it); a stat print
        (:data:`~dclip_ray.io.sources.STAT_PREFIX`) is compared with the size and time it was made from."""
        return self.current_marker(self.read_marker(shard), fingerprint)

    def current_marker(self, marker: dict[str, Any] | None, fingerprint: str) -> bool:
        """:meth:`is_current` of a marker already read (None: not committed)."""
        return marker is not None and marker.get("key") == self.key.fields() and same_source(marker, fingerprint)

    def committed_shards(self) -> list[str]:
        """Names of the shards committed under this key, sorted."""
        try:
            names = self.fs.ls(self._dir_path, detail=False)
        except FileNotFoundError:
            return []
        shards = sorted(posixpath.basename(n)[: -len("_stats.json")] for n in names if n.endswith("_stats.json"))
        return [s for s in shards if self.is_committed(s)]

    def write(
        self,
        shard: str,
        keys: list[str],
        latents: torch.Tensor,
        recon_psnr: torch.Tensor | None = None,
        errors: dict[str, str] | None = None,
        source: str | None = None,
        extra: dict[str, Any] | None = None,
        image_sha256: dict[str, str] | None = None,
        source_fingerprint: str | None = None,
    ) -> dict[str, Any]:
        """Store the latents of one shard; the commit marker is written last. Idempotent.

        ``latents``: [N,3,H,W] (any float dtype; stored as the key's dtype), ``keys``: N image keys,
        ``recon_psnr``: [N] in dB or None, ``errors``: ``{key: reason}`` of images not inverted,
        ``image_sha256``: ``{key: sha256 of the image bytes inverted}`` (a reader uses a latent only for
        the same bytes), ``source_fingerprint``: the input shard's content fingerprint
        (:func:`dclip_ray.io.sources.shard_fingerprint`; a changed input is redone). Returns the marker.
        """
        if latents.ndim != 4 or latents.shape[0] != len(keys):
            raise ConfigError(f"latents {tuple(latents.shape)} must be [N,3,H,W] with N = {len(keys)} keys")
        if len(set(keys)) != len(keys):
            raise ConfigError(f"shard {shard}: duplicate image keys; keys must be unique within a dataset")
        tensors = {"latents": latents.detach().cpu().to(self.key.torch_dtype).contiguous()}
        if recon_psnr is not None:
            tensors["recon_psnr"] = recon_psnr.detach().cpu().float().contiguous()
        meta = {"key": json.dumps(self.key.fields(), sort_keys=True), "keys": json.dumps(keys)}
        data = st_save(tensors, metadata=meta)
        self.fs.makedirs(self._dir_path, exist_ok=True)
        with self.fs.open(self.tensor_path(shard), "wb") as f:
            f.write(data)
        marker = {
            "key": self.key.fields(),
            "shard": shard,
            "source": source,
            "n": len(keys),
            "keys": keys,
            "errors": dict(errors or {}),
            "dtype": self.key.dtype,
            "tensor_sha256": hashlib.sha256(data).hexdigest(),
            "image_sha256": dict(image_sha256 or {}),
            "source_fingerprint": source_fingerprint,
            **(extra or {}),
        }
        with self.fs.open(self.marker_path(shard), "wb") as f:  # last: the commit
            f.write(json.dumps(marker, indent=1, sort_keys=True).encode())
        return marker

    def read(self, shard: str) -> LatentShard:
        """The latents of a committed shard. Raises :class:`StaleLatentError` when the stored key differs
        from this store's key, :class:`InputFileError` when the shard is missing, uncommitted or damaged."""
        marker = self.read_marker(shard)
        if marker is None:
            raise InputFileError(f"{redact(self.dir)}: no committed latents for shard {shard}; run `dclip-ray precompute` first")
        if marker.get("key") != self.key.fields():
            raise StaleLatentError(
                f"{redact(self.dir)}/{shard}: latents were computed for {marker.get('key')}, not {self.key.fields()}; re-run precompute"
            )
        try:
            with self.fs.open(self.tensor_path(shard), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise InputFileError(f"{redact(self.dir)}/{shard}.safetensors is missing; re-run precompute") from None
        if hashlib.sha256(data).hexdigest() != marker.get("tensor_sha256"):
            raise InputFileError(f"{redact(self.dir)}/{shard}.safetensors does not match its marker's sha256; re-run precompute")
        meta = _metadata(data)
        if json.loads(meta.get("key", "null")) != self.key.fields():
            raise StaleLatentError(f"{redact(self.dir)}/{shard}.safetensors holds latents of another key; re-run precompute")
        tensors = st_load(data)
        keys = json.loads(meta["keys"])
        return LatentShard(keys=keys, latents=tensors["latents"], recon_psnr=tensors.get("recon_psnr"),
                           errors=dict(marker.get("errors") or {}), source=marker.get("source"),
                           image_sha256=dict(marker.get("image_sha256") or {}))


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, JSON header)."""
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        raise InputFileError("latent file: unreadable safetensors header; re-run precompute") from None
    return dict(header.get("__metadata__") or {})


def store_root(root: str) -> str:
    """The store root for ``root``: ``root`` itself, or its parent when ``root`` is one key's digest
    folder (``ROOT/{digest}``, the path precompute prints), so either can be passed as ``--latents``."""
    fs, path = fsspec.core.url_to_fs(root)
    try:
        names = [n for n in fs.ls(path, detail=False) if n.endswith("_stats.json")]
    except (FileNotFoundError, NotADirectoryError):
        return root
    for n in names[:1]:
        try:
            with fs.open(n, "rb") as f:
                marker = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if isinstance(marker, dict) and isinstance(marker.get("key"), dict):
            return root.rstrip("/").rsplit("/", 1)[0] if "/" in root.rstrip("/") else "."
    return root


def stored_keys(root: str) -> list[dict[str, Any]]:
    """The key fields of every store under ``root`` that has at least one commit marker (for telling a
    user why nothing matched)."""
    fs, path = fsspec.core.url_to_fs(root)
    try:
        folders = [e["name"] for e in fs.ls(path, detail=True) if e["type"] == "directory"]
    except (FileNotFoundError, NotADirectoryError):
        return []
    keys = []
    for folder in sorted(folders):
        for n in sorted(fs.ls(folder, detail=False)):
            if not n.endswith("_stats.json"):
                continue
            try:
                with fs.open(n, "rb") as f:
                    key = json.loads(f.read()).get("key")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(key, dict):
                keys.append(key)
                break
    return keys


def key_mismatch(wanted: LatentKey, stored: dict[str, Any]) -> list[str]:
    """The fields in which a stored key differs from ``wanted`` (dtype aside: either is readable),
    as ``"n_inv_steps 20 (this run: 40)"``."""
    out = []
    for name, value in asdict(wanted).items():
        if name != "dtype" and stored.get(name) != value:
            shown = f"{stored.get(name)!s:.12}" if name == "base_sha256" else stored.get(name)
            mine = f"{value!s:.12}" if name == "base_sha256" else value
            out.append(f"{name} {shown} (this run: {mine})")
    return out


def find_latent_store(root: str, base_sha256: str, t0: int, n_inv_steps: int, resolution: int,
                      policy: str = "center-crop") -> LatentStore | None:
    """The store under ``root`` holding latents for this key in either dtype (float32 first), or None."""
    for dtype in ("float32", "float16"):
        store = LatentStore(root, LatentKey(base_sha256, t0, n_inv_steps, resolution, policy, dtype))  # type: ignore[arg-type]
        if store.committed_shards():
            return store
    return None

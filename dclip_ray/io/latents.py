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

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{image key: latent [3,H,W] float32}``."""
        return {k: self.latents[i].float() for i, k in enumerate(self.keys)}


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
    ) -> dict[str, Any]:
        """Store the latents of one shard; the commit marker is written last. Idempotent.

        ``latents``: [N,3,H,W] (any float dtype; stored as the key's dtype), ``keys``: N image keys,
        ``recon_psnr``: [N] in dB or None, ``errors``: ``{key: reason}`` of images not inverted.
        Returns the marker written.
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
                           errors=dict(marker.get("errors") or {}), source=marker.get("source"))


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, JSON header)."""
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        raise InputFileError("latent file: unreadable safetensors header; re-run precompute") from None
    return dict(header.get("__metadata__") or {})

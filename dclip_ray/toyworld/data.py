"""Write toy-world datasets as WebDataset shards, in the same layout as any other input.

Each shard ``{out}/{i:05d}.tar`` holds, per example with key ``"{seed}_{index:06d}"`` (no dots):

- ``{key}.png``: the RGB image (uint8, 32x32);
- ``{key}.txt``: the caption, e.g. ``a red circle``;
- ``{key}.json``: ``{"colour", "shape", "caption", "seed", "index", "cx", "cy", "r"}``;
- ``{key}.mask.png``: the shape's mask as an 8-bit greyscale PNG (255 = shape). WebDataset splits
  the extension at the first dot of the file name, and keys have none, so this sample field is
  called ``mask.png``.

Tars are written with fixed metadata (mtime 0), so the same ``(n, seed, shard_size)`` gives
byte-identical shards. ``out`` may be a local folder or any fsspec URL (``s3://...``, ``memory://...``).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from dclip_ray.errors import ConfigError

from .render import sample_dataset


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _styled(s: Any, style: str) -> Any:
    """Sample ``s`` re-rendered in ``style`` (see :func:`write_shards`)."""
    from dataclasses import replace

    from .unseen import paint_strokes, photo

    index = int(s.key.split("_")[1])
    if style == "photo":
        image, mask = photo(s.colour, s.shape, seed=1000 * s.seed + index)
        return replace(s, image=image, mask=mask, caption=f"a {s.colour} {s.shape} on a checkerboard")
    if style == "strokes":
        image = paint_strokes(s.colour, seed=1000 * s.seed + index)
        return replace(s, image=image, mask=np.zeros(image.shape[:2], bool), caption=f"a rough {s.colour} painting")
    return s


def write_shards(out: str, n: int, seed: int = 0, shard_size: int = 1000, colours: list[str] | None = None,
                 shapes: list[str] | None = None, kinds: list[tuple[str, str]] | None = None,
                 captions: bool = True, style: str = "clean", overwrite: bool = False) -> list[str]:
    """Render ``n`` examples from ``seed`` and write them as WebDataset shards under ``out``.

    ``colours`` / ``shapes``: restrict the classes (default: all four colours and three shapes);
    ``kinds``: exactly these (colour, shape) classes, interleaved across the shards. ``captions``
    False: no ``.txt`` and no ``caption`` in the ``.json`` (an uncaptioned dataset). ``style``: ``clean``
    (the trained domain), ``photo`` (the shapes on an unseen checkerboard background) or ``strokes``
    (rough colour-block paintings of each colour; no shape): the inputs of ``translate`` and
    ``from-strokes`` (:mod:`dclip_ray.toyworld.unseen`).

    ``out`` must be empty or absent: a dataset is never written over another one (whose edits would then
    be paired with the wrong inputs); ``overwrite`` removes the ``.tar`` shards already there first (other
    files are left alone).

    Returns the shard URLs in order. Raises :class:`ConfigError` for ``n < 1``, ``shard_size < 1`` or a
    non-empty ``out`` without ``overwrite``.
    """
    import webdataset as wds

    if n < 1:
        raise ConfigError(f"make-data: --n must be >= 1, got {n}")
    if shard_size < 1:
        raise ConfigError(f"make-data: --shard-size must be >= 1, got {shard_size}")
    if style not in ("clean", "photo", "strokes"):
        raise ConfigError(f"make-data: --style {style!r}: expected clean, photo or strokes")
    fs, root = fsspec.core.url_to_fs(out)
    _clear(fs, root, out, overwrite)
    samples = [_styled(s, style) for s in sample_dataset(n, seed, colours=colours, shapes=shapes, kinds=kinds)]
    fs.makedirs(root, exist_ok=True)
    urls = []
    for shard, start in enumerate(range(0, n, shard_size)):
        name = f"{shard:05d}.tar"
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, name)
            with open(local, "wb") as f:
                writer = wds.TarWriter(f, encoder=False, mtime=0)
                for s in samples[start : start + shard_size]:
                    writer.write(_sample(s, captions))
                writer.close()
            fs.put_file(local, f"{root.rstrip('/')}/{name}")
        urls.append(out.rstrip("/") + "/" + name)
    return urls


def _clear(fs: Any, root: str, out: str, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` (:class:`ConfigError`) unless ``overwrite``, which removes its ``.tar`` shards."""
    present = fs.ls(root, detail=False) if fs.isdir(root) else []
    if present and not overwrite:
        raise ConfigError(f"make-data: --out {out} is not empty ({len(present)} file(s) or folder(s)); choose a new folder, or "
                          "pass --overwrite to replace the shards there (edits made from them no longer match)")
    for old in present:
        if old.endswith(".tar") and fs.isfile(old):
            fs.rm(old)


def _sample(s: Any, captions: bool) -> dict[str, Any]:
    """One rendered example as a WebDataset sample: image, caption (unless not ``captions``), metadata, mask."""
    meta = {"colour": s.colour, "shape": s.shape, "caption": s.caption, "seed": s.seed,
            "index": int(s.key.split("_")[1]), "cx": round(s.params.cx, 4), "cy": round(s.params.cy, 4),
            "r": round(s.params.r, 4)}
    if not captions:
        meta.pop("caption")
    sample = {"__key__": s.key, "png": _png(s.image), "txt": s.caption.encode(),
              "json": json.dumps(meta, sort_keys=True).encode(), "mask.png": _png(s.mask.astype(np.uint8) * 255)}
    if not captions:
        del sample["txt"]
    return sample

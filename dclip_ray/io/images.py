"""Decoding images into model tensors, with a reason for every image that cannot be used.

An input image is converted to RGB and resized/cropped to the model's resolution by a named policy.
Anything unusable raises :class:`ImageError` whose message is the reason recorded in the error
manifest (never a crash, never a silent drop).
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from dclip_ray.io.formats import output_format

ResizePolicy = Literal["center-crop", "resize", "pad"]
MAX_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit, enforced explicitly here
MAX_DECODE_BYTES = 256 * 2**20
"""The most memory one decode may take: its raw pixels plus the RGB copy every image ends as. Counting
pixels alone let a 184 KB 16-bit PNG of 9400x9400 through, which took about 2 GB to decode; 256 MiB
still admits an 8-bit RGB photo of 6700x6700."""
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16B": 2, "I;16L": 2,
                    "I;16N": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}
# 16-bit grayscale (PNG opens as I;16, some decoders give I): 0..65535 -> 0..255 by a fixed factor
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
SIXTEEN_TO_EIGHT = 257.0  # 65535 / 255


class ImageError(ValueError):
    """An image that cannot be used; the message is the reason for the error manifest."""


_OBJECT_REPR = re.compile(r"<([^<>]*?) at 0x[0-9a-fA-F]+>")  # <_io.BytesIO object at 0x7f...>
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+\b")


def clean_reason(text: str) -> str:
    """An exception text made deterministic for a manifest reason: object reprs lose their memory address.

    ``"cannot identify image file <_io.BytesIO object at 0x7f3a...>"`` becomes ``"cannot identify image
    file <_io.BytesIO object>"``, so two runs over the same bad bytes record the same reason (and the
    same Parquet bytes). Newlines become spaces: a reason is one line.
    """
    text = _ADDRESS.sub("", _OBJECT_REPR.sub(r"<\1>", str(text)))
    return " ".join(text.split())


def decode_bytes(width: int, height: int, mode: str) -> int:
    """Memory (bytes) a decode of a ``width`` x ``height`` image in PIL ``mode`` takes: its raw pixels
    (4 bytes a pixel for modes not listed, e.g. RGBA, CMYK, I, F) plus the final RGB copy."""
    return width * height * (_BYTES_PER_PIXEL.get(mode, 4) + 3)


def _sixteen_to_eight(arr: np.ndarray, rows: int = 256) -> np.ndarray:
    """16-bit (or 32-bit ``I``) values [H,W] -> uint8 by the fixed factor 257, rounded and clipped,
    ``rows`` rows at a time (a float64 copy of a whole large image took gigabytes)."""
    out = np.empty(arr.shape, dtype=np.uint8)
    for i in range(0, arr.shape[0], rows):
        block = arr[i : i + rows].astype(np.int64)
        out[i : i + rows] = np.clip((block + 128) // 257, 0, 255)
    return out


def decode_image(data: bytes, min_size: int = 8) -> Image.Image:
    """Decode image bytes to an RGB PIL image; raises :class:`ImageError` with the reason.

    Handles grayscale, palette, CMYK, 16-bit and alpha images (alpha is composited on white) and
    applies the EXIF orientation. 16-bit values (and mode ``I``, read as 16-bit) are divided by 257
    (65535 -> 255), whatever the image's maximum. Zero-byte, truncated, undecodable, oversized (decompression bomb:
    over :data:`MAX_PIXELS`, or over :data:`MAX_DECODE_BYTES` of memory to decode) and too-small images are errors.
    """
    if not data:
        raise ImageError("zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"image of {w}x{h} pixels exceeds the decompression-bomb limit {MAX_PIXELS}")
            need = decode_bytes(w, h, img.mode)
            if need > MAX_DECODE_BYTES:
                raise ImageError(f"image of {w}x{h} pixels in mode {img.mode} needs {need / 2**20:.0f} MiB to decode, "
                                 f"over the limit of {MAX_DECODE_BYTES / 2**20:.0f} MiB (a decompression bomb?)")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(clean_reason(f"decompression bomb refused: {e}")) from None
    except Exception as e:  # noqa: BLE001  (PIL raises many types for bad data)
        kind = "truncated image" if "truncated" in str(e).lower() else "undecodable image"
        raise ImageError(clean_reason(f"{kind}: {type(e).__name__}: {e}")) from None
    if min(img.size) < min_size:
        raise ImageError(f"image of {img.size[0]}x{img.size[1]} is smaller than the minimum {min_size} px")
    img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:  # a fixed scale: a pixel's brightness never depends on the others
        img = Image.fromarray(_sixteen_to_eight(np.asarray(img)), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def fit_image(img: Image.Image, size: int, policy: ResizePolicy = "center-crop") -> Image.Image:
    """Bring an RGB image to ``size x size``: ``center-crop`` (scale the short side, crop the centre),
    ``resize`` (ignore the aspect ratio) or ``pad`` (scale the long side, pad with black)."""
    if policy == "center-crop":
        return ImageOps.fit(img, (size, size), method=Image.BICUBIC)
    if policy == "resize":
        return img.resize((size, size), Image.BICUBIC)
    if policy == "pad":
        return ImageOps.pad(img, (size, size), method=Image.BICUBIC, color=(0, 0, 0))
    raise ValueError(f"resize policy {policy!r}: expected 'center-crop', 'resize' or 'pad'")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3,H,W] in [-1,1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Tensor [3,H,W] in [-1,1] -> uint8 array [H,W,3] (clamped, rounded)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def load_image_tensor(data: bytes, size: int, policy: ResizePolicy = "center-crop") -> torch.Tensor:
    """Image bytes -> [3,size,size] in [-1,1]; raises :class:`ImageError` with the reason."""
    return pil_to_tensor(fit_image(decode_image(data), size, policy))


def encode_image(x: torch.Tensor, fmt: str = "png") -> bytes:
    """Tensor [3,H,W] in [-1,1] -> bytes in output format ``fmt`` (:data:`~dclip_ray.io.formats.OUTPUT_FORMATS`)."""
    f = output_format(fmt)
    buf = io.BytesIO()
    Image.fromarray(tensor_to_uint8(x)).save(buf, format=f.pil, **dict(f.options))
    return buf.getvalue()


def encode_png(x: torch.Tensor) -> bytes:
    """Tensor [3,H,W] in [-1,1] -> PNG bytes (lossless)."""
    return encode_image(x, "png")


def output_defect(x: torch.Tensor) -> str | None:
    """Why a generated image must not be committed, or None when it may.

    ``x``: [3,H,W], nominally in [-1,1]. Non-finite values (NaN/inf: a diverged model or a NaN weight)
    give ``"non-finite output: ..."``; an image whose 8-bit pixels are all one colour (what NaNs
    become after clamping, or a collapsed model) gives ``"blank output: ..."``. Real edits are neither.
    """
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        return f"non-finite output: {bad} of {x.numel()} values are NaN or infinite (check the models and the mix weights)"
    u8 = tensor_to_uint8(x)
    if (u8 == u8[0, 0]).all():
        r, g, b = (int(v) for v in u8[0, 0])
        return f"blank output: every pixel is ({r},{g},{b}) (check the models and the mix weights)"
    return None

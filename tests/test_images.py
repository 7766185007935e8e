"""Image decoding: every unusual-but-valid mode decodes to RGB; every bad image raises with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dclip_ray.io.images import ImageError, decode_image, encode_png, load_image_tensor


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


RED = (200, 30, 30)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGB", (40, 30), RED),
        lambda: Image.new("L", (40, 30), 128),
        lambda: Image.new("RGB", (40, 30), RED).convert("P", palette=Image.ADAPTIVE),
        lambda: Image.new("RGBA", (40, 30), RED + (255,)),
        lambda: Image.new("CMYK", (40, 30), (0, 200, 200, 40)),
        lambda: Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)),
    ],
    ids=["rgb", "grayscale", "palette", "rgba", "cmyk", "16bit"],
)
def test_unusual_modes_decode_to_rgb(make):
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    x = load_image_tensor(encode(img, fmt), 32)
    assert tuple(x.shape) == (3, 32, 32) and -1.0 <= x.min() <= x.max() <= 1.0
    if img.mode in ("RGB", "P", "RGBA"):
        assert np.allclose(np.asarray(out)[5, 5], RED, atol=2)
    if img.mode == "I;16":
        assert abs(int(np.asarray(out)[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_transparent_pixels_are_composited_on_white():
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert tuple(np.asarray(decode_image(encode(img)))[0, 0]) == (255, 255, 255)


def test_bad_images_raise_with_a_reason():
    jpeg = encode(Image.new("RGB", (64, 64), RED), "JPEG")
    cases = {
        "zero-byte": b"",
        "undecodable": b"this is not an image at all",
        "truncated": jpeg[: len(jpeg) // 2],
    }
    for reason, data in cases.items():
        with pytest.raises(ImageError, match=reason):
            decode_image(data)
    with pytest.raises(ImageError, match="smaller than"):
        decode_image(encode(Image.new("RGB", (4, 4))))


def test_decompression_bomb_is_refused_without_decoding(monkeypatch):
    import dclip_ray.io.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression-bomb"):
        decode_image(encode(Image.new("RGB", (40, 40))))


def test_png_round_trip_is_lossless():
    x = load_image_tensor(encode(Image.new("RGB", (32, 32), RED)), 32)
    assert (load_image_tensor(encode_png(x), 32) - x).abs().max() < 1e-6

"""Output image formats as data, without torch or PIL (the CLI's choices read it at import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dclip_ray.errors import ConfigError


@dataclass(frozen=True)
class OutputFormat:
    """An image format outputs are written in: ``name`` (``--format``, the spec's ``image_format``), the
    member extension ``ext`` in output shards and files, PIL's encoder ``pil`` with its ``options``."""

    name: str
    ext: str
    pil: str
    options: tuple[tuple[str, Any], ...]
    lossless: bool


OUTPUT_FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("png", "png", "PNG", (("optimize", False),), lossless=True),
    OutputFormat("jpg", "jpg", "JPEG", (("quality", 95),), lossless=False),
    OutputFormat("webp", "webp", "WEBP", (("lossless", True), ("method", 4)), lossless=True),
)}
"""The one table of output formats: adding one is one line here (the CLI's choices, the spec, the
encoder :func:`dclip_ray.io.images.encode_image`, the writers and verify read it)."""

OUTPUT_EXTS = tuple(f.ext for f in OUTPUT_FORMATS.values())
"""Member extensions that hold an output's image."""


def output_format(name: str) -> OutputFormat:
    """The :class:`OutputFormat` called ``name`` (``jpeg`` is ``jpg``); ConfigError naming the choices."""
    fmt = OUTPUT_FORMATS.get("jpg" if name == "jpeg" else name)
    if fmt is None:
        raise ConfigError(f"output format {name!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
    return fmt

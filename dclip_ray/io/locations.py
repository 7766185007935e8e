"""Where a command writes must never be where it reads: output locations checked against inputs.

An output folder that equals, contains or sits inside an input (image shards, a latent store, a model
folder) would overwrite or mix with what the command reads (``restyle --input D/ --out D/`` replaced
the input tars). :func:`check_outputs` refuses such a layout before any work starts, naming both paths.

Locations are compared as normalised ``(protocol, path)`` pairs: local paths through ``realpath`` (so
``D``, ``./D/`` and a symlink to ``D`` are one place), URLs by protocol and path (``s3://b/x/`` and
``s3://b/x`` are one place). An input given as a glob or brace list (``D/{0..3}.tar``, ``D/*.tar``) is
taken at the folder before its first pattern character. A name that is neither an existing path nor a
URL (a preset name such as ``toy_shapes``) is no location and is not compared.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Mapping

from dclip_ray.errors import ConfigError
from dclip_ray.urls import is_remote, local_path, redact

_PATTERN = re.compile(r"[*?\[{]")


def normalise(location: str, is_path: bool = False) -> tuple[str, str] | None:
    """``(protocol, absolute path without a trailing slash)`` of a local path or URL; None for a name
    that is no location (a preset name, an empty string) unless ``is_path`` (an output, which is a
    path even before it exists)."""
    if not location:
        return None
    m = _PATTERN.search(location)
    if m:  # a glob or brace list: the folder it lists
        location = location[: m.start()]
        location = location[: location.rfind("/") + 1] if "/" in location else "."
    if is_remote(location):
        protocol, _, rest = location.partition("://")
        rest = rest.split("?", 1)[0]
        return protocol.lower(), "/" + posixpath.normpath("/" + rest).strip("/")
    path = local_path(location)
    if not (is_path or os.path.exists(path) or os.sep in path or path.startswith(".")):
        return None  # a bare name such as a preset: nothing on disk
    return "file", os.path.realpath(os.path.abspath(path))


def _within(inner: tuple[str, str], outer: tuple[str, str]) -> bool:
    if inner[0] != outer[0]:
        return False
    a, b = inner[1].rstrip("/") or "/", outer[1].rstrip("/") or "/"
    return a == b or a.startswith(b if b.endswith("/") else b + "/")


def overlap(a: str, b: str) -> bool:
    """True when output location ``a`` and location ``b`` are the same place or one contains the other."""
    na, nb = normalise(a, is_path=True), normalise(b)
    return na is not None and nb is not None and (_within(na, nb) or _within(nb, na))


def too_broad(location: str) -> str | None:
    """Why a local output folder must not be ``location`` (a filesystem root, or a home folder itself:
    the current user's, or any folder directly in /home or /Users, or /root), or None when it may be."""
    if is_remote(location):
        return None
    path = os.path.realpath(os.path.expanduser(local_path(location)))
    if os.path.dirname(path) == path:
        return "is a filesystem root"
    homes = {os.path.realpath(os.path.expanduser("~")), "/root"}
    if path in homes or os.path.dirname(path) in ("/home", "/Users"):
        return "is a home folder itself"
    return None


def check_outputs(outputs: Mapping[str, str | None], inputs: Mapping[str, str | None]) -> None:
    """Refuse output locations that are a filesystem root or a home folder (:func:`too_broad`), or that
    equal, contain or sit inside an input location (or another output).

    ``outputs`` / ``inputs``: ``{label: location}`` with labels as the user wrote them (``"--out"``,
    ``"--input"``, ``"--model models/blue"``); None values are skipped. Raises :class:`ConfigError`
    (exit 1, nothing started) naming both paths and the fix.
    """
    outs = [(k, v) for k, v in outputs.items() if v]
    ins = [(k, v) for k, v in inputs.items() if v]
    for label, out in outs:
        why = too_broad(out)
        if why:
            raise ConfigError(f"{label} {redact(out)} {why}: dclip-ray writes folders and files there; give a "
                              f"folder of its own, e.g. {redact(out).rstrip('/')}/dclip-out")
    for label, out in outs:
        for in_label, src in ins:
            if not overlap(out, src):
                continue
            a, b = normalise(out, is_path=True), normalise(src)
            how = ("is" if a == b else "is inside" if a is not None and b is not None and _within(a, b)
                   else "contains")
            raise ConfigError(f"{label} {redact(out)} {how} {in_label} {redact(src)}: writing there would overwrite "
                              f"or mix with what is read; choose an output folder outside every input")
    for i, (label, out) in enumerate(outs):
        for other_label, other in outs[i + 1:]:
            if overlap(out, other):
                raise ConfigError(f"{label} {redact(out)} and {other_label} {redact(other)} overlap: outputs would "
                                  "overwrite each other; give them separate folders")


def check_replaceable(label: str, path: str, kind: str, is_own: Callable[[str], bool]) -> None:
    """An output *file* may replace only a file of its own kind: refuse ``path`` when it is a folder, or
    an existing file that ``is_own(path)`` does not recognise as one that this command wrote earlier
    (an input shard, a restyle manifest, a user's file). ``kind`` names what the command writes
    ("an HTML report"). Raises :class:`ConfigError` (exit 1, nothing written) naming the path and the fix.
    Local paths only (a URL passes)."""
    if is_remote(path):
        return
    local = local_path(path)
    if os.path.isdir(local):
        raise ConfigError(f"{label} {redact(path)} is a folder; give the file to write ({kind})")
    if os.path.lexists(local):
        try:
            own = os.path.isfile(local) and is_own(local)
        except (OSError, ValueError):
            own = False
        if not own:
            raise ConfigError(f"{label} {redact(path)} exists and is not {kind} written by dclip-ray: replacing "
                              "it would lose it; choose a new file name")

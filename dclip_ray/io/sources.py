"""Image inputs: a folder of images, or WebDataset / img2dataset tar shards, local or any fsspec URL.

Records stream out one key at a time (shards are read sequentially, never unpacked to disk). Member
names are used only as keys; nothing is ever written to a path taken from an archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import fsspec
from braceexpand import braceexpand

from dclip_ray.errors import InputFileError
from dclip_ray.urls import is_local_fs, redact

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


@dataclass
class ImageRecord:
    """One input key: the image bytes (or ``None`` with ``error`` set) and its sidecar members."""

    key: str
    shard: str
    image: bytes | None = None
    image_ext: str | None = None
    extras: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


def duplicate_reason(key: str, n: int, where: str = "this shard") -> str:
    """The error reason of a key that names ``n`` > 1 samples of ``where`` (one shard for the pipeline, the
    whole input for `dclip-ray edit`): none of them is used, since which one is the real image cannot be told."""
    return (f"duplicate key: {n} samples named {key!r} in {where} (keys must be unique within a dataset); "
            "none was used: rename them")


def _fs_and_paths(url: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    paths: list[str] = []
    fs = None
    for part in braceexpand(url):
        fs_i, _, expanded = fsspec.get_fs_token_paths(part)
        fs = fs or fs_i
        if any(c in part for c in "*?["):
            paths.extend(sorted(expanded))
        else:
            paths.extend(expanded)
    if fs is None or not paths:
        raise InputFileError(f"{redact(url)}: no input found; give a folder, a .tar shard, a brace list or a glob")
    return fs, paths


def list_shards(url: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Resolve ``url`` to ``(filesystem, [tar shard paths])``, or ``(fs, [folder])`` for a folder of images.

    Raises :class:`InputFileError` when nothing is there.
    """
    fs, paths = _fs_and_paths(url)
    out = []
    for p in paths:
        try:
            if fs.isdir(p):
                tars = sorted(x for x in fs.ls(p, detail=False) if x.endswith(".tar"))
                out.extend(tars or [p])
            elif fs.exists(p):
                out.append(p)
            else:
                raise InputFileError(f"{redact(p)}: no such file or folder; check the path or URL")
        except InputFileError:
            raise
        except Exception as e:  # noqa: BLE001  (credentials, network, permissions)
            raise InputFileError(f"{redact(url)}: cannot be listed ({type(e).__name__}: {redact(e)}); check the URL and credentials") from None
    return fs, out


def split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: ``dir/key.ext.more`` -> (``dir/key``, ``ext.more``); the key has no dot."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def _record(key: str, shard: str, members: dict[str, bytes], errors: list[str]) -> ImageRecord:
    rec = ImageRecord(key=key, shard=shard)
    for ext, data in members.items():
        if ext in IMAGE_EXTS and rec.image is None:
            rec.image, rec.image_ext = data, ext
        else:
            rec.extras[ext] = data
    if errors:
        rec.error = "; ".join(errors)
    elif rec.image is None:
        dotted = sorted(ext for ext in members if "." in ext and ext.rsplit(".", 1)[-1] in IMAGE_EXTS)
        if dotted:
            rec.error = (f"member {key}.{dotted[0]} has a dot in its key (WebDataset keys cannot contain dots: "
                         f"it reads as key {key!r} + extension {dotted[0]!r}); rename it, e.g. "
                         f"{key}_{dotted[0].replace('.', '_', dotted[0].count('.') - 1).rsplit('.', 1)[0]}."
                         f"{dotted[0].rsplit('.', 1)[-1]}")
        else:
            rec.error = f"no image member (found: {', '.join(sorted(members)) or 'nothing'})"
    return rec


def _check_tar_end(fs: fsspec.AbstractFileSystem, path: str, end: int) -> None:
    """Raise :class:`tarfile.ReadError` unless a zero block (the end-of-archive marker) follows the last
    member at byte ``end``: Python's tarfile takes a cut or garbled header as the end of the archive,
    silently, so a tar cut between two members would read as a complete, shorter one."""
    with fs.open(path, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != len(block):
        raise tarfile.ReadError(f"no end-of-archive marker after byte {end} (cut or garbled there)")


SPECIAL_FILE = "not a regular file (a FIFO, socket or device); refused: reading it could block forever"


def _check_regular(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Raise :class:`InputFileError` for a local input that is not a regular file (a FIFO named like a
    shard would block every read, and a thread stuck on it would keep the process alive)."""
    if is_local_fs(fs):
        try:
            kind = fs.info(path).get("type")
        except (FileNotFoundError, OSError):
            return  # the open that follows says what is wrong
        if kind not in ("file", "directory"):
            raise InputFileError(f"{redact(path)}: {SPECIAL_FILE}")


def iter_tar(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[ImageRecord]:
    """Stream the keys of one tar shard in order. Non-file members (links, devices) and unsafe
    names give an error record; a truncated or corrupt tar raises :class:`InputFileError` after the
    keys read so far."""
    _check_regular(fs, path)
    key, members, errors = None, {}, []
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            end = 0
            for m in tar:
                end = tar.offset
                if m.isdir():
                    continue
                k, ext = split_member(m.name)
                if k != key:
                    if key is not None:
                        yield _record(key, path, members, errors)
                    key, members, errors = k, {}, []
                if m.name.startswith("/") or ".." in m.name.split("/"):
                    errors.append(f"unsafe member name {m.name!r} refused")
                elif not m.isfile():
                    errors.append(f"member {m.name!r} is not a regular file (link or device) and was refused")
                elif ext in members:  # the same member twice in a row: two samples under one key, one lost
                    errors.append(f"member {m.name!r} appears twice in a row: two samples share key {k!r} "
                                  "(none is used); rename one")
                else:
                    fobj = tar.extractfile(m)
                    members[ext] = fobj.read() if fobj is not None else b""
            end = tar.offset
        _check_tar_end(fs, path, end)
    except (tarfile.TarError, EOFError, OSError) as e:
        if key is not None:
            yield _record(key, path, members, errors + [f"shard truncated or corrupt here: {redact(e)}"])
        raise InputFileError(f"{redact(path)}: truncated or corrupt tar ({type(e).__name__}: {redact(e)})") from None
    if key is not None:
        yield _record(key, path, members, errors)


def iter_folder(fs: fsspec.AbstractFileSystem, folder: str) -> Iterator[ImageRecord]:
    """Every image file under ``folder`` (recursive, sorted); the key is the relative path without
    its extension, dots replaced by ``_`` (WebDataset keys cannot contain dots)."""
    found = fs.find(folder, detail=True)
    files = sorted(p for p in found if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
    for p in files:
        rel = posixpath.relpath(p, folder)
        stem, _, ext = rel.rpartition(".")
        key = stem.replace(".", "_")
        if found[p].get("type") not in ("file", None):  # a FIFO would block the read forever
            yield ImageRecord(key=key, shard=folder, error=SPECIAL_FILE)
            continue
        try:
            data = fs.cat_file(p)
            yield ImageRecord(key=key, shard=folder, image=data, image_ext=ext.lower())
        except Exception as e:  # noqa: BLE001
            yield ImageRecord(key=key, shard=folder, error=f"unreadable file: {type(e).__name__}: {redact(e)}")


def iter_records(url: str, limit: int | None = None) -> Iterator[ImageRecord]:
    """All input records of ``url`` (folder, shard, brace list or glob; local or fsspec), in order."""
    fs, shards = list_shards(url)
    n = 0
    for shard in shards:
        it = iter_folder(fs, shard) if fs.isdir(shard) else iter_tar(fs, shard)
        for rec in it:
            if limit is not None and n >= limit:
                return
            yield rec
            n += 1


def _sha256_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


STAT_PREFIX = "stat:"
"""A fingerprint from a local tar's size and modification time only (no byte read): what a driver plans
with; the worker that reads the shard computes its content fingerprint (:func:`content_fingerprint`)."""


def shard_stat(path: str) -> str | None:
    """``stat:<size>:<mtime_ns>`` of a local regular tar file (one ``stat``, no byte read); None for
    anything else (a folder shard, an object-store URL, a FIFO or a missing file), whose fingerprint
    :func:`shard_fingerprint` computes as before."""
    fs, p = fsspec.core.url_to_fs(path)
    if not is_local_fs(fs) or not p.endswith(".tar"):
        return None
    try:
        st = os.stat(p)
    except OSError:
        return None
    return f"{STAT_PREFIX}{st.st_size}:{st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else None


def plan_fingerprint(path: str) -> str:
    """What a driver plans with, reading no byte of a local tar: its :func:`shard_stat`; else the
    :func:`shard_fingerprint` (an object's ETag, a folder's hash of its files)."""
    return shard_stat(path) or shard_fingerprint(path)


def content_fingerprint(path: str, planned: str | None) -> str:
    """The content fingerprint of the shard at ``path``: ``planned`` itself unless it is a stat print or
    None, else :func:`shard_fingerprint` (read here, in the worker that reads the shard anyway)."""
    if planned is None or planned.startswith(STAT_PREFIX):
        return shard_fingerprint(path)
    return planned


def same_source(marker: dict | None, fingerprint: str | None) -> bool:
    """Whether a commit ``marker`` was made from the input ``fingerprint``: by its ``source_stat`` for a
    stat print (size and modification time unchanged), else by its ``source_fingerprint`` (content).
    None matches any marker (no check)."""
    if fingerprint is None:
        return marker is not None
    if marker is None:
        return False
    if fingerprint.startswith(STAT_PREFIX):
        return marker.get("source_stat") == fingerprint
    return marker.get("source_fingerprint") == fingerprint


def shard_fingerprint(path: str) -> str:
    """A fingerprint of an input shard's content: it changes whenever an image is rewritten, even under
    the same keys, so committed latents and outputs of an older version are detected and redone.

    A local tar: ``sha256:<hex of its bytes>``. A folder shard: the sha256 over its image files' relative
    names and sha256s. An object-store tar whose listing gives a content checksum (S3 ETag, GCS md5):
    ``etag:<checksum>:<size>`` without reading the object; else the sha256 of its bytes. Raises
    :class:`InputFileError` when the shard cannot be read.
    """
    fs, p = fsspec.core.url_to_fs(path)
    try:
        if fs.isdir(p):
            h = hashlib.sha256()
            found = fs.find(p, detail=True)
            for f in sorted(x for x in found if x.rsplit(".", 1)[-1].lower() in IMAGE_EXTS):
                special = found[f].get("type") not in ("file", None)  # never opened: it could block
                h.update(f"{posixpath.relpath(f, p)}\0{'special' if special else _sha256_of(fs, f)}\n".encode())
            return f"sha256:{h.hexdigest()}"
        try:
            _check_regular(fs, p)
        except InputFileError:  # never opened; the stage that reads it reports the shard as unreadable
            return f"special:{posixpath.basename(p)}"
        if not is_local_fs(fs):
            info = fs.info(p)
            tag = next((info.get(k) for k in ("ETag", "etag", "md5Hash", "crc32c") if info.get(k)), None)
            if tag:
                return f"etag:{str(tag).strip(chr(34))}:{info.get('size')}"
        return f"sha256:{_sha256_of(fs, p)}"
    except Exception as e:  # noqa: BLE001  (permissions, network, a vanished file)
        raise InputFileError(f"{redact(path)}: cannot be read ({type(e).__name__}: {redact(e)}); check the input") from None


def caption_of(extras: Mapping[str, bytes]) -> str | None:
    """A sample's caption: its ``.txt`` member, else the ``caption`` of its ``.json`` (img2dataset's
    layout); None when it has neither (or they are empty or unreadable)."""
    txt = extras.get("txt")
    if txt:
        text = txt.decode("utf-8", errors="replace").strip()
        if text:
            return text
    raw = extras.get("json")
    if raw:
        try:
            meta = json.loads(raw)
        except ValueError:
            return None
        cap = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(cap, str) and cap.strip():
            return cap.strip()
    return None

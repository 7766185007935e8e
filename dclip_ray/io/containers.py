"""How an output shard stores its samples: the container interface a shard writer fills
(:class:`SampleContainer`) and today's one container, the deterministic WebDataset tar
(:class:`TarShardWriter`, hashed while written through :class:`HashingFile`). A second container (a
folder of files, a Parquet file of image bytes) implements the same methods and is handed to
:class:`~dclip_ray.io.shards.ShardWriter` as ``container=``."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from typing import BinaryIO, Protocol

from dclip_ray.errors import ConfigError
from dclip_ray.io.sources import split_member


class SampleContainer(Protocol):
    """The samples of one output shard, written to a local temporary file and uploaded whole. Every
    sample is ``key`` plus its members (extension -> bytes); the same samples in the same order give the
    same bytes, and :attr:`sha256` / :attr:`size` describe the finished file without reading it back."""

    keys: list[str]

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Add one sample (raises :class:`ConfigError` for a key the container cannot store)."""

    def close(self) -> None:
        """Finish the file (idempotent)."""

    @property
    def sha256(self) -> str:
        """sha256 (hex) of the finished file."""

    @property
    def size(self) -> int:
        """Bytes of the finished file."""

    def upload(self, url: str) -> None:
        """Close and copy the file to ``url`` (local path or fsspec URL), replacing what was there."""

    def drop(self, keys: set[str]) -> None:
        """Rewrite the file without the samples of ``keys`` (the others keep their order)."""

    def discard(self) -> None:
        """Close and delete the local temporary file."""


def key_problem(key: str, exts: Iterable[str] = ("png",)) -> str | None:
    """Why ``key`` cannot name the members ``key.EXT`` of an output tar (empty, a dot in its last part,
    an absolute or '..' path, or a name too long for the tar format), or None when it can."""
    base = posixpath.basename(key)
    if not key or "." in base or key.startswith("/") or ".." in key.split("/"):
        return f"sample key {key!r} cannot name a WebDataset member (no dots, no absolute or '..' paths); rename it"
    for ext in exts:
        try:
            tarfile.TarInfo(f"{key}.{ext}").tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        except ValueError as e:
            shown = key if len(key) <= 80 else key[:60] + f"...({len(key)} characters)"
            return f"sample key {shown!r} cannot be stored in a tar ({e}); shorten it"
    return None


def _check_key(key: str, exts: Iterable[str] = ("png",)) -> None:
    problem = key_problem(key, exts)
    if problem:
        raise ConfigError(problem)


class HashingFile:
    """A write-only file wrapper that hashes (sha256) and counts every byte written through it, so a
    file's digest is known the moment it is closed, without reading it back."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        """Write ``data`` to the wrapped file and into the digest."""
        self._sha.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def tell(self) -> int:
        """The wrapped file's position (tarfile asks for it)."""
        return self._raw.tell()

    def flush(self) -> None:
        """Flush the wrapped file."""
        self._raw.flush()

    def close(self) -> None:
        """Close the wrapped file."""
        self._raw.close()

    def hexdigest(self) -> str:
        """sha256 (hex) of the bytes written so far."""
        return self._sha.hexdigest()


def _open_tar(path: str) -> tuple[HashingFile, tarfile.TarFile]:
    f = HashingFile(open(path, "wb"))  # noqa: SIM115  (closed by the writer)
    return f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]


class TarShardWriter:
    """A deterministic WebDataset tar written to a local temporary file (upload with :meth:`upload`).

    ``write(key, {ext: bytes})`` adds ``key.ext`` members in sorted extension order; ``mtime``,
    ownership and mode are fixed so identical samples give identical bytes. The tar is hashed while it
    is written: after :meth:`close`, :attr:`sha256` and :attr:`size` describe the file (also after
    :meth:`drop`).
    """

    def __init__(self, tmp_dir: str | None = None):
        fd, self.local_path = tempfile.mkstemp(suffix=".tar", dir=tmp_dir)
        os.close(fd)
        self._file, self._tar = _open_tar(self.local_path)
        self.keys: list[str] = []
        self._closed = False

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Add one sample: ``members`` maps extensions (``png``, ``txt``, ``json``) to bytes. A key that
        cannot name its members (:func:`key_problem`) raises :class:`ConfigError` before anything is written."""
        _check_key(key, members)
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)

    def close(self) -> None:
        """Finish the tar (idempotent)."""
        if not self._closed:
            self._tar.close()
            self._file.close()
            self._closed = True

    @property
    def sha256(self) -> str:
        """sha256 (hex) of the finished tar file (closes the tar)."""
        self.close()
        return self._file.hexdigest()

    @property
    def size(self) -> int:
        """Size in bytes of the finished tar file (closes the tar)."""
        self.close()
        return self._file.size

    def upload(self, url: str) -> None:
        """Close and copy the tar to ``url`` (local path or fsspec URL), replacing any previous file."""
        from dclip_ray.io.shards import put_file  # the one upload rule (local rename or fsspec put)

        self.close()
        put_file(self.local_path, url)

    def drop(self, keys: set[str]) -> None:
        """Close the tar and rewrite it without the samples of ``keys`` (members keep their order; the
        digest is that of the rewritten file)."""
        self.close()
        fd, tmp = tempfile.mkstemp(suffix=".tar", dir=os.path.dirname(self.local_path))
        os.close(fd)
        f_out, out = _open_tar(tmp)
        with out, tarfile.open(self.local_path, "r:") as src:
            for m in src:
                if split_member(m.name)[0] not in keys:
                    out.addfile(m, src.extractfile(m))
        f_out.close()
        os.replace(tmp, self.local_path)
        self._file = f_out
        self.keys = [k for k in self.keys if k not in keys]

    def discard(self) -> None:
        """Close and delete the local temporary file."""
        self.close()
        if os.path.exists(self.local_path):
            os.remove(self.local_path)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

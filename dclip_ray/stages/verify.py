"""`dclip-ray verify OUT --input URL`: check that every input key is in the output exactly once.

The output folders are those the restyle declared in ``OUT/restyle.json`` (a declared variant folder
that is gone is a problem), or for older outputs ``OUT`` itself or each sub-folder of ``OUT`` holding
commit markers. For every input shard and every output folder it checks: the commit marker exists; the
manifest's keys equal the input shard's keys, each exactly once; the tar holds exactly the ok keys, one
image each, whose sha256 equals the manifest's; error rows and skipped rows (keys a routed restyle
passed over: meant for another model) have a reason and no image; rejected rows (edits scored under
``--min-score``) have their scores and their image in ``rejected/{shard}.tar``, never in the output tar;
the counts and the tars' sha256 and size equal the marker's; the input shard's content is the one the output was made
from (an input rewritten since is reported); no key appears in two input shards. It also reports files
that no input shard explains (a stray shard, e.g. a copy duplicating input keys) and temporaries left
by a write that died. No Ray needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from dclip_ray.errors import InputFileError
from dclip_ray.io.formats import OUTPUT_EXTS
from dclip_ray.io.manifest import read_manifest
from dclip_ray.io.shards import is_temporary, list_markers, read_marker, shard_urls
from dclip_ray.io.sources import shard_fingerprint, split_member
from dclip_ray.urls import is_url

from .inputs import input_shards, io_threads, parallel_map, shard_keys
from .restyle_config import DECLARATION


@dataclass
class VerifyReport:
    """The outcome: per output folder and shard the counts, and every discrepancy found."""

    outputs: list[str] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is missing, duplicated or inconsistent."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"ok": self.ok, "outputs": self.outputs, "shards": self.shards, "problems": self.problems}


def declared_folders(out: str) -> list[str] | None:
    """The output folders that ``OUT/restyle.json`` declares (whether or not they exist), or None when
    ``out`` has no declaration (outputs written before declarations, or a variant folder itself)."""
    try:
        with fsspec.open(f"{out.rstrip('/')}/{DECLARATION}", "rb") as f:
            decl = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    folders = []
    for v in decl.get("variants") or []:
        folder = str(v.get("folder") or ".")
        folders.append(out.rstrip("/") if folder == "." else f"{out.rstrip('/')}/{folder}")
    return folders or None


def output_folders(out: str) -> list[str]:
    """The folders declared in ``OUT/restyle.json``; without one, ``out`` when it holds commit markers,
    else its sub-folders that do (several-model restyles)."""
    declared = declared_folders(out)
    if declared is not None:
        return declared
    if list_markers(out):
        return [out.rstrip("/")]
    fs, path = fsspec.core.url_to_fs(out)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise InputFileError(f"{out}: no such output folder; give the --out of a restyle") from None
    subs = sorted(f"{out.rstrip('/')}/{posixpath.basename(e['name'].rstrip('/'))}" for e in entries if e["type"] == "directory")
    found = [s for s in subs if list_markers(s)]
    if not found:
        raise InputFileError(f"{out}: no committed output shard (no *_stats.json); give the --out of a restyle")
    return found


def _tar_members(url: str) -> tuple[dict[str, list[bytes]], str, int]:
    """``{key: [image bytes, ...]}`` of a tar, the tar's sha256 and its size in bytes."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    images: dict[str, list[bytes]] = {}
    import io

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = split_member(m.name)
            if ext in OUTPUT_EXTS:
                fobj = tar.extractfile(m)
                images.setdefault(key, []).append(fobj.read() if fobj is not None else b"")
            else:
                images.setdefault(key, [])
    return images, hashlib.sha256(data).hexdigest(), len(data)


def verify_shard(folder: str, shard: str, expected: list[str], fingerprint: str | None = None,
                 ) -> tuple[dict[str, Any], list[str]]:
    """Check one output shard against its input keys (and, when given, the input's content fingerprint);
    returns (counts, problems)."""
    where = f"{folder}/{shard}"
    urls = shard_urls(folder, shard)
    problems: list[str] = []
    marker = read_marker(urls["marker"])
    if marker is None:
        return {"shard": shard, "output": folder, "committed": False}, [f"{where}: not committed (no {shard}_stats.json)"]
    try:
        rows = read_manifest(urls["manifest"])
    except InputFileError as e:
        return {"shard": shard, "output": folder, "committed": True}, [f"{where}: {e}"]
    problems += _check_keys(where, [r.key for r in rows], expected)
    try:
        images, tar_sha, tar_size = _tar_members(urls["tar"])
    except (FileNotFoundError, OSError, tarfile.TarError) as e:
        return {"shard": shard, "output": folder, "committed": True}, problems + [f"{where}.tar unreadable: {e}"]
    ok_rows = {r.key: r for r in rows if r.status == "ok"}
    err_rows = [r for r in rows if r.status == "error"]
    skip_rows = [r for r in rows if r.status == "skipped"]
    rej_rows = {r.key: r for r in rows if r.status == "rejected"}
    problems += _check_rejected(where, urls["rejected"], rej_rows, marker)
    problems += _check_images(where, images, ok_rows)
    if marker.get("tar_sha256") != tar_sha:
        problems.append(f"{where}: the tar's sha256 differs from its commit marker (damaged, or written after the marker)")
    if "tar_bytes" in marker and marker["tar_bytes"] != tar_size:
        problems.append(f"{where}: the tar has {tar_size} bytes, its commit marker says {marker['tar_bytes']}")
    made_from = marker.get("source_fingerprint")
    if fingerprint is not None and made_from is not None and made_from != fingerprint:
        problems.append(f"{where}: the input shard changed after this output was written (other image bytes); "
                        "re-run restyle to redo it")
    marked = (marker.get("n"), marker.get("n_ok"), marker.get("n_error"), marker.get("n_skipped", 0),
              marker.get("n_rejected", 0))
    found = (len(rows), len(ok_rows), len(err_rows), len(skip_rows), len(rej_rows))
    if marked != found:
        problems.append(f"{where}: marker counts n/ok/error/skipped/rejected {'/'.join(map(str, marked))} differ from "
                        f"the manifest {'/'.join(map(str, found))}")
    return {"shard": shard, "output": folder, "committed": True, "n": len(rows), "n_ok": len(ok_rows),
            "n_error": len(err_rows), "n_skipped": len(skip_rows), "n_rejected": len(rej_rows),
            "expected": len(expected)}, problems


def _check_keys(where: str, keys: list[str], expected: list[str]) -> list[str]:
    """Each input key exactly once in a manifest (``keys``), and no other."""
    counts = Counter(keys)
    dups = sorted(k for k, c in counts.items() if c > 1)
    missing = sorted(set(expected) - set(counts))
    extra = sorted(set(counts) - set(expected))
    problems = []
    if dups:
        problems.append(f"{where}: {len(dups)} key(s) more than once in the manifest, e.g. {dups[:3]}")
    if missing:
        problems.append(f"{where}: {len(missing)} input key(s) missing from the manifest, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{where}: {len(extra)} manifest key(s) not in the input, e.g. {extra[:3]}")
    return problems


def _check_images(where: str, images: dict[str, list[bytes]], ok_rows: dict[str, Any]) -> list[str]:
    """Every ok row has exactly one image in the tar, with the row's sha256, and the tar holds no other."""
    problems = []
    for key, blobs in images.items():
        if key not in ok_rows:
            problems.append(f"{where}: tar holds {key!r}, which is not an ok row of the manifest")
        elif len(blobs) != 1:
            problems.append(f"{where}: {key!r} has {len(blobs)} images in the tar, expected 1")
        elif hashlib.sha256(blobs[0]).hexdigest() != ok_rows[key].sha256:
            problems.append(f"{where}: {key!r} image sha256 differs from the manifest")
    absent = sorted(set(ok_rows) - set(images))
    if absent:
        problems.append(f"{where}: {len(absent)} ok key(s) have no image in the tar, e.g. {absent[:3]}")
    return problems


def _check_rejected(where: str, url: str, rows: dict[str, Any], marker: dict[str, Any]) -> list[str]:
    """Problems of a shard's rejected edits: each rejected row has its score and exactly one image in the
    rejected tar with the row's sha256, the tar holds nothing else and matches the marker."""
    problems = [f"{where}: rejected row {k!r} has no score" for k, r in rows.items() if "score" not in r.scores]
    if not rows:
        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(path):
            problems.append(f"{where}: a rejected tar is there but no row is rejected; re-run restyle")
        return problems
    try:
        images, sha, size = _tar_members(url)
    except (FileNotFoundError, OSError, tarfile.TarError) as e:
        return problems + [f"{where}: {len(rows)} rejected row(s) but the rejected tar is unreadable: {e}"]
    for key, blobs in images.items():
        if key not in rows:
            problems.append(f"{where}: the rejected tar holds {key!r}, which is not a rejected row")
        elif len(blobs) != 1 or hashlib.sha256(blobs[0]).hexdigest() != rows[key].sha256:
            problems.append(f"{where}: rejected {key!r}: image missing, repeated or its sha256 differs from the manifest")
    absent = sorted(set(rows) - set(images))
    if absent:
        problems.append(f"{where}: {len(absent)} rejected key(s) have no image in the rejected tar, e.g. {absent[:3]}")
    if (marker.get("rejected_sha256"), marker.get("rejected_bytes")) != (sha, size):
        problems.append(f"{where}: the rejected tar's sha256 or size differs from its commit marker")
    return problems


def _strays(folder: str, names: set[str], homes: dict[str, list[str]]) -> list[str]:
    """Problems of files in an output folder that no input shard explains, and leftover temporaries."""
    fs, path = fsspec.core.url_to_fs(folder)
    try:
        files = [posixpath.basename(n) for n in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    problems = []
    temps = sorted(f for f in files if is_temporary(f))
    if temps:
        problems.append(f"{folder}: {len(temps)} temporary file(s) left by a write that did not finish, e.g. "
                        f"{temps[:3]}; re-run restyle (it removes them) or delete them")
    for f in sorted(files):
        if is_temporary(f):
            continue
        stem = (f[: -len("_stats.json")] if f.endswith("_stats.json") else f.rsplit(".", 1)[0]
                if f.endswith((".tar", ".parquet", ".lease")) else None)
        if stem is None or stem in names:
            continue
        detail = ""
        if f.endswith(".tar"):
            try:
                images, _, _ = _tar_members(f"{folder}/{f}")
                dup = sorted(k for k in images if k in homes)
                if dup:
                    detail = f"; it duplicates {len(dup)} input key(s), e.g. {dup[:3]}"
            except (OSError, tarfile.TarError) as e:
                detail = f"; unreadable: {e}"
        problems.append(f"{folder}/{f}: no input shard named {stem!r} explains it{detail}; remove it")
    return problems


def check_input_shard(unit: tuple[str, str, list[str]]) -> dict[str, Any]:
    """The work of one input shard (``(name, path, output folders)``), plain data so it can run
    anywhere (a thread, a Ray task): its keys, whether it reads to its end (``broken``: the reason, else
    None) and, per output folder, :func:`verify_shard`'s ``(counts, problems)`` against its keys and
    content fingerprint."""
    name, path, folders = unit
    keys, broken = shard_keys(path)
    fingerprint = shard_fingerprint(path)
    return {"name": name, "keys": keys, "broken": broken,
            "outputs": [verify_shard(folder, name, keys, fingerprint) for folder in folders]}


def verify(out: str, input_url: str, folders: list[str] | None = None,
           mapper: Callable[[Callable[[Any], Any], list[Any]], list[Any]] | None = None) -> VerifyReport:
    """Verify the restyle output ``out`` against its input ``input_url`` (see the module docstring).
    ``folders``: the output folders that must be there (a workflow knows its variants); default: the
    declared or found ones. ``mapper(fn, units)``: how the per-input-shard work
    (:func:`check_input_shard`) runs, in order; default: threads in this process
    (:func:`~dclip_ray.stages.inputs.parallel_map`; the Ray layer passes one task per shard)."""
    report = VerifyReport(outputs=folders or output_folders(out))
    shards = input_shards(input_url)
    names = {n for n, _ in shards}
    fs, _ = fsspec.core.url_to_fs(out)
    present = [f for f in report.outputs if fs.isdir(fsspec.core.url_to_fs(f)[1])]
    units = [(n, p, present) for n, p in shards]
    done = mapper(check_input_shard, units) if mapper else parallel_map(check_input_shard, units,
                                                                           io_threads(input_url, local=os.cpu_count() or 1))
    expected = {d["name"]: d["keys"] for d in done}
    for d in done:
        if d["broken"]:  # its outputs were never committed; the keys after the break are unknown
            report.problems.append(f"input shard {d['name']} cannot be read to its end ({d['broken']}): "
                                   f"{len(d['keys'])} key(s) before the break; fix or replace the file and re-run restyle")
    homes: dict[str, list[str]] = {}
    for name, keys in expected.items():
        for k in dict.fromkeys(keys):
            homes.setdefault(k, []).append(name)
    shared = {k: v for k, v in homes.items() if len(v) > 1}
    if shared:
        k, v = next(iter(shared.items()))
        report.problems.append(f"{len(shared)} key(s) appear in more than one input shard, e.g. {k!r} in {v[:3]} "
                               "(keys must be unique within a dataset: rename them)")
    for folder in report.outputs:  # per folder, its shards in order
        if folder not in present:
            report.problems.append(f"{folder}: a declared output folder is missing: every key of this variant is "
                                   "lost; re-run restyle to write it")
            continue
        for d in done:
            counts, problems = d["outputs"][present.index(folder)]
            report.shards.append(counts)
            report.problems.extend(problems)
        report.problems.extend(_strays(folder, names, homes))
    return report


def _marker_roots(folder: str) -> list[str]:
    """The folders holding ``folder``'s commit markers: itself (a restyle variant), its declared or found
    variant folders (a restyle OUT), or edit's hidden ``.NAME.edit/`` beside it (an edit OUT)."""
    from .edit import state_dir

    if list_markers(folder):
        return [folder]
    if not is_url(folder):
        hidden = state_dir(folder)
        if list_markers(hidden):
            return [hidden]
    try:
        variants = declared_folders(folder) or output_folders(folder)
    except InputFileError:  # plain images: no commit marker anywhere
        return []
    return [f for f in variants if f != folder and list_markers(f)]


def changed_inputs(folder: str, known: dict[str, str | None] | None = None) -> list[dict[str, str]]:
    """The output shards of ``folder`` (an edit ``--out``, a restyle OUT or one of its variant folders)
    whose input shard, as recorded in their commit marker (``source``), now holds other bytes than they
    were made from (``source_fingerprint``), or is gone: ``{"shard", "input", "problem"}`` each, with
    ``problem`` a phrase ("changed after it was made (other image bytes)" or "is gone or unreadable").
    [] when every recorded input is unchanged, or when ``folder`` has no commit markers (plain images).
    What ``eval`` and ``report`` check before pairing outputs with inputs by key. ``known``: input ->
    current fingerprint, shared between calls so that variants of one input hash it once."""
    found: list[dict[str, str]] = []
    now: dict[str, str | None] = {} if known is None else known
    for root in _marker_roots(folder):
        for shard in list_markers(root):
            marker = read_marker(shard_urls(root, shard)["marker"]) or {}
            source, made_from = marker.get("source"), marker.get("source_fingerprint")
            if not source or not made_from or "***" in str(source):
                continue  # nothing recorded (older outputs) or a redacted URL that cannot be opened again
            if source not in now:
                try:
                    now[source] = shard_fingerprint(source)
                except InputFileError:
                    now[source] = None
            if now[source] != made_from:
                found.append({"shard": f"{root}/{shard}", "input": str(source),
                              "problem": "is gone or unreadable" if now[source] is None
                              else "changed after it was made (other image bytes)"})
    return found

"""Re-sorting a committed restyle shard by another ``--min-score`` without generating anything (no Ray):
each variant's ok and rejected samples are read back from the output and rejected tars, placed again
by their stored scores and committed anew, byte for byte what a fresh run with this threshold writes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping

import fsspec

from dclip_ray.errors import InputFileError
from dclip_ray.io.formats import OUTPUT_EXTS
from dclip_ray.io.manifest import read_manifest
from dclip_ray.io.shards import read_marker, shard_urls
from dclip_ray.urls import redact

from .common import RestyleResult
from .inputs import iter_shard
from .restyle import ShardRestyler
from .variants import Variant, threshold_current


def rethreshold(r: ShardRestyler, shard: str, path: str) -> RestyleResult:
    """Re-sort a committed shard's scored edits by this run's ``min_score`` without generating
    anything: each variant's ok and rejected samples are read back (output and rejected tars), placed
    again by their stored scores and committed anew (same bytes as a fresh run with this threshold).
    Call it holding the shard's lease."""
    start, started = time.perf_counter(), time.time()
    extras: dict[str, Mapping[str, bytes]] = {}
    for rec in iter_shard(path):
        extras.setdefault(rec.key, rec.extras)
    counts = []
    for v in r.cfg.variants:
        if threshold_current(r.cfg, v, shard):
            m = read_marker(shard_urls(v.out, shard)["marker"]) or {}
            counts.append((int(m.get("n", 0)), int(m.get("n_ok", 0)) + int(m.get("n_skipped", 0)),
                           int(m.get("n_error", 0)), int(m.get("n_rejected", 0))))
            continue
        counts.append(_rethreshold_variant(r, v, shard, extras))
    return RestyleResult(shard, n=counts[0][0], n_ok=min(c[1] for c in counts), n_error=max(c[2] for c in counts),
                         n_rejected=max(c[3] for c in counts), seconds=round(time.perf_counter() - start, 3),
                         started=round(started, 3), rethresholded=True)

def _rethreshold_variant(r: ShardRestyler, v: Variant, shard: str, extras: Mapping[str, Mapping[str, bytes]],
                         ) -> tuple[int, int, int, int]:
    urls = shard_urls(v.out, shard)
    old = read_marker(urls["marker"]) or {}
    rows = read_manifest(urls["manifest"])
    images = _tar_images(urls["tar"])
    if any(row.status == "rejected" for row in rows):
        images.update(_tar_images(urls["rejected"]))
    w = r.new_writer(v, shard)
    try:
        for row in rows:
            if row.status in ("ok", "rejected") and "score" in row.scores:
                data = images.get(row.key)
                if data is None or hashlib.sha256(data).hexdigest() != row.sha256:
                    raise InputFileError(f"{redact(urls['tar'])}: the image of {row.key!r} is missing or differs "
                                         "from its manifest row; delete the shard's _stats.json to redo it")
                r.place(v, shard, w, row.key, extras.get(row.key, {}), data, v.t0, row.metrics, row.scores)
            else:
                w.rows.append(row)
        kept = {k: old[k] for k in ("source", "config_sha256", "variant", "truncated", "source_fingerprint",
                                    "source_stat", "format") if k in old}
        w.commit(r.marker(v, w, kept))
        n_ok, n_error, n_skipped = w.counts()
        return len(w.rows), n_ok + n_skipped, n_error, w.n_rejected
    finally:
        w.discard()


def _tar_images(url: str) -> dict[str, bytes]:
    """``{key: image bytes}`` of an output tar (its image members: :data:`~dclip_ray.io.formats.OUTPUT_EXTS`)."""
    import io
    import tarfile

    from dclip_ray.io.sources import split_member

    out: dict[str, bytes] = {}
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:") as tar:
        for m in tar:
            key, ext = split_member(m.name)
            if m.isfile() and ext in OUTPUT_EXTS:
                fobj = tar.extractfile(m)
                if fobj is not None:
                    out[key] = fobj.read()
    return out

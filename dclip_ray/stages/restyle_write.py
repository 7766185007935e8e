"""The writing half of :class:`~dclip_ray.stages.restyle.ShardRestyler` (no Ray): each edited image scored,
encoded and placed (ok into the output, or rejected beside it under ``--min-score``) with its manifest row
and provenance, and the commit markers last. Its methods run in the actor's write lane."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dclip_ray.io.formats import output_format
from dclip_ray.io.images import encode_image, output_defect
from dclip_ray.io.latents import LatentShard
from dclip_ray.io.manifest import ManifestRow
from dclip_ray.io.shards import ShardWriter
from dclip_ray.scoring import image_scores, rows_of, stats_of_rows
from dclip_ray.urls import redact

from .inputs import Decoded
from .overlap import Lane
from .provenance import output_members
from .variants import SHARD_FORMAT, RestyleConfig, Variant


@dataclass
class ShardState:
    """Bookkeeping of one shard being restyled: input position of every key, repeated keys, and per t0
    the cached latent file and its latents."""

    cached: dict[int, LatentShard | None]
    position: dict[str, int] = field(default_factory=dict)
    dups: dict[str, int] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    exclude: Mapping[str, str] = field(default_factory=dict)
    n_cached: int = 0
    n_stale: int = 0
    n_routed: int = 0
    latents: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    lane: Lane = field(default_factory=lambda: Lane(0))  # where the writers are written to (one thread, in order)

    def __post_init__(self) -> None:
        self.latents = {t0: (c.as_dict() if c is not None else {}) for t0, c in self.cached.items()}


class OutputWriting:
    """Mixed into :class:`~dclip_ray.stages.restyle.ShardRestyler`, which gives it ``cfg``, ``shas``,
    ``source_stats``, ``scorer()`` and ``face()``."""

    cfg: RestyleConfig
    shas: list[str]
    source_stats: dict[str, str | None]

    def scorer(self) -> Any:  # pragma: no cover  (ShardRestyler's)
        raise NotImplementedError

    def face(self) -> Any:  # pragma: no cover  (ShardRestyler's)
        raise NotImplementedError

    def _provenance(self, v: Variant, shard: str, t0: int, latent: str) -> dict[str, Any]:
        """The ``dclip`` record of an edited sample of variant ``v`` (see :mod:`.provenance`)."""
        cfg = self.cfg
        return {"variant": v.name, **v.description, "edits": [{"source": a, "target": b} for a, b in v.edits],
                "t0": t0, "n_inv_steps": cfg.n_inv_steps, "n_gen_steps": cfg.n_gen_steps,
                "base_model_sha256": self.shas[0], "latent": latent, "source_shard": shard}

    def place(self, v: Variant, shard: str, writer: ShardWriter, key: str, extras: Mapping[str, bytes], data: bytes,
               t0: int, metrics: dict[str, Any], scores: dict[str, float]) -> None:
        """Write one edited sample (image bytes ``data``) with its row: ok into the output, or, scored
        under ``min_score``, rejected into the rejected tar (its caption not edited: the edit is not
        claimed)."""
        cfg = self.cfg
        ext = output_format(cfg.image_format).ext
        dclip = self._provenance(v, shard, t0, str(metrics.get("latent", "inverted")))
        if scores:
            dclip["scores"] = scores
        low = cfg.min_score is not None and "score" in scores and scores["score"] < cfg.min_score
        if low:
            reason = f"edit scored {scores['score']:.4f} < --min-score {cfg.min_score:g}"
            members = output_members(extras, {**dclip, "rejected": reason}, [])
            members[ext] = data
            writer.reject(key, members, ManifestRow(key, shard, "rejected", error=reason, sha256=hashlib.sha256(data).hexdigest(),
                                                    metrics=metrics, scores=scores))
            return
        members = output_members(extras, dclip, v.edits)
        members[ext] = data
        writer.write(key, members, ManifestRow(key, shard, "ok", sha256=hashlib.sha256(data).hexdigest(), metrics=metrics, scores=scores))

    def _write(self, v: Variant, shard: str, items: list[Decoded], x: torch.Tensor, x0: torch.Tensor,
               writer: ShardWriter, cached: bool, t0: int, lane: Lane) -> None:
        """Score (when the variant is scored) and write one variant's generated batch ``x`` [B,3,H,W]
        (inputs ``x0`` [B,3,H,W]); a defective output becomes an error row. The tensor work runs here;
        encoding, hashing and writing run in ``lane`` (in order)."""
        cfg = self.cfg
        latent = "cache" if cached else "inverted"
        defects = [output_defect(x[i]) for i in range(len(items))]
        good = [i for i, d in enumerate(defects) if d is None]
        scores: dict[int, dict[str, float]] = {}
        if cfg.scores(v) and good:
            parts = image_scores(self.scorer(), x0[good].float(), x[good].float().clamp(-1, 1), v.edits,
                                 face=self.face())
            scores = dict(zip(good, rows_of(parts), strict=True))
        metrics: list[dict[str, Any]] = []
        for i in range(len(items)):
            change = float((x[i].float().clamp(-1, 1) - x0[i].float()).abs().mean())
            metrics.append({"latent": latent, **({"mean_abs_change": round(change, 6)} if math.isfinite(change) else {})})
        x = x.detach().cpu()  # the lane encodes from host memory (a no-op on the CPU)
        lane.submit(self._store, v, shard, items, x, writer, t0, defects, metrics, scores)

    def _store(self, v: Variant, shard: str, items: list[Decoded], x: torch.Tensor, writer: ShardWriter, t0: int,
               defects: list[str | None], metrics: list[dict[str, Any]], scores: dict[int, dict[str, float]]) -> None:
        """Encode and write the checked batch ``x`` [B,3,H,W] in [-1,1] (CPU) of variant ``v``: an error row
        for each defective output, else the sample and its row (ok or rejected)."""
        for i, d in enumerate(items):
            if defects[i] is not None:  # never commit NaN or a flat image (a NaN weight, a diverged model)
                writer.error(d.rec.key, str(defects[i]))
                continue
            self.place(v, shard, writer, d.rec.key, d.rec.extras, encode_image(x[i], self.cfg.image_format), t0,
                        metrics[i], scores.get(i, {}))

    def _commit(self, path: str, writers: list[ShardWriter], state: ShardState, fingerprint: str) -> None:
        for v, h, w in zip(self.cfg.variants, self.hashes, writers, strict=True):
            w.commit(self.marker(v, w, {"source": redact(path), "config_sha256": h, "variant": v.name,
                                         "truncated": state.status.get("truncated"), "source_fingerprint": fingerprint,
                                         "source_stat": self.source_stats.get(writers[0].shard),
                                         "format": SHARD_FORMAT}), order=state.position)

    def marker(self, v: Variant, w: ShardWriter, marker: dict[str, Any]) -> dict[str, Any]:
        """``marker`` plus, for a scored variant, the threshold it was sorted with and its score summary."""
        if not self.cfg.scores(v):
            return marker
        stats = stats_of_rows(w.rows, w.shard)
        return {**marker, "min_score": self.cfg.min_score, "scores": stats.as_dict()}

"""Parquet manifests: one row for EVERY input key of a shard, edited or not.

Columns: ``key`` (string), ``shard`` (string), ``status`` (``"ok"``, ``"error"``, ``"skipped"``: not
meant for this output, e.g. routed to another model, and passed over on purpose, or ``"rejected"``: edited,
but scored under ``--min-score``; its image is kept beside the output, never in it), ``error`` (the reason
of an error, a skip or a rejection, null when ok), ``sha256`` (hex of the image bytes written: the output's,
or the rejected image kept beside it; null on error and skip), ``metrics`` (a JSON object as a string), and
the judge-free per-image scores of the edit (float64, null where not scored; see
:mod:`dclip_ray.scoring`): ``score``, ``direction``, ``structure``, ``background``, ``identity``.
Written deterministically (same rows -> same bytes), read back with validation; a manifest written
before the score columns existed reads with them null.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from dclip_ray.errors import InputFileError
from dclip_ray.urls import redact

STATUSES = ("ok", "error", "skipped", "rejected")

SCORE_COLUMNS = ("score", "direction", "structure", "background", "identity")
"""The per-image score columns (nullable floats), in schema order."""

SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("metrics", pa.string()),
    *(pa.field(c, pa.float64()) for c in SCORE_COLUMNS),
])
"""The manifest's Arrow schema."""


@dataclass
class ManifestRow:
    """One input key: ``status`` ok (``sha256`` of the output bytes set), error (``error`` = reason),
    skipped (``error`` = why this output passes over it) or rejected (``error`` = the score under the bar,
    ``sha256`` of the image kept beside the output). ``scores``: the edit's per-image scores (names from
    :data:`SCORE_COLUMNS`; empty when it was not scored)."""

    key: str
    shard: str
    status: str
    error: str | None = None
    sha256: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.error is not None:
            self.error = redact(self.error)  # reasons may quote URLs: never store credentials
        if self.status not in STATUSES:
            raise ValueError(f"manifest status {self.status!r}: expected one of {', '.join(STATUSES)}")
        if self.status in ("ok", "rejected") and not self.sha256:
            raise ValueError(f"manifest row {self.key}: an {self.status} row needs the sha256 of its image")
        if self.status == "rejected" and "score" not in self.scores:
            raise ValueError(f"manifest row {self.key}: a rejected row needs the score it was rejected for")
        unknown = sorted(set(self.scores) - set(SCORE_COLUMNS))
        if unknown:
            raise ValueError(f"manifest row {self.key}: unknown score column(s) {unknown}")
        if self.status in ("error", "skipped", "rejected") and not self.error:
            raise ValueError(f"manifest row {self.key}: an {self.status} row needs its reason")


def manifest_bytes(rows: Iterable[ManifestRow]) -> bytes:
    """The Parquet bytes of ``rows`` (in the given order; same rows give the same bytes)."""
    rows = list(rows)
    table = pa.table({
        "key": [r.key for r in rows],
        "shard": [r.shard for r in rows],
        "status": [r.status for r in rows],
        "error": [r.error for r in rows],
        "sha256": [r.sha256 for r in rows],
        "metrics": [json.dumps(r.metrics, sort_keys=True, default=float) for r in rows],
        **{c: [r.scores.get(c) for r in rows] for c in SCORE_COLUMNS},
    }, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_manifest(rows: Iterable[ManifestRow], url: str) -> str:
    """Write ``rows`` as a Parquet file at ``url`` (local path or fsspec URL); returns ``url``."""
    data = manifest_bytes(rows)
    with fsspec.open(url, "wb") as f:
        f.write(data)
    return url


def read_manifest(url: str) -> list[ManifestRow]:
    """Read a manifest back. Raises :class:`InputFileError` when it is missing or not a manifest."""
    try:
        with fsspec.open(url, "rb") as f:
            table = pq.read_table(io.BytesIO(f.read()))
    except FileNotFoundError:
        raise InputFileError(f"manifest {redact(url)} not found; re-run the restyle that writes it") from None
    except (OSError, pa.ArrowException) as e:
        raise InputFileError(f"manifest {redact(url)} is not a readable Parquet file ({redact(e)}); re-run the restyle") from None
    missing = [n for n in SCHEMA.names if n not in table.column_names and n not in SCORE_COLUMNS]
    if missing:
        raise InputFileError(f"manifest {redact(url)} lacks column(s) {', '.join(missing)}; it was not written by dclip-ray")
    out = []
    for r in table.to_pylist():
        try:
            out.append(ManifestRow(key=r["key"], shard=r["shard"], status=r["status"], error=r["error"],
                                   sha256=r["sha256"], metrics=json.loads(r["metrics"] or "{}"),
                                   scores={c: float(r[c]) for c in SCORE_COLUMNS if r.get(c) is not None}))
        except ValueError as e:
            raise InputFileError(f"manifest {redact(url)}: bad row {r.get('key')!r} ({e})") from None
    return out

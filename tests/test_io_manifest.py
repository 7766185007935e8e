"""Parquet manifests and deterministic output shards (no Ray)."""

from __future__ import annotations

import hashlib
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.io.manifest import ManifestRow, manifest_bytes, read_manifest, write_manifest
from dclip_ray.io.shards import (
    ShardWriter,
    TarShardWriter,
    list_markers,
    read_marker,
    shard_urls,
    write_marker,
)

ROWS = [
    ManifestRow("k0", "00000", "ok", sha256="ab" * 32, metrics={"mean_abs_change": 0.25}),
    ManifestRow("k1", "00000", "error", error="zero-byte image"),
    ManifestRow("k2", "00000", "ok", sha256="cd" * 32),
]


def test_manifest_round_trip_schema_and_determinism(tmp_path):
    url = str(tmp_path / "00000.parquet")
    write_manifest(ROWS, url)
    assert read_manifest(url) == ROWS
    table = pq.read_table(url)
    assert table.column_names == ["key", "shard", "status", "error", "sha256", "metrics", "score", "direction",
                                  "structure", "background", "identity"]
    assert table.column("status").to_pylist() == ["ok", "error", "ok"]
    assert table.column("score").to_pylist() == [None, None, None], "an unscored row has null scores"
    assert json.loads(table.column("metrics")[0].as_py()) == {"mean_abs_change": 0.25}
    assert manifest_bytes(ROWS) == manifest_bytes(list(ROWS)), "same rows, same bytes"


def test_invalid_rows_and_files():
    with pytest.raises(ValueError, match="status"):
        ManifestRow("k", "s", "done", sha256="x")
    with pytest.raises(ValueError, match="sha256"):
        ManifestRow("k", "s", "ok")
    with pytest.raises(ValueError, match="reason"):
        ManifestRow("k", "s", "error")
    with pytest.raises(ValueError, match="score it was rejected for"):
        ManifestRow("k", "s", "rejected", error="low", sha256="ab")
    with pytest.raises(ValueError, match="sha256"):
        ManifestRow("k", "s", "rejected", error="low", scores={"score": 0.1})
    with pytest.raises(ValueError, match="unknown score"):
        ManifestRow("k", "s", "ok", sha256="ab", scores={"quality": 1.0})


def test_scores_are_columns_and_rejected_rows_round_trip(tmp_path):
    rows = [ManifestRow("k0", "s", "ok", sha256="ab" * 32, scores={"score": 0.75, "direction": 0.8, "structure": 0.9,
                                                                  "background": 0.001}),
            ManifestRow("k1", "s", "rejected", error="edit scored 0.1 < --min-score 0.5", sha256="cd" * 32,
                        scores={"score": 0.1, "direction": 0.2, "structure": 0.95, "background": 0.0125})]
    url = str(tmp_path / "m.parquet")
    write_manifest(rows, url)
    assert read_manifest(url) == rows
    table = pq.read_table(url)
    assert table.column("score").to_pylist() == [0.75, 0.1] and table.column("identity").to_pylist() == [None, None]
    assert table.column("status").to_pylist() == ["ok", "rejected"]


def test_a_manifest_from_before_the_score_columns_reads_with_no_scores(tmp_path):
    import pyarrow as pa

    old = pa.table({"key": ["k0"], "shard": ["s"], "status": ["ok"], "error": pa.array([None], pa.string()),
                    "sha256": ["ab"], "metrics": ["{}"]})
    pq.write_table(old, str(tmp_path / "old.parquet"))
    assert read_manifest(str(tmp_path / "old.parquet")) == [ManifestRow("k0", "s", "ok", sha256="ab")]


def test_missing_and_foreign_manifests_are_input_errors(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        read_manifest(str(tmp_path / "nope.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputFileError, match="not a readable Parquet"):
        read_manifest(str(tmp_path / "junk.parquet"))
    pq.write_table(__import__("pyarrow").table({"key": ["a"]}), str(tmp_path / "other.parquet"))
    with pytest.raises(InputFileError, match="lacks column"):
        read_manifest(str(tmp_path / "other.parquet"))


def _write_tar(url):
    w = TarShardWriter()
    w.write("k0", {"png": b"\x89PNG fake", "txt": b"a red circle", "json": b"{}"})
    w.write("dir/k1", {"png": b"second"})
    w.upload(url)
    w.discard()


def test_tar_is_byte_identical_on_rewrite_and_readable_by_webdataset(tmp_path):
    a, b = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
    _write_tar(a)
    _write_tar(b)
    assert hashlib.sha256(open(a, "rb").read()).digest() == hashlib.sha256(open(b, "rb").read()).digest()
    with tarfile.open(a) as t:
        members = t.getmembers()
        assert [m.name for m in members] == ["k0.json", "k0.png", "k0.txt", "dir/k1.png"]
        assert {m.mtime for m in members} == {0} and {m.uid for m in members} == {0}
    samples = list(wds.WebDataset(a, shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["k0", "dir/k1"]
    assert samples[0]["txt"] == b"a red circle" and samples[1]["png"] == b"second"


def test_keys_that_cannot_be_members_are_refused():
    with TarShardWriter() as w:
        for bad in ("a.b", "/abs", "../up", ""):
            with pytest.raises(ConfigError):
                w.write(bad, {"png": b"x"})


def test_markers(tmp_path):
    root = str(tmp_path / "out")
    urls = shard_urls(root, "00001")
    assert urls["marker"].endswith("out/00001_stats.json") and urls["tar"].endswith("00001.tar")
    assert read_marker(urls["marker"]) is None
    write_marker(urls["marker"], {"n": 3})
    assert read_marker(urls["marker"]) == {"n": 3}
    assert list_markers(root) == ["00001"]
    (tmp_path / "out" / "00002_stats.json").write_text("{truncated")
    assert read_marker(shard_urls(root, "00002")["marker"]) is None, "an unreadable marker is not a commit"


def test_the_shard_writer_hashes_the_tar_while_writing_it_and_commits_the_marker_last(tmp_path):
    """One writer: tar, manifest, marker last; the marker's sha256 and size are the uploaded tar's, also
    after duplicate keys were dropped (the tar is rewritten and hashed again)."""
    root = str(tmp_path / "out")
    w = ShardWriter(root, "00000")
    for k in ("a", "b", "c"):
        w.write(k, {"png": k.encode() * 100}, ManifestRow(k, "00000", "ok", sha256=hashlib.sha256(k.encode()).hexdigest()))
    w.error("bad", "undecodable image")
    w.drop({"b": "duplicate key"})
    marker = w.commit({"config_sha256": "x"}, order={"a": 0, "b": 1, "bad": 2, "c": 3})
    w.discard()
    tar = (tmp_path / "out" / "00000.tar").read_bytes()
    assert marker["tar_sha256"] == hashlib.sha256(tar).hexdigest() and marker["tar_bytes"] == len(tar)
    assert (marker["n"], marker["n_ok"], marker["n_error"]) == (4, 2, 2)
    assert read_marker(shard_urls(root, "00000")["marker"]) == marker
    rows = read_manifest(shard_urls(root, "00000")["manifest"])
    assert [(r.key, r.status) for r in rows] == [("a", "ok"), ("b", "error"), ("bad", "error"), ("c", "ok")]
    with tarfile.open(tmp_path / "out" / "00000.tar") as t:
        assert [m.name for m in t.getmembers()] == ["a.png", "c.png"]

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
from dclip_ray.io.shards import TarShardWriter, list_markers, read_marker, shard_urls, write_marker

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
    assert table.column_names == ["key", "shard", "status", "error", "sha256", "metrics"]
    assert table.column("status").to_pylist() == ["ok", "error", "ok"]
    assert json.loads(table.column("metrics")[0].as_py()) == {"mean_abs_change": 0.25}
    assert manifest_bytes(ROWS) == manifest_bytes(list(ROWS)), "same rows, same bytes"


def test_invalid_rows_and_files():
    with pytest.raises(ValueError, match="status"):
        ManifestRow("k", "s", "done", sha256="x")
    with pytest.raises(ValueError, match="sha256"):
        ManifestRow("k", "s", "ok")
    with pytest.raises(ValueError, match="reason"):
        ManifestRow("k", "s", "error")


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

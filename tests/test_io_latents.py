"""The latent store: round trip, commit marker last, the key guards against stale latents (no Ray)."""

from __future__ import annotations

import json

import pytest
import torch

from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.io.latents import LatentKey, LatentStore, StaleLatentError

KEY = LatentKey(base_sha256="a" * 64, t0=500, n_inv_steps=40, resolution=8)


def lat(n=3, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_round_trip_float32_exact_with_psnr_errors_and_source(tmp_path):
    store = LatentStore(str(tmp_path), KEY)
    z = lat()
    store.write("00000", ["k0", "k1", "k2"], z, recon_psnr=torch.tensor([30.0, 31.5, 29.0]),
                errors={"bad": "zero-byte image"}, source="/data/00000.tar")
    got = store.read("00000")
    assert got.keys == ["k0", "k1", "k2"]
    assert got.latents.dtype == torch.float32 and torch.equal(got.latents, z)
    assert got.recon_psnr.tolist() == [30.0, 31.5, 29.0]
    assert got.errors == {"bad": "zero-byte image"} and got.source == "/data/00000.tar"
    assert torch.equal(got.as_dict()["k1"], z[1])
    assert store.committed_shards() == ["00000"]
    assert (tmp_path / KEY.digest / "00000_stats.json").exists()


def test_float16_store_states_its_dtype_and_rounds(tmp_path):
    key = LatentKey(**{**KEY.__dict__, "dtype": "float16"})
    assert key.digest != KEY.digest, "the dtype is part of the key"
    store = LatentStore(str(tmp_path), key)
    z = lat()
    marker = store.write("s", ["a", "b", "c"], z)
    assert marker["dtype"] == "float16"
    got = store.read("s").latents
    assert got.dtype == torch.float16
    assert (got.float() - z).abs().max() < 5e-3


@pytest.mark.parametrize("field,value", [("base_sha256", "b" * 64), ("t0", 400), ("n_inv_steps", 20),
                                         ("resolution", 16), ("resize_policy", "pad")])
def test_every_key_field_changes_the_folder_and_nothing_is_reused(tmp_path, field, value):
    LatentStore(str(tmp_path), KEY).write("00000", ["k0", "k1", "k2"], lat())
    other = LatentKey(**{**KEY.__dict__, field: value})
    assert other.digest != KEY.digest
    store = LatentStore(str(tmp_path), other)
    assert not store.is_committed("00000") and store.committed_shards() == []
    with pytest.raises(InputFileError, match="run `dclip-ray precompute`"):
        store.read("00000")


def test_a_marker_of_another_key_in_the_folder_is_refused(tmp_path):
    """Even a file placed under the right folder name (e.g. copied by hand) is checked field by field."""
    store = LatentStore(str(tmp_path), KEY)
    store.write("00000", ["k0", "k1", "k2"], lat())
    marker_path = tmp_path / KEY.digest / "00000_stats.json"
    m = json.loads(marker_path.read_text())
    m["key"]["t0"] = 499
    marker_path.write_text(json.dumps(m))
    assert not store.is_committed("00000")
    with pytest.raises(StaleLatentError, match="re-run precompute"):
        store.read("00000")


def test_tensor_file_without_marker_is_not_committed_and_damage_is_detected(tmp_path):
    store = LatentStore(str(tmp_path), KEY)
    store.write("00000", ["k0", "k1", "k2"], lat())
    (tmp_path / KEY.digest / "00000_stats.json").unlink()  # a crash before the commit
    assert not store.is_committed("00000")
    store.write("00000", ["k0", "k1", "k2"], lat(seed=1))
    tensor = tmp_path / KEY.digest / "00000.safetensors"
    tensor.write_bytes(tensor.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(InputFileError, match="sha256"):
        store.read("00000")


def test_bad_writes_are_config_errors(tmp_path):
    store = LatentStore(str(tmp_path), KEY)
    with pytest.raises(ConfigError, match="duplicate"):
        store.write("s", ["a", "a", "b"], lat())
    with pytest.raises(ConfigError, match=r"\[N,3,H,W\]"):
        store.write("s", ["a", "b"], lat())
    with pytest.raises(ConfigError, match="dtype"):
        LatentKey("a" * 64, 500, 40, 8, dtype="int8")  # type: ignore[arg-type]


def test_memory_filesystem_url(tmp_path):
    store = LatentStore("memory://p6-latents", KEY)
    store.write("00003", ["x", "y", "z"], lat())
    assert store.read("00003").keys == ["x", "y", "z"]

"""Reliability without Ray: bad input of every kind, a property test of exactly-once, integrity checks.

Each bad input ends as an error row with its reason (the shard goes on) or a one-line error with exit
code 1 / 2, never a crash or a hang. The shard is restyled by the real unit of work
(:class:`dclip_ray.stages.restyle.ShardRestyler`) on tiny random UNets with 2 steps: bookkeeping is
under test, not the edit. The Ray scenarios (stuck shard, killed actor, lost node) are in
tests/test_reliability_ray.py.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pipeline_fixtures import interrupted_run, tiny_models

from dclip_ray.cli import main
from dclip_ray.io.manifest import read_manifest
from dclip_ray.models.cache import cached_base
from dclip_ray.stages import inputs as stage_inputs
from dclip_ray.stages.inputs import decode_shard, input_shards
from dclip_ray.stages.precompute import precompute_shard
from dclip_ray.stages.restyle import ShardRestyler
from dclip_ray.stages.restyle_config import build_restyle_config
from dclip_ray.stages.verify import verify

T0, N_INV, N_GEN = 200, 2, 2
RED = (200, 30, 30)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_tar(path, members) -> str:
    with tarfile.open(path, "w") as tar:
        for m in members:
            add(tar, *m)
    return str(path)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb if decoded)."""
    data = bytearray(encode(Image.new("L", (16, 16), 0)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # width, height, depth, colour, ...
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"), T0)


def restyle(models, data: str, out: str) -> list[dict]:
    cfg = build_restyle_config(out, models=[models["ft"]], n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)
    r = ShardRestyler(cfg)
    return [r.run(n, p) for n, p in input_shards(data)]


def tar_keys(path: str) -> list[str]:
    with tarfile.open(path) as t:
        return list(dict.fromkeys(n.split(".", 1)[0] for n in t.getnames()))


# ---- 1. every bad member of a shard: an error row with its reason -------------------------------------

GOOD = encode(Image.new("RGB", (40, 30), RED))
JPEG = encode(Image.new("RGB", (64, 64), RED), "JPEG")

BAD_MEMBERS = {  # key: (members, reason expected in the error row)
    "zero": ([("zero.png", b"")], "zero-byte image"),
    "truncjpg": ([("truncjpg.jpg", JPEG[: len(JPEG) // 2])], "truncated image"),
    "notimage": ([("notimage.jpg", b"this is a text file, not an image")], "undecodable image"),
    "onlyjson": ([("onlyjson.json", b'{"caption": "x"}')], "no image member"),
    "bomb": ([("bomb.png", bomb_png())], "decompression bomb"),
    "bomb2": ([("bomb2.png", bomb_png(10000, 10000))], "decompression bomb"),
    "img": ([("img.1.png", GOOD)], "has a dot in its key"),
    "dup": ([], "duplicate key: 2 samples named 'dup'"),  # members placed below, apart from each other
    "../escape": ([("../escape.png", GOOD)], "unsafe member name"),
    "/etc/abs": ([("/etc/abs.png", GOOD)], "unsafe member name"),
    "symlink": ([("symlink.png", b"", tarfile.SYMTYPE, "/etc/passwd")], "not a regular file"),
    "hardlink": ([("hardlink.png", b"", tarfile.LNKTYPE, "ok1.png")], "not a regular file"),
}


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    members = [("ok1.png", GOOD), ("ok1.txt", b"caption one"), ("dup.png", GOOD)]
    for ms, _ in BAD_MEMBERS.values():
        members += ms
    members += [("dup.png", JPEG), ("ok2.jpg", JPEG)]
    data = root / "data"
    data.mkdir()
    write_tar(data / "bad.tar", members)
    keys = ["ok1", "dup"] + [k for k in BAD_MEMBERS if k != "dup"] + ["ok2"]
    return str(data), keys


def test_every_bad_member_is_an_error_row_with_its_reason_and_nothing_escapes(models, bad_shard, tmp_path):
    data, keys = bad_shard
    out = tmp_path / "out"
    [s] = restyle(models, data, str(out))
    assert (s["n"], s["n_ok"], s["n_error"]) == (len(keys), 2, len(BAD_MEMBERS))
    rows = read_manifest(str(out / "ft" / "bad.parquet"))
    assert [r.key for r in rows] == keys, "one row per input key, in input order, the duplicate once"
    errors = {r.key: r.error for r in rows if r.status == "error"}
    for key, (_, reason) in BAD_MEMBERS.items():
        assert reason in errors[key], (key, errors[key])
    assert tar_keys(str(out / "ft" / "bad.tar")) == ["ok1", "ok2"], "only the good keys are in the output tar"
    report = verify(str(out), data)
    assert report.ok, report.problems
    marker = json.loads((out / "ft" / "bad_stats.json").read_text())
    assert marker["tar_bytes"] == os.path.getsize(out / "ft" / "bad.tar") and marker["n_error"] == len(BAD_MEMBERS)
    # nothing was written outside the output folder (the ../ and absolute names are never paths)
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["ft"], "one folder per model"
    assert sorted(os.listdir(out / "ft")) == ["bad.parquet", "bad.tar", "bad_stats.json"]
    assert not os.path.exists("/etc/abs.png") and not (tmp_path.parent / "escape.png").exists()


def test_precompute_gives_the_same_reasons_and_drops_both_samples_of_a_duplicate(models, bad_shard, tmp_path):
    from dclip_ray.io.latents import LatentKey, LatentStore

    data, keys = bad_shard
    base = cached_base(models["base"])
    key = LatentKey(base.sha256, T0, N_INV, 32)
    s = precompute_shard(models["base"], None, "bad", f"{data}/bad.tar", str(tmp_path), key, batch_size=4)
    assert (s["n"], s["n_ok"], s["n_error"]) == (len(keys), 2, len(BAD_MEMBERS))
    assert set(s["errors"]) == set(BAD_MEMBERS) and "duplicate key" in s["errors"]["dup"]
    assert LatentStore(str(tmp_path), key).read("bad").keys == ["ok1", "ok2"]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "RGBA-half", "CMYK", "I;16"])
def test_unusual_image_modes_decode_to_the_right_rgb_pixels_through_a_shard(tmp_path, mode):
    if mode == "L":
        img, want = Image.new("L", (24, 24), 77), (77, 77, 77)
    elif mode == "LA":
        img, want = Image.new("LA", (24, 24), (77, 255)), (77, 77, 77)
    elif mode == "P":
        img, want = Image.new("RGB", (24, 24), RED).convert("P", palette=Image.ADAPTIVE), RED
    elif mode == "RGBA":
        img, want = Image.new("RGBA", (24, 24), RED + (255,)), RED
    elif mode == "RGBA-half":  # alpha 128 composited on white
        img, want = Image.new("RGBA", (24, 24), (0, 0, 255, 128)), (127, 127, 255)
    elif mode == "CMYK":
        img = Image.new("CMYK", (24, 24), (0, 200, 200, 40))
        want = Image.new("CMYK", (1, 1), (0, 200, 200, 40)).convert("RGB").getpixel((0, 0))
    else:
        img, want = Image.fromarray(np.full((24, 24), 40000, dtype=np.uint16)), (156, 156, 156)  # 40000/65535*255
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = write_tar(tmp_path / "m.tar", [("k.png" if fmt == "PNG" else "k.jpg", encode(img, fmt))])
    [d] = list(decode_shard(path, 16, "resize"))
    assert d.error is None, d.error
    rgb = ((d.x + 1) * 127.5).round().permute(1, 2, 0).numpy()  # [H,W,3] in 0..255
    tol = 4 if fmt == "JPEG" else 1
    assert np.abs(rgb - np.array(want, dtype=np.float32)).max() <= tol, (mode, rgb[8, 8], want)


def png16(shared: int, other: int) -> bytes:
    """A 16x16 16-bit grayscale PNG: the left half ``shared``, the right half ``other``."""
    arr = np.full((16, 16), shared, dtype=np.uint16)
    arr[:, 8:] = other
    return encode(Image.fromarray(arr))


def test_16_bit_png_brightness_is_a_fixed_scale_not_the_image_maximum():
    """Issue 17 item 9: a pixel of 100 stayed 100 when the maximum was 255 and became 0 when it was 256."""
    from dclip_ray.io.images import decode_image

    for shared in (100, 25700, 40000):
        seen = []
        for maximum in (255, 256, 65535):
            img = Image.open(io.BytesIO(png16(shared, maximum)))
            assert img.mode == "I;16", "the test needs a 16-bit decode"
            seen.append(int(np.asarray(decode_image(png16(shared, maximum)))[0, 0, 0]))
        assert seen == [round(shared / 257)] * 3, (shared, seen)


def test_reasons_are_deterministic_so_two_clean_runs_write_the_same_manifest_bytes(models, bad_shard, tmp_path,
                                                                                    monkeypatch):
    """Issue 17 item 8: PIL's reason named ``<_io.BytesIO object at 0x...>``: every run wrote other bytes."""
    data, _ = bad_shard
    for name in ("a", "b"):
        restyle(models, data, str(tmp_path / name))
    rows = read_manifest(str(tmp_path / "a" / "ft" / "bad.parquet"))
    errors = {r.key: r.error for r in rows if r.status == "error"}
    assert errors["notimage"].startswith("undecodable image: UnidentifiedImageError: cannot identify image file")
    assert not [e for e in errors.values() if "0x" in e], errors
    assert (tmp_path / "a" / "ft" / "bad.parquet").read_bytes() == (tmp_path / "b" / "ft" / "bad.parquet").read_bytes()
    # any exception text that becomes a reason loses its addresses, not only PIL's
    marker = object()

    def boom(*args, **kwargs):
        raise RuntimeError(f"decoder {marker!r} failed")

    monkeypatch.setattr(stage_inputs, "load_image_tensor", boom)
    path = write_tar(tmp_path / "g.tar", [("k.png", GOOD)])
    [d] = list(decode_shard(path, 16))
    assert d.error == "undecodable image: RuntimeError: decoder <object object> failed"


def test_a_truncated_tar_is_an_error_of_its_shard_and_never_committed(models, tmp_path):
    """Issue 30 item 1: the keys before the cut were committed as a done shard; the keys after it were
    lost without an error. Now nothing of the shard is committed, the result says why, verify says so."""
    data = tmp_path / "data"
    data.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(4):
            add(tar, f"k{i}.png", GOOD)
    assert len(GOOD) < 512, "each member: a 512-byte header + one 512-byte data block"
    (data / "cut.tar").write_bytes(buf.getvalue()[: 5 * 512 + len(GOOD) // 2])  # inside k2's data
    write_tar(data / "good.tar", [("g0.png", GOOD)])
    s, good = restyle(models, str(data), str(tmp_path / "out"))
    assert s["n_ok"] == 0 and "truncated or corrupt" in s["truncated"] and good["n_ok"] == 1
    assert not os.path.exists(tmp_path / "out" / "ft" / "cut_stats.json")
    report = verify(str(tmp_path / "out"), str(data))
    assert not report.ok and any("cut cannot be read to its end" in p for p in report.problems)


def test_duplicate_keys_across_shards_are_restyled_and_reported_by_verify(models, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "a.tar", [("same.png", GOOD), ("a1.png", GOOD)])
    write_tar(data / "b.tar", [("same.png", JPEG)])
    out = tmp_path / "out"
    res = restyle(models, str(data), str(out))
    assert sum(r["n_ok"] for r in res) == 3, "the output is keyed by (shard, key): both are restyled"
    capsys.readouterr()
    assert main(["verify", str(out), "--input", str(data)]) == 2
    assert "'same' in ['a', 'b']" in capsys.readouterr().err


# ---- 1b. bad files and arguments: one line, exit code 1 ---------------------------------------------------


def test_bad_model_files_and_prompt_files_are_one_line_errors_with_exit_1(models, bad_shard, tmp_path, capsys):
    data, _ = bad_shard
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    broken_dir = tmp_path / "broken_unet"
    broken_dir.mkdir()
    (broken_dir / "config.json").write_text("{ not json")
    cases = [
        (["precompute", "--model", str(garbage), "--input", data, "--out", str(tmp_path / "l")], "not a PyTorch checkpoint"),
        (["precompute", "--model", str(empty), "--input", data, "--out", str(tmp_path / "l")], "not a readable safetensors"),
        (["restyle", "--input", data, "--out", str(tmp_path / "o"), "--model", str(broken_dir), "--base", models["base"],
          "--dry-run"], "unreadable config.json"),
        (["restyle", "--input", data, "--out", str(tmp_path / "o"), "--model", models["ft"], "--shard-timeout", "0"],
         "--shard-timeout 0"),
    ]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle -> blue circle\nred circle -> -> x\n")
    cases.append((["finetune-many", str(prompts), "--model", models["base"], "--out", str(tmp_path / "m"),
                   "--images", data, "--clip", "toy_clip"], "prompts.txt:2:"))
    for argv, what in cases:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and what in err and "\n" not in err, (argv, err)
    assert not any(os.path.exists(tmp_path / d) for d in ("l", "o", "m")), "nothing was started"


# ---- property: for any mix of good and bad members, output + errors == input, disjoint -------------------

KINDS = ["good", "jpeg", "gray", "rgba", "zero", "trunc", "text", "noimg", "link", "dot", "escape", "dup"]


def build_members(kinds: list[str]) -> tuple[list[tuple], list[str]]:
    members, keys = [], []
    for i, kind in enumerate(kinds):
        k = f"k{i}"
        if kind == "dup" and keys:
            k = keys[0]
            kind = "good"
        m = {
            "good": [(f"{k}.png", GOOD), (f"{k}.txt", b"caption")],
            "jpeg": [(f"{k}.jpg", JPEG)],
            "gray": [(f"{k}.png", encode(Image.new("L", (20, 20), 9)))],
            "rgba": [(f"{k}.png", encode(Image.new("RGBA", (20, 20), (1, 2, 3, 4))))],
            "zero": [(f"{k}.png", b"")],
            "trunc": [(f"{k}.jpg", JPEG[:300])],
            "text": [(f"{k}.png", b"hello")],
            "noimg": [(f"{k}.json", b"{}")],
            "link": [(f"{k}.png", b"", tarfile.SYMTYPE, "../../x")],
            "dot": [(f"{k}.v2.png", GOOD)],
            "escape": [(f"../{k}.png", GOOD)],
            "dup": [(f"{k}.png", GOOD)],
        }[kind]
        if kind == "escape":
            k = f"../{k}"
        members += m
        keys.append(k)
    return members, list(dict.fromkeys(keys))


@pytest.fixture(scope="module")
def property_restyler(models):
    cfg = build_restyle_config("/nonexistent", models=[models["ft"]], n_inv_steps=N_INV, n_gen_steps=N_GEN,
                                    batch_size=3)
    return ShardRestyler(cfg)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=0, max_size=7))
def test_property_output_plus_errors_equals_input_and_disjoint(property_restyler, tmp_path_factory, kinds):
    root = tmp_path_factory.mktemp("prop")
    data = root / "data"
    data.mkdir()
    members, keys = build_members(kinds)
    write_tar(data / "s.tar", members)
    out = root / "out"
    property_restyler.cfg.variants[0].out = str(out)
    s = property_restyler.run("s", str(data / "s.tar"))
    rows = read_manifest(str(out / "s.parquet"))
    ok = [r.key for r in rows if r.status == "ok"]
    err = [r.key for r in rows if r.status == "error"]
    assert set(ok).isdisjoint(err) and len(ok) + len(err) == len(rows)
    assert sorted(ok + err) == sorted(keys), "every input key exactly once: in the output or as an error row"
    assert tar_keys(str(out / "s.tar")) == ok, "the tar holds exactly the ok keys"
    assert all(r.error for r in rows if r.status == "error")
    assert s["n_ok"] == len(ok) and s["n_error"] == len(err)
    assert verify(str(out), str(data)).ok


# ---- 4. integrity: verify detects damage -------------------------------------------------------------------


@pytest.fixture(scope="module")
def restyled(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    data = root / "data"
    data.mkdir()
    for s in ("a", "b", "c"):
        write_tar(data / f"{s}.tar", [(f"{s}{i}.png", GOOD) for i in range(3)])
    out = root / "out"
    restyle(models, str(data), str(out))
    assert verify(str(out), str(data)).ok
    return str(data), str(out)


def damaged_copy(restyled, tmp_path):
    import shutil

    data, out = restyled
    shutil.copytree(out, tmp_path / "out")
    return data, str(tmp_path / "out")


def test_verify_detects_a_flipped_byte_in_an_output_shard(restyled, tmp_path, capsys):
    data, out = damaged_copy(restyled, tmp_path)
    with tarfile.open(f"{out}/ft/a.tar") as t:
        offset = t.getmember("a1.png").offset_data + 40  # a byte inside the image data
    raw = bytearray(open(f"{out}/ft/a.tar", "rb").read())
    raw[offset] ^= 0x01
    open(f"{out}/ft/a.tar", "wb").write(bytes(raw))
    problems = "\n".join(verify(out, data).problems)
    assert "a: the tar's sha256 differs from its commit marker" in problems
    assert "'a1' image sha256 differs from the manifest" in problems
    capsys.readouterr()
    assert main(["verify", out, "--input", data]) == 2


def test_verify_detects_a_missing_shard_and_a_missing_tar(restyled, tmp_path):
    data, out = damaged_copy(restyled, tmp_path)
    for f in ("b.tar", "b.parquet", "b_stats.json"):
        os.remove(f"{out}/ft/{f}")
    os.remove(f"{out}/ft/c.tar")
    problems = "\n".join(verify(out, data).problems)
    assert "b: not committed" in problems and "c.tar unreadable" in problems


def test_verify_detects_a_manifest_that_disagrees_with_its_tar(restyled, tmp_path):
    from dclip_ray.io.manifest import ManifestRow, write_manifest

    data, out = damaged_copy(restyled, tmp_path)
    rows = read_manifest(f"{out}/ft/a.parquet")
    rows[0] = ManifestRow(rows[0].key, rows[0].shard, "error", error="made up")  # tar still holds a0
    write_manifest(rows, f"{out}/ft/a.parquet")
    problems = "\n".join(verify(out, data).problems)
    assert "tar holds 'a0', which is not an ok row" in problems and "marker counts" in problems


def test_a_marker_whose_tar_was_replaced_is_not_taken_as_committed(models, restyled, tmp_path):
    data, out = damaged_copy(restyled, tmp_path)
    with open(f"{out}/ft/a.tar", "ab") as f:
        f.write(b"\0" * 512)  # a replaced / half-uploaded tar of another size
    res = {r["shard"]: r for r in restyle(models, data, out)}
    assert not res["a"]["skipped"] and res["b"]["skipped"] and res["c"]["skipped"]
    assert verify(out, data).ok


# ---- 1c. `dclip-ray edit` on the toy world: duplicate keys, defective outputs, mix weights ---------------


@pytest.fixture(scope="module")
def toy_input(tmp_path_factory):
    """Two toy shards of 2 keys each, plus a copy of the first under another name: keys 0_000000 and
    0_000001 name two samples each (in 00000.tar and 00002.tar), 0_000002 and 0_000003 one."""
    import shutil

    from dclip_ray.toyworld.data import write_shards

    data = tmp_path_factory.mktemp("toy") / "data"
    write_shards(str(data), 4, seed=0, shard_size=2, colours=["red"], shapes=["circle"])
    shutil.copy(data / "00000.tar", data / "00002.tar")
    return str(data)


def toy_edit(out, images: str, *extra: str) -> list[str]:
    from dclip_ray.models import get_preset

    return ["edit", "--model", "toy_shapes", "--images", images, "--out", str(out), "--n-inv", "2", "--n-gen", "2",
            "--json", *(extra or ("--finetuned", str(get_preset("toy_shapes").weights_path())))]


def test_edit_makes_duplicate_keys_error_rows_and_counts_only_the_files_it_wrote(toy_input, tmp_path, capsys):
    """Issue 17 item 10: two shards with the same keys gave "n_edited: 16", 8 files written, exit 0."""
    assert main(toy_edit(tmp_path / "out", toy_input)) == 2
    out = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0_000002.png", "0_000003.png"]
    assert out["n_edited"] == 2
    errors = {e["key"]: e for e in out["errors"]}
    assert sorted(errors) == ["0_000000", "0_000001"]
    for key, e in errors.items():
        assert e["error"].startswith(f"duplicate key: 2 samples named {key!r} in the input"), e
        assert "none was used" in e["error"] and e["shard"].endswith("00002.tar") and "00000.tar" in e["shard"]


def test_edit_never_writes_a_non_finite_or_blank_image(toy_input, tmp_path, capsys, monkeypatch):
    """Issue 17 item 4: a NaN weight gave black outputs with exit 0. A generated image that is NaN or one
    colour becomes an error entry and no file, whatever the cause (here: a patched generator)."""
    import dclip_ray.stages.restyle as restyle

    real, calls = restyle.generate, []

    def broken(*args, **kwargs):  # the first batch generated (shard 00000: keys 0_000000, 0_000001)
        x = real(*args, **kwargs)
        if not calls:
            x[0] = float("nan")  # a diverged model
            x[1] = -1.0  # a collapsed one: all black
        calls.append(1)
        return x

    monkeypatch.setattr(restyle, "generate", broken)
    single = tmp_path / "single"
    single.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (single / name).write_bytes((Path(toy_input) / name).read_bytes())
    assert main(toy_edit(tmp_path / "out", str(single))) == 2
    out = json.loads(capsys.readouterr().out)
    errors = {e["key"]: e["error"] for e in out["errors"]}
    assert errors["0_000000"].startswith("non-finite output: 3072 of 3072 values are NaN")
    assert errors["0_000001"].startswith("blank output: every pixel is (0,0,0)")
    assert out["n_edited"] == 2 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0_000002.png",
                                                                                         "0_000003.png"]


@pytest.mark.parametrize("weights, named", [("[.nan, 1]", "gamma.weights[0] = nan"),
                                            ("[1, .inf]", "gamma.weights[1] = inf")])
def test_a_non_finite_mix_weight_is_a_one_line_config_error_before_any_work(toy_input, tmp_path, capsys, weights,
                                                                            named):
    """Issue 17 item 4: NaN passes the sum-to-1 check (every comparison with NaN is False)."""
    from dclip_ray.models import get_preset

    base = get_preset("toy_shapes").weights_path()
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"models: [{base}, {base}]\ngamma: {{type: constant, weights: {weights}}}\n")
    for argv in (toy_edit(tmp_path / "e", toy_input, "--mix", str(mix)),
                 ["restyle", "--input", toy_input, "--out", str(tmp_path / "r"), "--mix", str(mix), "--dry-run"]):
        assert main(argv) == 1, argv
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith(f"error: mix file {mix}: {named}: every gamma weight must be a finite number"), err
        assert "\n" not in err
        if "--json" in argv:  # a failure prints a JSON object too
            assert json.loads(captured.out) == {"status": "error", "exit_code": 1, "error": err[len("error: "):]}
    assert not (tmp_path / "e").exists() and not (tmp_path / "r").exists(), "nothing was started"


def test_a_negative_mix_weight_is_allowed_and_printed(toy_input, tmp_path, capsys):
    from dclip_ray.models import get_preset

    base = get_preset("toy_shapes").weights_path()
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"models: [{base}, {base}]\ngamma: {{type: constant, weights: [-0.5, 1.5]}}\n")
    assert main(toy_edit(tmp_path / "e", toy_input, "--mix", str(mix))) == 2  # the duplicate keys
    err = capsys.readouterr().err.strip().splitlines()
    notes = [ln for ln in err if ln.startswith("warning: ")]
    assert notes == [f"warning: mix file {mix}: negative gamma weight -0.5: that model's edit is subtracted "
                     "(a task vector); check that this is intended"], err


# ---- 1d. SIGINT / SIGTERM: one line, exit code 3, the run ledger says "interrupted" --------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_exits_3_with_one_line_and_records_interrupted_in_the_ledger(tmp_path, sig):
    """Issue 17 item 6: Ctrl-C exited 130 with no message while runs.jsonl said exit_code 3 "crashed"."""
    import signal

    out = tmp_path / "out"
    rc, stdout, stderr = interrupted_run(
        tmp_path, "dclip_ray.pipeline.workflow_run.ensure_toyworld_input",
        ["run", str(ROOT / "workflows" / "toy.yaml"), "--set", f"outputs.root={out}", "--json"],
        getattr(signal, sig))
    line = f"error: interrupted ({sig}); re-run the same command to resume"
    assert (rc, stderr.strip()) == (3, line), (rc, stderr)
    assert json.loads(stdout) == {"status": "interrupted", "exit_code": 3, "error": line[len("error: "):]}
    [record] = [json.loads(ln) for ln in (out / "runs.jsonl").read_text().splitlines()]
    assert (record["status"], record["exit_code"]) == ("interrupted", 3)
    assert record["error"] == f"interrupted ({sig}); re-run the same spec to resume"
    assert record["steps"]["input"]["status"].startswith("failed: interrupted"), record["steps"]


@pytest.mark.parametrize("command, sig", [("restyle", "SIGINT"), ("edit", "SIGTERM")])
def test_every_command_stops_on_sigint_and_sigterm_with_one_line_and_exit_3(tmp_path, command, sig):
    import signal

    if command == "restyle":
        target = "dclip_ray.stages.restyle_config.build_restyle_config"
        argv = ["restyle", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", "m"]
    else:
        target = "dclip_ray.stages.edit.cached_base"
        argv = ["edit", "--model", "toy_shapes", "--finetuned", "ft", "--images", "in", "--out", "out"]
    rc, stdout, stderr = interrupted_run(tmp_path, target, argv, getattr(signal, sig))
    assert (rc, stderr.strip(), stdout) == (3, f"error: interrupted ({sig}); re-run the same command to resume", "")


def test_an_interrupted_finetune_without_checkpoint_dir_says_nothing_was_saved(tmp_path):
    """Issue 31 item 3: it promised a resume that does not exist."""
    import signal

    argv = ["finetune", "--model", "toy_shapes", "--source", "a", "--target", "b", "--images", "in", "--out", "ft"]
    rc, stdout, stderr = interrupted_run(tmp_path, "dclip_ray.jobs.load_base", argv, signal.SIGINT)
    assert rc == 3 and stderr.strip() == ("error: interrupted (SIGINT); nothing was saved (no --checkpoint-dir): a "
                                          "re-run starts from the first step; pass --checkpoint-dir DIR to resume "
                                          "next time"), stderr


def test_a_signal_while_ray_starts_is_raised_once_it_is_up_never_lost_to_its_handler():
    """Issue 30 item 10: a SIGTERM during ``ray.init`` (its first seconds) met Ray's own handler and the
    command exited 15 with no message. Inside deferred_interrupts a library cannot install a SIGTERM or
    SIGINT handler, and a signal is raised as Interrupted (exit 3, one line) once the block ends."""
    import signal

    from dclip_ray.errors import Interrupted
    from dclip_ray.interrupts import deferred_interrupts, interrupt_handlers

    seen = []
    with interrupt_handlers():
        with pytest.raises(Interrupted) as e:
            with deferred_interrupts():
                signal.signal(signal.SIGTERM, lambda *_: seen.append("library"))  # what ray.init does
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):  # handlers run between bytecodes: noted, not raised here
                    pass
                seen.append("finished")
        assert e.value.signame == "SIGTERM" and seen == ["finished"]
        with deferred_interrupts():  # no signal: nothing raised, other signals pass through
            previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
            signal.signal(signal.SIGUSR1, previous)
        with pytest.raises(Interrupted):  # armed again after the block
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                pass


_TEARDOWN_TRAP = """
import atexit, os, sys

class _AbortsAtTeardown:  # stands in for a native library's static object whose teardown aborts
    def __del__(self):
        os.write(2, b"teardown ran\\n")
        os.abort()

_trap = _AbortsAtTeardown()
atexit.register(lambda: open(os.environ["ATEXIT_FLAG"], "w").close())

import threading, time

def _in_main(frame):
    while frame is not None:
        if frame.f_code.co_name == "main" and "dclip_ray" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False

def _late_writer():  # a non-daemon thread still working when the command has returned: waited for, as Python does
    seen = False
    while True:
        running = _in_main(sys._current_frames().get(threading.main_thread().ident))
        if seen and not running:
            break
        seen = seen or running
        time.sleep(0.005)
    time.sleep(0.5)
    open(os.environ["ATEXIT_FLAG"] + ".thread", "w").close()

threading.Thread(target=_late_writer).start()
"""


def test_native_teardown_never_decides_the_exit_code(tmp_path):
    """Issue 30 item 16: an `edit` that had printed its summary exited 134 ("terminate called without an
    active exception") in about 1 of 45 runs: a native library's teardown aborting after our work. The
    console script ends with exit_now: atexit hooks and flushes run, the interpreter's teardown does not.
    The trap (a sitecustomize whose module object aborts when torn down) gave 134 before."""
    import subprocess
    import sys

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_TEARDOWN_TRAP)
    flag = tmp_path / "atexit-ran"
    env = {**os.environ, "PYTHONPATH": str(site), "ATEXIT_FLAG": str(flag)}
    script = os.path.join(os.path.dirname(sys.executable), "dclip-ray")
    for argv, code in ((["recipes", "list"], 0), (["recipes", "show", "no-such-recipe"], 1)):
        flag.unlink(missing_ok=True)
        proc = subprocess.run([script, *argv], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, (argv, proc.returncode, proc.stderr[-1000:])
        assert "teardown ran" not in proc.stderr and flag.exists(), (argv, proc.stderr[-1000:])
        assert Path(f"{flag}.thread").exists(), "a non-daemon thread finishes before the process ends"
        Path(f"{flag}.thread").unlink()
    assert proc.stderr.startswith("error: ") and "no-such-recipe" in proc.stderr
    listing = subprocess.run([script, "recipes", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listing.stdout.startswith("paper:") and listing.stdout.endswith("\n")  # flushed whole


def test_json_commands_print_a_json_object_on_a_usage_error_too(capsys):
    assert main(["edit", "--model", "toy_shapes", "--json"]) == 1  # --images and --out missing
    out = json.loads(capsys.readouterr().out)
    assert out == {"status": "error", "exit_code": 1, "error": "Missing option '--images'."}


def test_edit_is_restyle_on_one_machine_committed_shards_resume_and_verify(toy_input, tmp_path, capsys):
    """Issue 18 item 3: edit writes the restyle shard outputs (tar, manifest, marker last) beside --out; a
    re-run skips the committed shards and changes nothing; `verify` checks them like a restyle's."""
    from dclip_ray.stages.edit import state_dir

    single = tmp_path / "single"
    single.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (single / name).write_bytes((Path(toy_input) / name).read_bytes())
    out = tmp_path / "out"
    assert main(toy_edit(out, str(single))) == 0
    first = json.loads(capsys.readouterr().out)
    pngs = {p.name: p.read_bytes() for p in out.iterdir()}
    state = state_dir(str(out))
    assert first["n_edited"] == 4 and len(pngs) == 4 and first["shards"] == state
    assert sorted(os.listdir(state)) == sorted([f"0000{i}{ext}" for i in (0, 1)
                                                for ext in (".parquet", ".tar", "_stats.json")] + ["dclip_run.json", "written.json"])
    assert verify(state, str(single)).ok
    stamps = {f: os.path.getmtime(os.path.join(state, f)) for f in os.listdir(state)}
    assert main(toy_edit(out, str(single))) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["n_edited"] == 4 and again["errors"] == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == pngs
    assert {f: os.path.getmtime(os.path.join(state, f)) for f in os.listdir(state)} == stamps, "nothing rewritten"

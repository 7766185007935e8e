"""Image inputs: folders, tar shards (brace lists, globs), unsafe members, truncated shards."""

from __future__ import annotations

import io
import tarfile

import pytest
from PIL import Image

from dclip_ray.errors import InputFileError
from dclip_ray.io.sources import iter_records, split_member


def png(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]], links: list[str] = ()):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)


def test_split_member_follows_webdataset():
    assert split_member("a/b/000123.jpg") == ("a/b/000123", "jpg")
    assert split_member("k.seg.png") == ("k", "seg.png")


def test_shards_brace_lists_and_globs(tmp_path):
    for s in range(3):
        write_tar(tmp_path / f"{s:05d}.tar",
                  [m for i in range(4) for m in ((f"{s}_{i}.png", png()), (f"{s}_{i}.txt", b"caption"))])
    recs = list(iter_records(str(tmp_path / "{00000..00002}.tar")))
    assert [r.key for r in recs][:5] == ["0_0", "0_1", "0_2", "0_3", "1_0"]
    assert len(recs) == 12 and all(r.error is None and r.extras == {"txt": b"caption"} for r in recs)
    assert len(list(iter_records(str(tmp_path / "*.tar")))) == 12
    assert len(list(iter_records(str(tmp_path)))) == 12, "a folder of shards reads its .tar files"
    assert len(list(iter_records(str(tmp_path), limit=5))) == 5
    assert len(list(iter_records("file://" + str(tmp_path / "00001.tar")))) == 4


def test_unsafe_and_incomplete_members_become_error_records(tmp_path):
    write_tar(tmp_path / "bad.tar", [("good.png", png()), ("../escape.png", png()), ("/abs.png", png()),
                                     ("nocaption.txt", b"x")], links=["link.png"])
    recs = {r.key: r for r in iter_records(str(tmp_path / "bad.tar"))}
    assert recs["good"].error is None
    assert "unsafe" in recs["../escape"].error and "unsafe" in recs["/abs"].error
    assert "not a regular file" in recs["link"].error
    assert "no image member" in recs["nocaption"].error


def test_truncated_tar_keeps_what_was_read_and_raises(tmp_path):
    write_tar(tmp_path / "t.tar", [(f"k{i}.png", png()) for i in range(6)])
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: 3 * 1024 + 512 + 30])  # inside the 4th member's data
    seen = []
    with pytest.raises(InputFileError, match="truncated"):
        for r in iter_records(str(tmp_path / "t.tar")):
            seen.append(r)
    assert [r.key for r in seen] == ["k0", "k1", "k2", "k3"] and "truncated" in seen[-1].error


def test_folder_of_images_and_missing_input(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "sub" / "b.v2.jpg").write_bytes(png())
    (tmp_path / "notes.txt").write_text("ignored")
    recs = list(iter_records(str(tmp_path)))
    assert [r.key for r in recs] == ["a", "sub/b_v2"]
    with pytest.raises(InputFileError, match="no such file"):
        list(iter_records(str(tmp_path / "missing")))

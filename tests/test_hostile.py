"""Issue 30, by family: hostile shards (unreadable files, repeated keys, keys a tar cannot store, images
that are small on disk and huge in memory). Each family is caught by one rule, whatever the case."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_fixtures import tiny_models

from dclip_ray.cli import main
from dclip_ray.io.images import MAX_DECODE_BYTES, ImageError, decode_bytes, decode_image
from dclip_ray.io.manifest import read_manifest
from dclip_ray.io.shards import list_markers
from dclip_ray.io.sources import iter_records
from dclip_ray.stages.inputs import input_shards
from dclip_ray.stages.restyle import ShardRestyler
from dclip_ray.stages.restyle_config import build_restyle_config
from dclip_ray.stages.verify import verify
from dclip_ray.toyworld import render

T0, N_INV, N_GEN = 200, 2, 2


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render("red", "circle", seed=seed)[0]).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"), T0)


def unreadable_inputs(root) -> tuple[str, dict[str, str]]:
    """A folder of one good shard and one of each way a tar can fail to be read."""
    data = root / "data"
    data.mkdir()
    write_tar(data / "good.tar", [("g0.png", png(0)), ("g1.png", png(1))])
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for i in range(3):
            d = png(i)
            info = tarfile.TarInfo(f"c{i}.png")
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
    bad = {"empty": b"", "garbage": os.urandom(3000), "cut": whole.getvalue()[:1500]}
    for name, data_ in bad.items():
        (data / f"{name}.tar").write_bytes(data_)
    return str(data), {n: str(data / f"{n}.tar") for n in bad}


def test_an_unreadable_shard_is_an_error_of_that_shard_never_done(models, tmp_path):
    """A 0-byte shard among good ones was committed as done with 0 keys (exit 0, verify OK)."""
    data, bad = unreadable_inputs(tmp_path)
    out = str(tmp_path / "out")
    cfg = build_restyle_config(out, models=[models["ft"]], n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)
    r = ShardRestyler(cfg)
    results = {n: r.run(n, p) for n, p in input_shards(data)}
    assert results["good"].n_ok == 2 and not results["good"].truncated
    for name in bad:
        assert results[name].truncated, name
    assert list_markers(f"{out}/ft") == ["good"], "nothing of an unreadable shard is committed"
    report = verify(out, data)
    assert not report.ok and sum("cannot be read to its end" in p for p in report.problems) == 3
    again = {n: r.run(n, p) for n, p in input_shards(data)}
    assert again["good"].skipped and all(not again[n].skipped and again[n].truncated for n in bad), "tried again"


def test_precompute_commits_no_unreadable_shard(models, tmp_path):
    from dclip_ray.io.latents import LatentKey, LatentStore
    from dclip_ray.models.cache import cached_base
    from dclip_ray.stages.precompute import precompute_shard

    data, bad = unreadable_inputs(tmp_path)
    key = LatentKey(cached_base(models["base"]).sha256, T0, N_INV, 32)
    for name, path in bad.items():
        s = precompute_shard(models["base"], None, name, path, str(tmp_path / "lat"), key)
        assert s.truncated and s.n_ok == 0
        assert not LatentStore(str(tmp_path / "lat"), key).is_current(name, None), name


def test_edit_reports_an_unreadable_shard_and_exits_2(tmp_path, capsys):
    import json

    from dclip_ray.models import get_preset

    data, bad = unreadable_inputs(tmp_path)
    argv = ["edit", "--model", "toy_shapes", "--images", data, "--out", str(tmp_path / "e"), "--n-inv", "2",
            "--n-gen", "2", "--json", "--finetuned", str(get_preset("toy_shapes").weights_path())]
    assert main(argv) == 2
    s = json.loads(capsys.readouterr().out)
    assert s["n_edited"] == 2
    whole = [e for e in s["errors"] if e["key"] == "*"]
    assert sorted(os.path.basename(e["shard"]) for e in whole) == ["cut.tar", "empty.tar", "garbage.tar"]
    assert all("cannot be read to its end" in e["error"] for e in whole)


def test_a_key_repeated_in_adjacent_members_is_one_error_row(tmp_path):
    """Two samples under one key in a row were merged last-wins without a word."""
    path = write_tar(tmp_path / "r.tar", [("a.png", png(0)), ("a.png", png(1)), ("b.png", png(2))])
    recs = {r.key: r for r in iter_records(path)}
    assert recs["a"].error and "appears twice in a row" in recs["a"].error
    assert recs["b"].error is None


def test_an_image_small_on_disk_and_huge_in_memory_is_refused_by_its_decoded_size():
    """A 184 KB 16-bit PNG of 9400x9400 passed the pixel count and took about 2 GB to decode."""
    side = 8200  # 16-bit: 2 bytes a pixel + the RGB copy = 5 bytes a pixel, over the limit
    assert decode_bytes(side, side, "I;16") > MAX_DECODE_BYTES
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), dtype=np.uint16)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 1_000_000
    with pytest.raises(ImageError, match=r"MiB to decode, over the limit"):
        decode_image(buf.getvalue())
    small = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(small, format="PNG")
    img = decode_image(small.getvalue())  # 16-bit values still scale by the fixed 257
    assert img.size == (64, 64) and np.asarray(img)[-1, -1, 0] == round((64 * 64 - 1) * 16 / 257)


def test_manifest_of_the_good_shard_is_untouched_by_the_bad_ones(models, tmp_path):
    data, _ = unreadable_inputs(tmp_path)
    out = str(tmp_path / "out")
    cfg = build_restyle_config(out, models=[models["ft"]], n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)
    r = ShardRestyler(cfg)
    for n, p in input_shards(data):
        r.run(n, p)
    rows = read_manifest(f"{out}/ft/good.parquet")
    assert [(x.key, x.status) for x in rows] == [("g0", "ok"), ("g1", "ok")]


def test_a_key_the_tar_cannot_store_is_an_error_row_and_the_shard_goes_on(models, tmp_path):
    """An empty or too long key failed its whole shard (exit 3 on every run); edit raised a traceback."""
    data = tmp_path / "data"
    data.mkdir()
    long_key = "k" * 150
    write_tar(data / "s.tar", [(".png", png(0)), (f"{long_key}.png", png(1)), ("fine.png", png(2))])
    out = str(tmp_path / "out")
    cfg = build_restyle_config(out, models=[models["ft"]], n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)
    [(name, path)] = input_shards(str(data))
    res = ShardRestyler(cfg).run(name, path)
    assert res.n_ok == 1 and res.n_error == 2 and list_markers(f"{out}/ft") == ["s"]
    rows = {r.key: r for r in read_manifest(f"{out}/ft/s.parquet")}
    assert rows["fine"].status == "ok"
    assert rows[long_key].status == "error" and "cannot be stored in a tar" in rows[long_key].error
    assert rows[""].status == "error"
    assert verify(out, str(data)).ok


# ---- hostile specs -------------------------------------------------------------------------------------

BOMB = """a: &a ["xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
"""


@pytest.mark.parametrize("where", ["spec-top", "spec-value", "mix", "set"])
def test_yaml_aliases_that_expand_a_small_file_into_gigabytes_are_refused_at_once(tmp_path, capsys, where):
    """A few hundred bytes whose aliases expand inside a value took 13.4 GB and printed a 2.1 GB line."""
    import time

    value = "[" + ", ".join(["*h"] * 10) + "]"
    if where == "spec-top":
        (tmp_path / "s.yaml").write_text(BOMB + f"i: {value}\n")
        argv = ["run", str(tmp_path / "s.yaml"), "--check"]
    elif where == "spec-value":
        (tmp_path / "s.yaml").write_text(BOMB.replace("\n", "\n  ").join(["model:\n  ", ""]) + "\n")
        argv = ["run", str(tmp_path / "s.yaml"), "--check"]
    elif where == "mix":
        (tmp_path / "m.yaml").write_text(BOMB + f"models: {value}\ngamma: {{type: constant, weights: [1]}}\n")
        argv = ["restyle", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--mix", str(tmp_path / "m.yaml")]
    else:
        (tmp_path / "s.yaml").write_text("name: t\ninput: {toyworld: {n: 4}}\nmodel: toy_shapes\n")
        argv = ["run", str(tmp_path / "s.yaml"), "--check", "--set",
                "finetune.epochs=" + "{" + BOMB.replace("\n", ", ").rstrip(", ") + "}"]
    start = time.monotonic()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert time.monotonic() - start < 30  # expanded, the bomb takes minutes and gigabytes
    assert len(err) < 3000 and err.count("\n") == 1, err[:500]
    if where != "set":
        assert "expands to more than" in err, err


def test_one_redaction_covers_the_ledger_and_the_report(tmp_path):
    """A workflow's input.url with credentials was written in clear to runs.jsonl and report.html."""
    import json

    from dclip_ray.evaluation.report import write_report
    from dclip_ray.pipeline.workflow_run import append_ledger

    secret = "http://user:s3cr3t@example.com/data/{00000..00003}.tar"
    record = {"run_id": "r", "spec": {"input": {"url": secret}}, "steps": {"input": {"url": secret}},
              "error": f"cannot read {secret}?token=abc"}
    append_ledger(str(tmp_path / "runs.jsonl"), record)
    text = (tmp_path / "runs.jsonl").read_text()
    assert "s3cr3t" not in text and "token=abc" not in text and json.loads(text)["spec"]["input"]["url"].startswith(
        "http://***@example.com")
    page = Path(write_report(str(tmp_path), config={"spec": {"input": {"url": secret}}})).read_text()
    assert "s3cr3t" not in page and "***@example.com" in page


@pytest.mark.parametrize("root", ["/", "~", "/home/someone"])
def test_an_output_root_that_is_a_filesystem_root_or_a_home_folder_is_refused(tmp_path, capsys, root):
    """outputs.root: / passed run --check and planned /latents, /models, /runs.jsonl."""
    (tmp_path / "s.yaml").write_text(f"name: t\ninput: {{toyworld: {{n: 4}}}}\nmodel: toy_shapes\nprompts: {{lines: ['red circle "
                                     f"-> blue circle name=blue']}}\noutputs: {{root: '{root}'}}\n")
    assert main(["run", str(tmp_path / "s.yaml"), "--check"]) == 1
    err = capsys.readouterr().err
    assert "outputs.root" in err and ("filesystem root" in err or "home folder" in err), err


# ---- faults of the disk and of the store ----------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'{"owner": "x:otherhost:1", "expires": 1e12}'])
def test_a_dead_lease_of_any_shape_is_taken_over_once_older_than_the_lease_time(tmp_path, content):
    """An empty, unreadable or ownerless lease file blocked its shard forever (every run exited 3)."""
    import time

    from dclip_ray.io.leases import LEASE_TTL_S, acquire_lease, lease_url, live_lease

    root = str(tmp_path)
    path = lease_url(root, "s")
    Path(path).write_bytes(content)
    held = acquire_lease(root, "s", "me:host:1")
    assert held is not None, "a fresh lease file: perhaps a run is writing it now"
    assert live_lease(root, "s") is not None
    old = time.time() - LEASE_TTL_S - 5
    os.utime(path, (old, old))
    assert live_lease(root, "s") is None
    notes: list[str] = []
    assert acquire_lease(root, "s", "me:host:1", notes=notes) is None, "taken over"
    import json

    assert json.loads(Path(path).read_text())["owner"] == "me:host:1"
    unreadable = content != b'{"owner": "x:otherhost:1", "expires": 1e12}'
    assert (notes and "unreadable" in notes[0] and "taken over" in notes[0]) if unreadable else not notes, notes


def test_a_taken_over_lease_is_a_warning_of_the_run_and_a_blocked_one_names_what_is_known(models, tmp_path):
    """Issue 30 item 11, what the user sees: the takeover warning lived only in a worker's log (seen with
    --verbose), and a fresh unreadable lease was reported as held "on None (pid None)"."""
    import time

    from dclip_ray.io.leases import LEASE_TTL_S, lease_url
    from dclip_ray.stages.common import lease_text, took_over_warnings

    data = tmp_path / "data"
    data.mkdir()
    path = write_tar(data / "s.tar", [("a.png", png(0))])
    cfg = build_restyle_config(str(tmp_path / "out"), models=[models["ft"]], n_inv_steps=2, n_gen_steps=2)
    lease = Path(lease_url(cfg.variants[0].out, "s"))
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_bytes(b"")
    restyler = ShardRestyler(cfg)
    blocked = restyler.run("s", path, owner="me:host:1")
    assert blocked.leased and "None" not in blocked.leased and "unknown (unreadable lease file)" in blocked.leased
    old = time.time() - LEASE_TTL_S - 5
    os.utime(lease, (old, old))
    done = restyler.run("s", path, owner="me:host:1")
    assert done.n_ok == 1 and "unreadable" in done.took_over
    assert took_over_warnings([done.as_dict()]) == [f"output shard s: {done.took_over}"]
    assert "on h (pid 7)" in lease_text({"owner": "r", "host": "h", "pid": 7, "expires": 0})


def test_a_special_file_named_like_an_image_or_a_shard_is_an_error_not_a_hang(models, tmp_path):
    """A FIFO named like an image hung edit and verify; restyle never exited after SIGTERM."""
    from dclip_ray.stages.inputs import fingerprints

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "good.png").write_bytes(png(0))
    os.mkfifo(folder / "pipe.png")
    recs = {r.key: r for r in iter_records(str(folder))}
    assert recs["good"].error is None and "not a regular file" in recs["pipe"].error
    tars = tmp_path / "tars"
    tars.mkdir()
    write_tar(tars / "a.tar", [("k.png", png(1))])
    os.mkfifo(tars / "b.tar")
    shards = input_shards(str(tars))
    prints = fingerprints(shards + input_shards(str(folder)))  # returns: nothing was opened
    assert prints["b"].startswith("special:")
    out = str(tmp_path / "out")
    cfg = build_restyle_config(out, models=[models["ft"]], n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)
    r = ShardRestyler(cfg)
    res = {n: r.run(n, p, prints[n]) for n, p in shards}
    assert res["a"].n_ok == 1 and "not a regular file" in res["b"].truncated
    report = verify(out, str(tars))
    assert not report.ok and any("b cannot be read" in p for p in report.problems)


# ---- what edit writes ----------------------------------------------------------------------------------

def _edit(images, out, *extra):
    from dclip_ray.models import get_preset

    return ["edit", "--model", "toy_shapes", "--images", str(images), "--out", str(out), "--n-inv", "2",
            "--n-gen", "2", "--json", "--finetuned", str(get_preset("toy_shapes").weights_path()), *extra]


def test_edit_never_overwrites_one_output_with_another(tmp_path, capsys):
    """A key 'grid' lost its image to --grid; two spellings of one path ended as one PNG counted twice;
    keys 'x' and 'x.png/y' raised a traceback after writing."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "s.tar", [("grid.png", png(0)), ("a/b.png", png(1)), ("./a/b.png", png(2)), ("x.png", png(3)),
                               ("x.png/y.png", png(4)), ("fine.png", png(5))])
    out = tmp_path / "out"
    assert main(_edit(data, out, "--grid")) == 2
    s = json.loads(capsys.readouterr().out)
    errors = {e["key"]: e["error"] for e in s["errors"]}
    assert "edit's own grid.png" in errors["grid"]
    assert "names the same file" in errors["./a/b"]
    assert "x.png/y" in errors and "cannot write" in errors["x.png/y"], errors
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == ["a/b.png", "fine.png", "grid.png", "x.png"]
    assert s["n_edited"] == 3, "n_edited counts the files written"


def test_edit_removes_the_images_whose_input_left_or_now_fails(tmp_path, capsys):
    """A key removed from the input, or now failing, kept its old edited image in --out."""
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "s.tar", [("a.png", png(0)), ("b.png", png(1)), ("c.png", png(2))])
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.png").write_bytes(png(9))  # a file edit did not write: never touched
    assert main(_edit(data, out)) == 0
    capsys.readouterr()
    write_tar(data / "s.tar", [("a.png", png(0)), ("c.png", b"not an image")])
    assert main(_edit(data, out)) == 2
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "mine.png"]


# ---- hostile models ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("card", "needle"), [("[1, 2]", "expected a JSON object"),
                                              ('{"config": {"t0": "abc"}}', "config.t0 should be a step"),
                                              ('{"config": "x"}', "field 'config' should be dict"),
                                              ('{"config": {"t0": 5000}}', "config.t0 should be a step")])
def test_a_model_card_of_the_wrong_shape_is_one_line_not_a_traceback(tmp_path, capsys, card, needle):
    from dclip_ray.models import get_preset

    model = tmp_path / "ft"
    model.mkdir()
    (model / "dclip.json").write_text(card)
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "s.tar", [("a.png", png(0))])
    rc = main(["edit", "--model", str(get_preset("toy_shapes").weights_path()), "--finetuned", str(model),
               "--images", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and needle in err[0] and "dclip.json" in err[0], err


# ---- what a workflow (and finetune-many) writes ------------------------------------------------------------

def test_a_workflow_never_writes_its_ledger_into_an_input(tmp_path, capsys):
    """outputs.ledger pointing at an input shard passed run --check; run appended JSON to the input tar."""
    data = tmp_path / "data"
    data.mkdir()
    shard = write_tar(data / "00000.tar", [("a.png", png(0))])
    before = Path(shard).read_bytes()
    (tmp_path / "s.yaml").write_text(f"name: t\ninput: {{url: {data}/}}\nmodel: toy_shapes\nprompts: {{lines: ['red circle -> "
                                     f"blue circle name=blue']}}\noutputs: {{root: {tmp_path / 'out'}, ledger: {shard}}}\n")
    for argv in (["run", str(tmp_path / "s.yaml"), "--check"], ["run", str(tmp_path / "s.yaml")]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "outputs.ledger" in err and "input.url" in err, err
        assert Path(shard).read_bytes() == before, argv  # run appended its config_error record there


def test_a_prompt_lines_images_inside_out_is_refused(tmp_path, capsys):
    """A prompt line's images= naming a folder inside --out: the model was written among the tars."""
    out = tmp_path / "models"
    (out / "imgs").mkdir(parents=True)
    write_tar(out / "imgs" / "00000.tar", [("a.png", png(0))])
    (tmp_path / "p.txt").write_text(f"red circle -> blue circle name=blue images={out / 'imgs'}\n")
    other = tmp_path / "other"
    other.mkdir()
    write_tar(other / "00000.tar", [("b.png", png(1))])
    assert main(["finetune-many", str(tmp_path / "p.txt"), "--model", "toy_shapes", "--images", str(other),
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "images=" in err and "--out" in err, err


def test_finetune_and_translate_never_write_into_what_they_read(tmp_path, capsys):
    """Issue 30 item 4: the one rule (check_outputs) for every command, not only the pipeline's."""
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "s.tar", [("a.png", png(0))])
    cases = [["finetune", "--model", "toy_shapes", "--source", "red circle", "--target", "blue circle",
              "--images", str(data), "--out", str(data / "ft")],
             ["finetune", "--model", "toy_shapes", "--source", "red circle", "--target", "blue circle",
              "--images", str(data), "--out", str(tmp_path / "ft"), "--checkpoint-dir", str(data / "ck")],
             ["translate", "--model", "toy_shapes", "--images", str(data), "--out", str(data / "t")],
             ["latent-optim", "--model", "toy_shapes", "--source", "a", "--target", "b", "--images", str(data),
              "--out", str(data)]]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "choose an output folder outside every input" in err and "--images" in err, err
    assert not (tmp_path / "ft").exists()


def test_report_and_eval_replace_only_a_file_they_wrote(tmp_path, capsys):
    """Issue 30 item 4, the commands that write one file: `report --out` overwrote an input shard with
    HTML and `eval --out` the restyle manifest it was evaluating (both exit 0). An output file may
    replace only a file of its own kind; a re-run over its own earlier output still works."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        (images / f"k{i}.png").write_bytes(png(i))
    shard = write_tar(tmp_path / "00000.tar", [("a.png", png(0))])
    manifest = images / "00000.parquet"
    pq.write_table(pa.table({"key": ["a"]}), manifest)
    precious = {p: Path(p).read_bytes() for p in (shard, str(manifest))}
    cases = [(["report", str(images), "--out", shard], "is not an HTML report"),
             (["report", str(images), "--out", str(images)], "is a folder"),
             (["eval", "--before", str(images), "--after", str(images), "--out", str(manifest)], "is not an evaluation"),
             (["eval", "--before", str(images), "--after", str(images), "--out", shard], "is not an evaluation")]
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out") and needle in err, err
        assert len(err.splitlines()) == 1, err
    assert {p: Path(p).read_bytes() for p in precious} == precious
    # their own files are replaced on a re-run
    for _ in range(2):
        assert main(["report", str(images), "--out", str(tmp_path / "r.html")]) == 0
        assert main(["eval", "--before", str(images), "--after", str(images), "--out", str(tmp_path / "e.parquet")]) == 0
        assert main(["eval", "--before", str(images), "--after", str(images), "--out", str(tmp_path / "e2.json")]) == 0
    assert main(["report", str(images)]) == 0 and main(["report", str(images)]) == 0  # RUN/report.html again
    assert json.loads((tmp_path / "e.json").read_text())["per_image_file"] == "e.parquet"


def test_a_disk_that_refuses_a_write_is_one_line_and_exit_3(tmp_path, capsys):
    """Issue 30 item 15: `--out` on a read-only filesystem (or under a file) raised a traceback from
    restyle's declaration and edit's mkdir. Any OSError no step turned into an error row ends the
    command with one line naming the path, and exit 3 (a re-run resumes)."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "00000.tar", [("a.png", png(0))])
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile" / "out", tmp_path / "afile"):
        capsys.readouterr()
        assert main(_edit(data, out)) == 3, out
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and "[Errno" in err and "afile" in err, err
        assert "re-run the same command" in err and "Traceback" not in err
        assert json.loads(captured.out.strip().splitlines()[-1])["exit_code"] == 3


def test_edit_turns_every_hostile_member_into_an_error_row_and_edits_the_rest(tmp_path, capsys):
    """The shard rules of items 3, 10 and 13 through the `edit` command itself (they were tested on the
    readers and on ShardRestyler only): a key repeated in adjacent members, an empty key, a key too long
    for a tar; in a folder input, a FIFO named like an image. Each is one error row, exit 2, no traceback,
    and every other key is edited."""
    import json

    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "s.tar", [("a.png", png(0)), ("a.png", png(1)), (".png", png(2)), ("k" * 150 + ".png", png(3)),
                                 ("fine.png", png(4))])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png(5))
    os.mkfifo(folder / "pipe.png")
    for images, bad, good in ((shards, {"a", "", "k" * 150}, {"fine"}), (folder, {"pipe"}, {"ok"})):
        out = tmp_path / f"out-{images.name}"
        capsys.readouterr()
        assert main(_edit(images, out)) == 2, images
        captured = capsys.readouterr()
        s = json.loads(captured.out)
        assert "Traceback" not in captured.err
        assert {e["key"] for e in s["errors"]} == bad, s["errors"]
        assert {p.stem for p in out.glob("*.png")} == good


def test_a_huge_value_echoed_in_an_error_is_cut_to_one_short_line(tmp_path, capsys):
    """Item 12's second half: an error that echoes a 100 kB value prints one line of at most MAX_MESSAGE
    characters (with --json too)."""
    import json

    from dclip_ray.cli import MAX_MESSAGE

    (tmp_path / "s.yaml").write_text("name: t\ninput: {toyworld: {n: 4}}\nmodel: toy_shapes\nprompts: {lines: ['red "
                                     "circle -> blue circle name=blue']}\n")
    huge = "x" * 100_000
    assert main(["run", str(tmp_path / "s.yaml"), "--check", "--set", f"finetune.epochs={huge}", "--json"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and len(err) <= MAX_MESSAGE + len("error: ") and "epochs" in err, err[:300]
    assert len(json.loads(captured.out.strip().splitlines()[-1])["error"]) <= MAX_MESSAGE


def test_every_command_that_starts_ray_refuses_token_auth_disabled_before_writing(models, tmp_path, capsys,
                                                                                  monkeypatch):
    """Issue 30 item 9, the family: with RAY_AUTH_MODE=disabled the embedded Ray would answer anyone, so
    restyle, finetune-many and a workflow refuse it with one line (exit 1) before they write anything
    (restyle wrote OUT/restyle.json first)."""
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray of another test is running in this process")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "00000.tar", [("a.png", png(0))])
    (tmp_path / "p.txt").write_text("red circle -> blue circle name=blue\n")
    (tmp_path / "s.yaml").write_text(f"name: t\ninput: {{url: {data}/}}\nmodel: toy_shapes\nprompts: {{lines: ['red "
                                     f"circle -> blue circle name=blue']}}\noutputs: {{root: {tmp_path / 'run'}}}\n")
    cases = {"restyle": ["restyle", "--input", str(data), "--out", str(tmp_path / "restyle"), "--model", models["ft"],
                         "--base", models["base"]],
             "finetune-many": ["finetune-many", str(tmp_path / "p.txt"), "--model", "toy_shapes", "--images", str(data),
                               "--out", str(tmp_path / "fm"), "--allow-fewer"],
             "run": ["run", str(tmp_path / "s.yaml"), "--check"]}
    for name, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 1, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "RAY_AUTH_MODE=disabled" in err, (name, err)
    assert not (tmp_path / "restyle").exists() and not any((tmp_path / "fm").glob("*")) and not (tmp_path / "run").exists()

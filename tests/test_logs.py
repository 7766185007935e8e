"""Logs off a terminal and the first seconds of a command (issue 31): plain progress lines, no wrapping,
no truncation, no ANSI codes, no Ray lines on stdout, inputs checked before the heavy imports."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dclip_ray.cli import main
from dclip_ray.progress import PlainProgress

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
CLI = [sys.executable, "-m", "dclip_ray.cli"]


def test_plain_progress_prints_a_line_when_the_count_moves_and_at_least_every_silent_period():
    out = io.StringIO()
    bar = PlainProgress(100, "finetune", unit="steps", stream=out, every=0.2, silent=0.5)
    time.sleep(0.35)  # nothing done yet and under the silent period: no line
    assert out.getvalue() == ""
    bar.update(10)
    bar.set_postfix(loss=0.123456)
    time.sleep(0.45)
    first = out.getvalue().splitlines()
    assert first and first[0].startswith("finetune: 10/100 steps, ") and first[0].endswith("(loss 0.1235)")
    assert ", ETA " in first[0], "the whole job's pace: 10 of 100 done"
    time.sleep(0.8)  # no progress: a line anyway, so a log is never silent for long
    assert len(out.getvalue().splitlines()) >= 2
    bar.update(90)
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("finetune: 100/100 steps")
    assert "ETA" not in out.getvalue().splitlines()[-1], "done: no ETA"
    n = len(out.getvalue().splitlines())
    time.sleep(0.6)
    assert len(out.getvalue().splitlines()) == n  # closed: the thread stopped


def test_short_work_prints_no_progress_line():
    out = io.StringIO()
    with PlainProgress(3, "edit", stream=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-c", "import sys; from dclip_ray.cli import main; sys.exit(main())",
                           *args], capture_output=True, text=True, env=env, timeout=600, **kw)


def test_a_missing_input_folder_is_refused_naming_the_option_before_the_heavy_imports(tmp_path):
    start = time.monotonic()
    r = _run(["finetune", "--model", "toy_shapes", "--source", "red circle", "--target", "blue circle",
              "--images", str(tmp_path / "nothere"), "--out", str(tmp_path / "ft")])
    took = time.monotonic() - start
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: --images {tmp_path / 'nothere'}: no such file or folder; check the path"
    assert took < 2.0 + 0.5 * (os.getloadavg()[0] > 2)  # torch alone takes about 2 s to import
    r = _run(["eval", f"--before={tmp_path / 'a'}", "--after", str(tmp_path)])
    assert r.returncode == 1 and r.stderr.startswith(f"error: --before {tmp_path / 'a'}: no such file")


def test_tables_off_a_terminal_are_neither_wrapped_nor_truncated(tmp_path):
    r = _run(["presets", "list"])
    assert r.returncode == 0 and not ANSI.search(r.stdout)
    assert "…" not in r.stdout and max(len(line) for line in r.stdout.splitlines()) > 80
    r = _run(["--help"])
    cut = [line for line in r.stdout.splitlines() if line.startswith("  ") and line.endswith("...")]
    assert "translate      Unseen -> unseen translation (paper, Figure 4a)\n" in r.stdout, r.stdout
    assert cut == []  # click cut 16 of 20 summaries at 80 columns, and at "Fig."


def test_help_examples_are_valid_yaml_and_continued_lines():
    import yaml

    from dclip_ray.cli.common import mix_example
    from dclip_ray.mixing import gamma_from_spec

    lines = mix_example("a", "b").splitlines()
    data = yaml.safe_load("\n".join(lines[1:3]))
    assert data["models"] == ["a", "b"] and gamma_from_spec(data["gamma"]) is not None
    for line in lines[4:]:
        gamma = yaml.safe_load(line.split("   (")[0].strip())["gamma"]
        assert gamma_from_spec(gamma) is not None, line


def test_make_data_refuses_a_non_empty_out_and_overwrite_replaces_every_shard(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["toyworld", "make-data", "--out", str(out), "--n", "8", "--shard-size", "2"]) == 0
    assert len(list(out.glob("*.tar"))) == 4
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    capsys.readouterr()
    assert main(["toyworld", "make-data", "--out", str(out), "--n", "4", "--seed", "1"]) == 1
    assert "is not empty" in capsys.readouterr().err and "--overwrite" in capsys.readouterr().err + "--overwrite"
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before  # nothing touched
    assert main(["toyworld", "make-data", "--out", str(out), "--n", "4", "--seed", "1", "--overwrite"]) == 0
    assert [p.name for p in out.glob("*.tar")] == ["00000.tar"]  # no stale shard of the old dataset left


def test_ray_raylet_messages_stay_off_stdout():
    """Ray prints what the raylet pushes to the driver on stdout with colours; without --verbose it goes
    to the 'ray' logger instead."""
    import ray._private.worker as w

    from dclip_ray.pipeline.runtime import quiet_raylet_messages

    original = w.print_to_stdstream
    try:
        quiet_raylet_messages()
        quiet_raylet_messages()  # idempotent: wraps the original once
        assert w.print_to_stdstream.__wrapped__ is original
        buf = io.StringIO()
        old = sys.stdout
        sys.stdout = buf
        try:
            w.print_to_stdstream({"lines": ["WARNING: 4 PYTHON worker processes have been started"], "pid": "raylet",
                                  "is_err": False}, ignore_prefix=False)
        finally:
            sys.stdout = old
        assert buf.getvalue() == ""
    finally:
        w.print_to_stdstream = original


def test_eval_refuses_inputs_that_changed_after_the_edit(tmp_path, capsys, monkeypatch):
    """The README's order once overwrote toy/ after edited/ was made from it; eval then compared the
    edits with other images without a word. Now the edit's commit markers are checked."""
    from dclip_ray.evaluation.evaluate import check_same_inputs
    from dclip_ray.io.shards import shard_urls, write_marker
    from dclip_ray.io.sources import shard_fingerprint
    from dclip_ray.stages.edit import state_dir
    from dclip_ray.stages.verify import changed_inputs
    from dclip_ray.toyworld.data import write_shards

    toy = tmp_path / "toy"
    (tar,) = write_shards(str(toy), 4, seed=0)
    edited = tmp_path / "edited"
    edited.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(edited / "grid.png")  # what makes a folder an edit output to the report
    hidden = state_dir(str(edited))
    Path(hidden).mkdir()
    write_marker(shard_urls(hidden, "00000")["marker"], {"source": tar, "source_fingerprint": shard_fingerprint(tar)})
    assert changed_inputs(str(edited)) == []
    check_same_inputs(str(toy), str(edited))  # unchanged: no complaint
    write_shards(str(toy), 4, seed=1, overwrite=True)
    (c,) = changed_inputs(str(edited))
    assert c["input"] == tar and "changed after it was made" in c["problem"]
    from dclip_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--before .*changed since the edits were made"):
        check_same_inputs(str(toy), str(edited))
    check_same_inputs(str(tmp_path / "elsewhere"), str(edited))  # another --before: not these inputs
    assert main(["eval", "--before", str(toy), "--after", str(edited)]) == 1
    assert "changed since the edits were made" in capsys.readouterr().err
    from dclip_ray.evaluation.report import write_report

    with pytest.warns(Warning, match="inputs that changed since"):
        page = Path(write_report(str(tmp_path))).read_text()
    assert "The inputs changed after these outputs were made" in page


def test_piped_cli_output_has_no_ansi_codes(tmp_path):
    r = _run(["recipes", "list"])
    assert r.returncode == 0 and not ANSI.search(r.stdout + r.stderr)
    r = _run(["models", "list", "--json"])
    json.loads(r.stdout)


def test_single_machine_commands_leave_busy_cores_to_the_process_using_them():
    """torch's threads stall each other when one loses its core to another process (47 s alone, 159 s
    with 2 threads beside one busy process, 61 s with 1): the free cores are measured, never raised."""
    import torch

    from dclip_ray.cpu import free_cores, usable_cores, use_free_cores

    if usable_cores() < 2:
        pytest.skip("needs 2 cores")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert free_cores() < usable_cores()
    finally:
        busy.kill()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert use_free_cores() == 1  # never raised above what was set
    finally:
        torch.set_num_threads(old)


def test_the_report_names_its_folder_and_shows_the_models_an_output_was_made_with(tmp_path):
    """A report of an edit or restyle folder once read ". (edited images)" and "Fine-tuning: not
    available" although the models were there; now the run files name them."""
    from dclip_ray.evaluation.report import write_report

    model = tmp_path / "models" / "blue"
    model.mkdir(parents=True)
    card = {"source": "red circle", "target": "blue circle", "config": {"t0": 500, "epochs": 5}, "final_loss": 1.5,
            "quality": {"passed": True, "measured": {"score": 0.777}}}
    (model / "dclip.json").write_text(json.dumps(card))
    edited = tmp_path / "edited"
    edited.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (0, 0, 255)).save(edited / "k1.png")
    (tmp_path / ".edited.edit").mkdir()
    (tmp_path / ".edited.edit" / "dclip_run.json").write_text(json.dumps({"kind": "edited images", "config": {
        "images": str(tmp_path / "toy"), "finetuned": str(model), "models": [str(model)]}}))
    page = Path(write_report(str(edited))).read_text()
    assert "<h3>edited (edited images)</h3>" in page and "<h3>. " not in page
    assert "red circle &rarr; blue circle" in page and "passed, score 0.777" in page
    assert "no fine-tuned model" not in page
    restyled = tmp_path / "restyled"
    restyled.mkdir()
    (restyled / "restyle.json").write_text(json.dumps({"format": "dclip-ray/restyle-run/1", "input": "x",
                                                       "variants": [{"name": "blue", "folder": "blue",
                                                                     "models": [str(model)]}]}))
    page = Path(write_report(str(restyled))).read_text()
    assert "passed, score 0.777" in page and "no fine-tuned model" not in page
    assert "S_dir (training images)" not in page  # no card measured it: no empty column

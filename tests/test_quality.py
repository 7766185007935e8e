"""The held-aside check before a prompt is called done (issue 27 item 2): the pure verdict rules, then
`finetune` and `finetune-many` on the toy world (restarts, a diverged prompt failing alone, the failed
model kept apart, a re-run judging it again without re-training, --accept-low-quality)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from pipeline_fixtures import stamps

from dclip_ray.config import QualityCheck
from dclip_ray.models import get_preset
from dclip_ray.quality import (
    choose,
    failed_path,
    judge,
    measure_edits,
    output_spread,
    quality_record,
    split_check,
    status_of,
)


def strict_json(text: str):
    """Parse JSON refusing NaN / Infinity (what a strict parser does)."""
    def bad(c):
        raise ValueError(f"non-strict JSON constant {c}")
    return json.loads(text, parse_constant=bad)


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def test_output_spread_is_one_for_outputs_that_keep_their_inputs_and_zero_for_a_collapse():
    x = images(6)
    assert output_spread(x, x) == pytest.approx(1.0)
    assert output_spread(x, -x) == pytest.approx(1.0), "a colour inversion keeps how much images differ"
    assert output_spread(x, x * 0.5) == pytest.approx(0.5, rel=1e-4)
    same = images(1, seed=3).expand(6, -1, -1, -1)
    assert output_spread(x, same) == pytest.approx(0.0, abs=1e-6), "one picture whatever the input"
    assert math.isnan(output_spread(x[:1], x[:1])), "spread needs two images"
    assert math.isnan(output_spread(same, x)), "inputs that do not vary give no ratio"


def measured(**kw):
    base = {"score": 0.7, "direction": 0.8, "structure": 0.9, "background": 0.01, "spread": 0.9, "n_images": 8,
            "held_aside": True, "finite": True}
    return {**base, **kw}


def test_the_verdict_rules_in_order():
    assert judge(measured(), 0.5, 0.3).passed
    v = judge(measured(score=0.4), 0.5, 0.3)
    assert not v.passed and "0.400" in v.reason and "--min-quality 0.5" in v.reason and "held-aside" in v.reason
    assert judge(measured(score=0.4), None, 0.3).passed, "no bar: the score alone fails nothing"
    v = judge(measured(spread=0.1), None, 0.3)
    assert not v.passed and "collapsed" in v.reason and "0.10x" in v.reason
    v = judge(measured(finite=False, score=None), 0.5, 0.3)
    assert not v.passed and "diverged" in v.reason
    assert not judge(measured(score=None), None, 0.3).passed, "a missing number is not a pass"
    assert judge(measured(spread=None), None, 0.3).passed, "one image: no spread to judge"
    assert "training images" in judge(measured(score=0.1, held_aside=False), 0.5, 0.3).reason
    unchecked = judge(None, 0.5, 0.3)
    assert unchecked.passed and math.isnan(unchecked.score)


def test_choose_keeps_the_best_that_passed_else_the_best():
    vs = [judge(measured(score=s, spread=sp), 0.5, 0.3) for s, sp in ((0.6, 0.9), (0.9, 0.1), (0.7, 0.8))]
    assert choose(vs) == 2, "the collapsed restart scores higher but failed"
    vs = [judge(measured(score=s), 0.95, 0.3) for s in (0.6, 0.8, 0.7)]
    assert choose(vs) == 1
    vs = [judge(measured(finite=False, score=None), 0.5, 0.3), judge(measured(score=0.1), 0.5, 0.3)]
    assert choose(vs) == 1, "a non-finite score ranks last"


def test_records_and_statuses_are_strict_json():
    v = judge(measured(finite=False, score=float("nan")), 0.5, 0.3)
    rec = quality_record(measured(finite=False, score=None), v, accepted=True)
    strict_json(json.dumps(rec))
    assert not rec["accepted_low_quality"] and status_of(rec) == "failed (quality)", "a diverged model is never kept"
    low = quality_record(measured(score=0.1), judge(measured(score=0.1), 0.5, 0.3), accepted=True)
    assert low["accepted_low_quality"] and status_of(low) == "ok (low quality, accepted)"
    assert status_of(quality_record(measured(), judge(measured(), 0.5, 0.3), False)) == "ok"
    assert status_of(quality_record(measured(score=0.1), judge(measured(score=0.1), 0.5, 0.3), False)) == \
        "failed (quality)"
    assert status_of({}) == "ok", "no check: nothing claims a failure"
    nan_out = measure_edits(None, images(2), torch.full((2, 3, 16, 16), float("nan")), "a", "b")
    assert nan_out["finite"] is False and "score" not in nan_out
    assert failed_path("models/blue/") == "models/blue.failed"


def test_split_check_holds_images_aside_or_says_it_could_not():
    x = images(10)
    train, check, held = split_check(x, 6, 3)
    assert held and torch.equal(train, x[:6]) and torch.equal(check, x[6:9])
    train, check, held = split_check(x, 10, 3)
    assert not held and torch.equal(check, x[:3])


def test_the_bar_is_the_option_else_the_model_presets():
    toy = get_preset("toy_shapes")
    assert toy.quality_bar is not None and QualityCheck().bar(toy) == toy.quality_bar
    assert QualityCheck(min_quality=0.1).bar(toy) == 0.1
    assert QualityCheck().bar(None) is None


def run_json(capsys, argv):
    from dclip_ray.cli import main

    rc = main(argv)
    captured = capsys.readouterr()
    run_json.err = captured.err  # type: ignore[attr-defined]
    return rc, strict_json(captured.out[captured.out.index("{"):])


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from dclip_ray.toyworld.data import write_shards

    data = str(tmp_path_factory.mktemp("quality") / "toy")
    write_shards(data, 8, seed=5, shard_size=8, colours=["red"], shapes=["circle"])
    return data


FAST = ["--n-train", "3", "--epochs", "1", "--n-inv", "8", "--check-images", "3", "--json", "--quiet"]


def test_finetune_fails_a_diverged_model_and_keeps_it_apart(toy_data, tmp_path, capsys):
    out = tmp_path / "ft"
    rc, s = run_json(capsys, ["finetune", "--model", "toy_shapes", "--source", "red circle", "--target",
                              "blue circle", "--images", toy_data, "--out", str(out), "--lr", "1e12", *FAST])
    assert rc == 2 and s["status"] == "failed (quality)" and "diverged" in s["quality"]["reason"]
    assert not out.exists() and s["model_path"] == str(out) + ".failed"
    assert "lower --lr" in run_json.err and "try --restarts" not in run_json.err, run_json.err  # no advice that cannot help
    card = strict_json((tmp_path / "ft.failed" / "dclip.json").read_text())
    assert card["quality"]["passed"] is False and card["quality"]["measured"]["finite"] is False
    rc, s = run_json(capsys, ["finetune", "--model", "toy_shapes", "--source", "red circle", "--target",
                              "blue circle", "--images", toy_data, "--out", str(out), "--lr", "1e12", *FAST,
                              "--check-images", "0", "--accept-low-quality"])
    assert rc == 2 and "diverged" in s["quality"]["reason"] and not out.exists(), \
        "no check images and --accept-low-quality: a diverged model is still never kept"


def test_finetune_bar_and_accept_low_quality(toy_data, tmp_path, capsys):
    out = tmp_path / "ft"
    argv = ["finetune", "--model", "toy_shapes", "--source", "red circle", "--target", "blue circle",
            "--images", toy_data, "--out", str(out), "--min-quality", "5", *FAST]
    rc, s = run_json(capsys, argv)
    m = s["quality"]["measured"]
    assert rc == 2 and s["status"] == "failed (quality)" and m["held_aside"] and m["n_images"] == 3
    assert math.isfinite(m["score"]) and m["score"] < 5 and "--min-quality 5" in s["quality"]["reason"]
    rc, s = run_json(capsys, [*argv, "--accept-low-quality"])
    assert rc == 0 and s["status"] == "ok (low quality, accepted)" and (out / "dclip.json").exists()
    assert s["quality"]["measured"] == m, "the same seed gives the same model and the same check"
    card = json.loads((out / "dclip.json").read_text())
    assert card["quality"]["accepted_low_quality"] is True


def test_finetune_many_restarts_a_prompt_and_fails_a_diverged_one_alone(ray_local, toy_data, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle -> blue circle name=blue restarts=2\nred circle -> green circle name=nan lr=1e12\n")
    models = tmp_path / "models"
    argv = ["finetune-many", str(prompts), "--model", "toy_shapes", "--images", toy_data, "--out", str(models),
            "--cpus-per-prompt", "1", "--min-quality", "-9", *FAST]  # 1-epoch models: no bar but divergence
    rc, s = run_json(capsys, argv)
    assert rc == 2 and s["n_ok"] == 1 and s["n_failed"] == 1
    blue, bad = s["prompts"]
    assert blue["status"] == "ok" and bad["status"] == "failed (quality)" and "diverged" in bad["error"]
    assert [r["seed"] for r in blue["restarts"]] == [0, 1] and all(r["passed"] for r in blue["restarts"])
    card = json.loads((models / "blue" / "dclip.json").read_text())
    best = max(card["restarts"], key=lambda r: r["score"])
    assert card["restarts"][card["kept_restart"]] == best and card["config"]["seed"] == best["seed"], \
        "the best-scored restart is kept"
    assert card["config_sha256"] == blue["config_sha256"] and card["quality"]["passed"]
    assert sorted(os.listdir(models)) == ["_ray_train", "blue", "nan.failed"], "restarts cleaned, failure apart"
    assert len(os.listdir(models / "_ray_train")) == 3, "one Train run per restart"

    before = {k: stamps(models / k) for k in ("_ray_train", "blue")}
    rc, again = run_json(capsys, [*argv, "--accept-low-quality"])
    after = {k: stamps(models / k) for k in before}
    assert after == before, \
        "nothing is retrained: no Train run, no rewritten model; the failure is judged again from its card"
    assert rc == 2 and [p["status"] for p in again["prompts"]] == ["skipped (done)", "failed (quality)"], \
        "a diverged model is never accepted"


def test_finetune_many_plans_one_run_per_search_point_and_seed(tmp_path):
    """search=K restarts=N on a prompt line: K knob points around the recipe x N seeds, each its own
    Train run with its own config hash and folder (planning only, no Ray)."""
    from dclip_ray.config import resolve_finetune_config
    from dclip_ray.models.cache import cached_base
    from dclip_ray.prompts import parse_prompt_text
    from dclip_ray.search import KNOBS
    from dclip_ray.stages.finetune_many import FinetuneManyJob, plan_prompt

    base = cached_base("toy_shapes")
    spec = parse_prompt_text("red circle -> blue circle name=blue search=2 restarts=2")[0]
    fcfg = resolve_finetune_config(spec.source, spec.target, spec.settings(), preset=base.preset)
    job = FinetuneManyJob(prompts="p", model="toy_shapes", out=str(tmp_path / "models"), images=str(tmp_path))
    row, loops = plan_prompt(spec, job, base, fcfg, {"keys": None, "images": None})
    own = {k: getattr(fcfg, k) for k in KNOBS}
    assert [(r["seed"], {k: r[k] for k in KNOBS} == own) for r in row["restarts"]] == \
        [(0, True), (1, True), (0, False), (1, False)], "the recipe's point first, each point at both seeds"
    assert len({r["config_sha256"] for r in row["restarts"]}) == len({r["path"] for r in row["restarts"]}) == 4
    assert [lp.finetune.seed for lp in loops] == [0, 1, 0, 1]
    assert all({k: getattr(lp.finetune, k) for k in KNOBS} == {k: r[k] for k in KNOBS}
               for lp, r in zip(loops, row["restarts"], strict=True))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_copy_model_moves_a_folder_with_its_card_last_on_any_filesystem(tmp_path, where):
    """How a kept restart reaches OUT/NAME (or OUT/NAME.failed), local or at an fsspec URL."""
    import fsspec

    from dclip_ray.finetune import copy_model, remove_model

    root = str(tmp_path) if where == "local" else f"memory://copy-{os.getpid()}"
    fs, base = fsspec.core.url_to_fs(root)
    fs.makedirs(f"{base}/src", exist_ok=True)
    fs.makedirs(f"{base}/dst", exist_ok=True)
    fs.pipe({f"{base}/src/weights.safetensors": b"w" * 10, f"{base}/src/dclip.json": b'{"old": 1}',
             f"{base}/dst/stale.bin": b"s"})
    copy_model(f"{root}/src", f"{root}/dst", {"new": float("nan")})
    names = sorted(n.rsplit("/", 1)[-1] for n in fs.ls(f"{base}/dst", detail=False))
    assert names == ["dclip.json", "weights.safetensors"], "replaced whole, no temporary card left"
    assert strict_json(fs.cat(f"{base}/dst/dclip.json").decode()) == {"new": None}
    copy_model(f"{root}/dst", f"{root}/dst", {"again": 2})
    assert json.loads(fs.cat(f"{base}/dst/dclip.json")) == {"again": 2} and fs.exists(f"{base}/dst/weights.safetensors")
    remove_model(f"{root}/dst")
    remove_model(f"{root}/dst")  # absent: nothing to do
    assert not fs.exists(f"{base}/dst")


def test_a_fine_tuning_whose_threads_were_lowered_says_so_and_its_card_records_the_count(toy_data, tmp_path, capsys,
                                                                                         monkeypatch):
    """The same seed at 1 and 2 torch threads gave IoU 0.875 and 0.847 (one toy prompt): a fine-tuning
    that the machine's load put on fewer threads must say that its model may differ, and how to redo it."""
    import torch

    import dclip_ray.jobs as jobs

    def lowered() -> int:
        torch.set_num_threads(1)
        return 1

    monkeypatch.setattr(jobs, "use_free_cores", lowered)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = tmp_path / "ft"
        rc, s = run_json(capsys, ["finetune", "--model", "toy_shapes", "--source", "red circle", "--target",
                                  "blue circle", "--images", toy_data, "--out", str(out), *FAST,
                                  "--accept-low-quality"])
    finally:
        torch.set_num_threads(old)
    assert rc == 0, s
    assert any("ran at 1 torch thread(s), not 2" in w and "OMP_NUM_THREADS=2" in w for w in s["warnings"]), s["warnings"]
    card = strict_json((out / "dclip.json").read_text())
    assert card["torch_threads"] == 1 and card["torch_version"] == torch.__version__
